"""The whole `prepare` run: report, sharding, worker independence, and resuming after a real kill."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.data.errors import RunStateError
from lmforge.data.pipeline import STAGE_ORDER, PrepareConfig, RunFolder, plan_shards, prepare
from lmforge.data.readers import InputFile
from lmforge.data.writers import read_documents

from .conftest import copy_into

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc and relies on PR_SET_PDEATHSIG")


@pytest.fixture(scope="module")
def corpus(handbook, handbook_pages, python_docs, warcs, tmp_path_factory) -> Path:
    """~50 real documents of every kind, plus bad input, in 20-odd files."""
    folder = tmp_path_factory.mktemp("corpus")
    files = [(handbook / "en-US" / p, f"handbook/en-US/{p}") for p in handbook_pages[:6]]
    files += [(handbook / lang / p, f"handbook/{lang}/{p}")
              for lang in ("fr-FR", "ja-JP") for p in handbook_pages[:3]]
    for page in ("tutorial/appetite", "tutorial/interpreter", "tutorial/floatingpoint"):
        files.append((python_docs / f"{page}.html", f"python/{page}.html"))
        files.append((python_docs / "_sources" / f"{page}.rst.txt", f"python/{page}.rst.txt"))
    files.append((warcs / "iana.warc.gz", "crawl/iana.warc.gz"))
    copy_into(folder, files)
    (folder / "crawl" / "cut.warc.gz").write_bytes((warcs / "example.warc.gz").read_bytes()[:1500])
    (folder / "junk.html").write_bytes(bytes(range(256)) * 40)
    return folder


def config(**changes) -> PrepareConfig:
    return PrepareConfig(shards=6, **changes)


def documents(output: Path) -> list:
    return [d for path in sorted(output.glob("part-*.parquet")) for d in read_documents(path)]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted single-process run: what every other run must reproduce."""
    output = tmp_path_factory.mktemp("reference")
    return prepare([corpus], output, config(workers=1)), output


def test_report_accounts_for_every_document(reference):
    report, output = reference
    names = [s.name for s in report.stages]
    assert names == [n for n in STAGE_ORDER if n in names]
    assert {"read", "extract", "dedup", "pii"} <= set(names)
    for stage in report.stages:
        assert stage.docs_in == stage.kept + stage.dropped_total, stage
    for before, after in zip(report.stages, report.stages[1:]):
        assert before.kept == after.docs_in, (before.name, after.name)
    read = report.stages[0]
    assert read.dropped["binary"] == 1 and read.dropped["truncated_archive"] == 1
    assert read.dropped["not_html"] > 0
    assert report.docs_written == report.stages[-1].kept == len(documents(output)) > 5
    saved = json.loads((output / "report.json").read_text())
    assert saved["docs_written"] == report.docs_written and saved["docs_per_second"] > 0
    assert [s["name"] for s in saved["stages"]] == names
    table = (output / "report.txt").read_text()
    assert "gopher_quality" in table and "docs/s" in table and "MB/s" in table
    assert not (output / "_work" / "filtered" / "part-00000.parquet").exists()  # intermediates removed
    ids = [d.id for d in documents(output)]
    assert len(ids) == len(set(ids))


def test_two_workers_write_the_same_output(corpus, reference, tmp_path):
    _, expected = reference
    prepare([corpus], tmp_path, config(workers=2))
    assert sorted(p.name for p in tmp_path.glob("part-*")) == sorted(p.name for p in expected.glob("part-*"))
    assert documents(tmp_path) == documents(expected)


KILLABLE = """
import sys
from lmforge.data.pipeline import PrepareConfig, prepare
prepare([sys.argv[1]], sys.argv[2], PrepareConfig(shards=6, workers=2))
"""


@linux_only
def test_a_killed_run_resumes_to_the_same_output(corpus, reference, tmp_path):
    """SIGKILL the run once the first shard is filtered; the rerun skips finished shards and
    writes exactly what an uninterrupted run writes: nothing lost, nothing twice."""
    _, expected = reference
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, str(corpus), str(output)])
    markers = output / "_work" / "filtered"
    deadline = time.monotonic() + 120
    while not list(markers.glob("*.done.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    done_before = len(list(markers.glob("*.done.json")))
    assert 1 <= done_before < 6 and not (output / "report.json").exists()  # really killed part-way
    time.sleep(0.5)  # workers die with the main process (PR_SET_PDEATHSIG); give the kernel a moment
    snapshot = {p.name: p.stat().st_mtime_ns for p in markers.glob("*.done.json")}

    report = prepare([corpus], output, config(workers=2))
    assert report.shards_resumed >= done_before
    for name, mtime in snapshot.items():  # finished shards were skipped, not redone
        assert (markers / name).stat().st_mtime_ns == mtime
    got, want = documents(output), documents(expected)
    assert got == want
    assert len({d.id for d in got}) == len(got)
    assert not list(output.rglob("*.tmp"))


def test_rerun_redoes_only_missing_final_shards(corpus, tmp_path):
    output = tmp_path / "out"
    first = prepare([corpus], output, config(keep_intermediate=True))
    before = documents(output)
    folder = RunFolder(output)
    (output / "part-00002.parquet").unlink()  # as if killed while writing shard 2 ...
    (folder.work / "final" / "part-00004.done.json").unlink()  # ... and before shard 4's marker
    again = prepare([corpus], output, config())
    assert documents(output) == before
    assert again.docs_written == first.docs_written
    assert [s.to_dict()["dropped_by_reason"] for s in again.stages] == \
        [s.to_dict()["dropped_by_reason"] for s in first.stages]


def test_a_different_run_is_not_mixed_in(corpus, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(corpus / "handbook" / "en-US", small)
    prepare([small], tmp_path / "out", config())
    with pytest.raises(RunStateError, match="different settings"):
        prepare([small], tmp_path / "out", config(output_format="jsonl"))
    with pytest.raises(RunStateError, match="different input"):
        prepare([corpus / "python"], tmp_path / "out", config())
    report = prepare([small], tmp_path / "out", config(output_format="jsonl"), overwrite=True)
    assert report.output_files and all(name.endswith(".jsonl") for name in report.output_files)
    assert not list((tmp_path / "out").glob("part-*.parquet"))


def test_shard_plan_is_contiguous_balanced_and_worker_independent():
    files = [InputFile(f"/x/{i:03d}", f"{i:03d}", "html", size) for i, size in
             enumerate([5, 1, 1, 1, 9, 2, 2, 2, 2, 30, 1, 1])]
    plan = plan_shards(files, shards=4)
    assert [f for s in plan for f in s.files] == files
    assert len(plan) == 4 and all(s.files for s in plan)
    assert [s.index for s in plan] == [0, 1, 2, 3]
    assert len(plan_shards(files, shards=50)) == len(files)  # at most one shard per file
    assert len(plan_shards(files)) == 8  # automatic: at least 8 when there are enough files
    assert len(plan_shards(files[:3])) == 3


@linux_only
def test_workers_die_with_the_main_process(corpus, tmp_path):
    """No orphan keeps writing after a kill: list processes that have the output folder open."""
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, str(corpus), str(output)])
    deadline = time.monotonic() + 60
    while not (output / "_work" / "plan.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # workers have started
    children = _children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert children, "expected worker processes"
    deadline = time.monotonic() + 10  # on a loaded machine a dying worker may wait to be scheduled
    while [pid for pid in children if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in children if _alive(pid)]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"

