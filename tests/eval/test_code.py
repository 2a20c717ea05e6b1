"""HumanEval in the sandbox: the canonical solutions pass, wrong code fails, and a program that loops,
eats memory, writes outside its folder, opens a socket or starts a process is stopped."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from tests.align.conftest import byte_tokenizer, tiny_llama

from lmforge.eval.code import HumanEval, code_from_reply, humaneval_path, program, read_problems
from lmforge.eval.lm import EvalModel
from lmforge.eval.sandbox import Limits, run_programs, run_sandboxed, sandbox_setup
from lmforge.hub import SampleError


@pytest.fixture(scope="module")
def problems():
    try:
        return read_problems(humaneval_path(quiet=True))
    except SampleError as err:
        pytest.skip(f"HumanEval sample unavailable: {err}")


def test_every_canonical_solution_passes_and_a_wrong_one_fails(problems):
    assert len(problems) == 164
    results = run_programs([program(p, p.canonical_solution) for p in problems], limits=Limits(seconds=20))
    assert [p.task_id for p, r in zip(problems, results) if not r.passed] == []
    wrong = run_sandboxed(program(problems[0], "    return False\n"))  # has_close_elements is sometimes True
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_an_infinite_loop_times_out():
    result = run_sandboxed("while True:\n    pass\n", limits=Limits(seconds=1))
    assert result.status == "timeout" and result.seconds < 5


def test_a_memory_bomb_is_stopped():
    result = run_sandboxed("hog = []\nwhile True:\n    hog.append(bytearray(50 << 20))\n",
                           limits=Limits(seconds=10, memory_mb=256))
    assert not result.passed and "MemoryError" in result.stderr


def test_writing_outside_the_folder_fails_and_inside_works(tmp_path):
    target = f"/tmp/lmforge-escape-{uuid.uuid4().hex}"
    result = run_sandboxed(f"open({target!r}, 'w').write('x')\n")
    assert result.status == "failed" and "PermissionError" in result.stderr and not os.path.exists(target)
    moved = run_sandboxed(f"open('a', 'w').write('x')\nimport os\nos.rename('a', {target!r})\n")
    assert moved.status == "failed" and not os.path.exists(target)
    assert run_sandboxed("open('scratch.txt', 'w').write('x')\nimport tempfile\ntempfile.mkstemp()\n").passed


@pytest.mark.parametrize("code", [
    "import socket\nsocket.socket().connect(('127.0.0.1', 9))",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.system('true')",
    "import ctypes",
])
def test_sockets_processes_and_ctypes_are_refused(code):
    result = run_sandboxed(code + "\n")
    assert result.status == "failed" and "PermissionError: sandbox" in result.stderr


def test_leaving_early_is_not_passing():
    assert run_sandboxed("import sys\nsys.exit(0)\n").status == "failed"
    assert run_sandboxed("print('ok')\n").passed


def test_the_machine_level_isolation_in_use():
    setup = sandbox_setup()
    if os.geteuid() == 0:
        assert setup.user == "nobody"
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here: the network is closed by the audit hook alone")
    assert setup.network_isolated  # unshare -rn works on these machines (root, user namespaces)
    # the namespace itself, with no audit hook: no interface but loopback, nothing reachable
    interfaces = subprocess.run(["unshare", "-rn", "cat", "/proc/net/dev"], capture_output=True, text=True)
    assert [line.split(":")[0].strip() for line in interfaces.stdout.splitlines()[2:]] == ["lo"]
    connect = ("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
               "except OSError as err:\n    print(err.errno)")
    probe = subprocess.run(["unshare", "-rn", sys.executable, "-c", connect], capture_output=True, text=True)
    assert probe.stdout.strip() == str(errno.ENETUNREACH)


def test_chat_replies_become_completions(problems):
    problem = problems[0]
    whole = f"Sure!\n```python\n{problem.prompt}{problem.canonical_solution}```\nDone."
    assert run_sandboxed(program(problem, code_from_reply(problem, whole))).passed
    body = f"```\n{problem.canonical_solution}```"
    assert run_sandboxed(program(problem, code_from_reply(problem, body))).passed
    assert code_from_reply(problem, "no code at all") == "no code at all"


def test_the_task_end_to_end_on_a_tiny_model(problems):
    model = EvalModel(tiny_llama(seed=5), byte_tokenizer(), stop_ids=[258])
    result = HumanEval(max_gen_toks=8).run(model, limit=3, seed=0)
    assert result.metrics["problems"] == 3 and result.metrics["pass@1"] == 0.0  # random bytes do not pass
    assert sum(result.info["outcomes"].values()) == 3
    sampled = HumanEval(samples=2, temperature=1.0, ks=(1, 2), max_gen_toks=4, chat=True).run(model, limit=2)
    assert {"pass@1", "pass@2"} <= set(sampled.metrics) and len(sampled.records[0]["completions"]) == 2
