"""`tokenize` as tasks: the same shards as one process, whatever the worker count, and a rerun
of an interrupted run skips the tasks already done."""

from __future__ import annotations

import pytest

from lmforge.data.executors import LocalExecutor
from lmforge.data.pipeline import plan_shards
from lmforge.data.shards import TokenizeConfig, load_shard_set, read_documents_from, tokenize_documents
from lmforge.data.tokenize_tasks import WORK, tokenize_files, tokenize_inputs
from lmforge.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def library(tmp_path_factory, handbook, handbook_pages):
    folder = tmp_path_factory.mktemp("library")
    for page in handbook_pages[:2]:
        (folder / page).write_bytes((handbook / "en-US" / page).read_bytes())
    for i in range(30):
        (folder / f"note-{i:02d}.txt").write_text(f"Note {i}: the pelican flies over the sea. " * (i + 1))
    return folder


def arrays(folder, split):
    _, shards = load_shard_set(folder, split)
    return [(s.tokens.tolist(), s.doc_starts.tolist(), s.tokens.dtype) for s in shards]


def test_tasks_write_what_one_process_writes(library, smollm2_gguf, tmp_path):
    config = TokenizeConfig(val_fraction=0.2, shard_tokens=4096)
    tokenizer = load_tokenizer(smollm2_gguf)
    single = tokenize_documents(read_documents_from([library]), tokenizer, tmp_path / "one", config)
    with LocalExecutor(2) as pool:
        tasks = tokenize_files([library], smollm2_gguf, tmp_path / "tasks", config, executor=pool,
                               shard_mb=0.02)
    assert len(plan_shards(tokenize_inputs([library]), 0, 0.02)) > 3  # really several tasks
    assert tasks.splits == single.splits and tasks.skipped == single.skipped
    for split in ("train", "val"):
        assert arrays(tmp_path / "tasks", split) == arrays(tmp_path / "one", split)
    assert not (tmp_path / "tasks" / "_work").exists()


class DiesAfterOneTask(LocalExecutor):
    """Runs the first task, then fails as a killed run would."""

    def map(self, work, jobs):
        yield work(jobs[0])
        raise KeyboardInterrupt


def test_an_interrupted_run_skips_finished_tasks(library, smollm2_gguf, tmp_path):
    config = TokenizeConfig(val_fraction=0.2, shard_tokens=4096)
    whole = tokenize_files([library], smollm2_gguf, tmp_path / "whole", config, shard_mb=0.02)
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tokenize_files([library], smollm2_gguf, output, config, executor=DiesAfterOneTask(), shard_mb=0.02)
    assert not (output / "meta.json").exists() and len(list((output / WORK).glob("*.done.json"))) == 1
    seen = []
    again = tokenize_files([library], smollm2_gguf, output, config, shard_mb=0.02,
                           progress=lambda docs, tokens, elapsed: seen.append(docs))
    first_task = plan_shards(tokenize_inputs([library]), 0, 0.02)[0]
    first_docs = sum(1 for _ in read_documents_from([f.path for f in first_task.files]))
    assert seen[-1] == sum(1 for _ in read_documents_from([library])) - first_docs  # task 0 was not redone
    assert again.splits == whole.splits
    for split in ("train", "val"):
        assert arrays(output, split) == arrays(tmp_path / "whole", split)
