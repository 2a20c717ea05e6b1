"""`lmforge tokenize` as tasks on an executor: input shards encoded in parallel, then laid out.

Encoding is the expensive part and independent per document, so the inputs are cut
into shards (`lmforge.data.pipeline.plan_shards`: contiguous, about `shard_mb` each;
one per file of a `prepare` output) and each shard is one task. A task writes what it
encoded to ``_work/tokenize/part-NNNNN.safetensors``: every document's ids, wrapped in
BOS ... EOS, back to back (uint32), with their lengths, text bytes and split, then its
done marker. The layout step then streams the task files in shard order through the
same `SplitWriter` that `tokenize_documents` uses, so the shards and meta.json are the
bytes a single process writes over the same documents, whichever executor ran the tasks.

An interrupted run (no meta.json yet) resumes: tasks with a marker are skipped, if the
plan (inputs, tokenizer, settings) is the one they were made for.

Memory: a task holds its shard's token ids (about 4 bytes per token plus one encoding
batch); the layout step one output shard (`shard_tokens`) and one task file's arrays,
memory-mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.atomic import atomic_write
from lmforge.data.document import StageStats
from lmforge.data.executors import Executor, LocalExecutor, TaskMemory
from lmforge.data.pipeline import Shard, plan_shards
from lmforge.data.readers import InputFile, discover_inputs, read_input
from lmforge.data.shards import (
    SPLITS,
    SplitWriter,
    TokenizeConfig,
    TokenizeReport,
    encode_documents,
    finish_shard_folder,
    special_ids,
    start_shard_folder,
    token_dtype,
)

WORK = Path("_work") / "tokenize"
_TOKENIZERS: dict[str, Any] = {}


def tokenize_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[InputFile]:
    """The files `read_documents_from` reads: a `prepare` output folder's ``part-*`` files,
    anything else as given."""
    paths: list[str | os.PathLike[str]] = []
    for raw in inputs:
        folder = Path(raw)
        parts = sorted(folder.glob("part-*")) if folder.is_dir() and (folder / "report.json").exists() else []
        paths.extend(parts or [raw])
    return discover_inputs(paths)


@dataclass
class TokenizeJob:
    work: str
    shard: Shard
    tokenizer: str  # a local path every worker can read
    config: TokenizeConfig


def _tokenizer(path: str) -> Any:
    """Loaded once per worker process."""
    if path not in _TOKENIZERS:
        from lmforge.tokenizer import load_tokenizer

        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def _task_file(work: Path, shard: Shard) -> Path:
    return work / f"{shard.name}.safetensors"


def _task_marker(work: Path, shard: Shard) -> Path:
    return work / f"{shard.name}.done.json"


def tokenize_task(job: TokenizeJob) -> dict[str, Any]:
    """Encode one input shard; save its documents' ids, lengths, text bytes and splits."""
    from safetensors.numpy import save

    started = time.perf_counter()
    work = Path(job.work)
    with TaskMemory() as memory:
        read = StageStats("read")
        documents = (doc for item in job.shard.files for doc in read_input(item, read))
        skipped: dict[str, int] = {}
        pieces, lengths, text_bytes, is_val = [], [], [], []
        for split, ids, nbytes in encode_documents(documents, _tokenizer(job.tokenizer), job.config, skipped):
            pieces.append(ids.astype(np.uint32))
            lengths.append(len(ids))
            text_bytes.append(nbytes)
            is_val.append(split == "val")
        payload = save({"tokens": np.concatenate(pieces) if pieces else np.zeros(0, np.uint32),
                        "lengths": np.asarray(lengths, dtype=np.int64),
                        "text_bytes": np.asarray(text_bytes, dtype=np.int64),
                        "val": np.asarray(is_val, dtype=np.uint8)})
        with atomic_write(_task_file(work, job.shard)) as f:
            f.write(payload)
    result = {"shard": job.shard.index, "documents": len(lengths), "tokens": int(sum(lengths)),
              "skipped": skipped, "bytes_in": job.shard.size, "seconds": time.perf_counter() - started,
              "memory": memory.to_dict()}
    with atomic_write(_task_marker(work, job.shard), "w") as f:
        f.write(json.dumps(result))
    return result


def _lay_out(work: Path, plan: list[Shard], writer: SplitWriter) -> None:
    """Stream every task's documents, in shard order, into the output shards."""
    from safetensors import safe_open

    for shard in plan:
        with safe_open(_task_file(work, shard), framework="numpy") as f:
            tokens, lengths = f.get_tensor("tokens"), f.get_tensor("lengths")
            text_bytes, is_val = f.get_tensor("text_bytes"), f.get_tensor("val")
        ends = np.cumsum(lengths)
        for end, length, nbytes, val in zip(ends.tolist(), lengths.tolist(), text_bytes.tolist(),
                                            is_val.tolist()):
            writer.add(SPLITS[1] if val else SPLITS[0], tokens[end - length:end].astype(np.int64), nbytes)


def _plan_key(files: list[InputFile], tokenizer: str, config: TokenizeConfig) -> str:
    record = {"inputs": [[f.path, f.size] for f in files], "tokenizer": tokenizer, "config": asdict(config)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def tokenize_files(inputs: Sequence[str | os.PathLike[str]], tokenizer_path: str | os.PathLike[str],
                   output: str | os.PathLike[str], config: TokenizeConfig | None = None, *,
                   executor: Executor | None = None, tokenizer_name: str = "", shard_mb: float = 8.0,
                   progress: Callable[[int, int, float], None] | None = None) -> TokenizeReport:
    """Tokenize `inputs` into train/val shards under `output`, encoding input shards as tasks
    on `executor` (default: this process). Same bytes as `tokenize_documents` over
    `read_documents_from(inputs)`."""
    config = config or TokenizeConfig()
    config.validate()
    tokenizer_path = str(Path(tokenizer_path).expanduser().resolve())
    tokenizer = _tokenizer(tokenizer_path)
    special_ids(tokenizer, config)
    files = tokenize_inputs(inputs)
    plan = plan_shards(files, 0, shard_mb)
    folder = start_shard_folder(output).resolve()
    work = folder / WORK
    key = _plan_key(files, tokenizer_path, config)
    if (work / "plan.txt").exists() and (work / "plan.txt").read_text() != key:
        shutil.rmtree(work)  # another run's tasks: never mix them in
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.txt").write_text(key)
    started = time.perf_counter()
    todo = [s for s in plan if not (_task_marker(work, s).exists() and _task_file(work, s).exists())]
    jobs = [TokenizeJob(str(work), s, tokenizer_path, config) for s in todo]
    documents = tokens = 0
    with LocalExecutor(1) if executor is None else contextlib.nullcontext(executor) as runner:
        for result in runner.map(tokenize_task, jobs) if jobs else ():
            documents += result["documents"]
            tokens += result["tokens"]
            if progress:
                progress(documents, tokens, time.perf_counter() - started)
    skipped: dict[str, int] = {}
    for shard in plan:
        for reason, count in json.loads(_task_marker(work, shard).read_text())["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    writer = SplitWriter(folder, token_dtype(tokenizer.vocab_size), config)
    _lay_out(work, plan, writer)
    report = finish_shard_folder(folder, tokenizer, writer, config, skipped, started, tokenizer_name)
    shutil.rmtree(work)
    with contextlib.suppress(OSError):
        work.parent.rmdir()  # _work, if nothing else is in it
    return report

