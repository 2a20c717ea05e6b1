"""The `serve` verb: its flags, model ids, clear errors, and a real server process that
answers, then finishes a reply in flight and exits cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lmforge.serve.catalog import model_id_for
from lmforge.serve.cli import cmd_serve, register


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_flags_and_defaults():
    args = parse("--model", "smollm2", "--model", "chat=runs/x", "--port", "9000", "--api-key", "k")
    assert args.model == ["smollm2", "chat=runs/x"] and args.port == 9000 and args.api_key == "k"
    assert (args.host, args.max_batch_size, args.cache) == ("127.0.0.1", 16, "static")
    assert args.func is cmd_serve


def test_model_ids(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    gguf = tmp_path / "tiny.Q8_0.gguf"
    gguf.write_bytes(b"")
    assert model_id_for("smollm2") == ("smollm2", "smollm2")
    assert model_id_for(str(folder)) == ("my-model", str(folder))
    assert model_id_for(str(gguf)) == ("tiny.Q8_0", str(gguf))
    assert model_id_for(f"chat={folder}") == ("chat", str(folder))
    with pytest.raises(ValueError, match="model id"):
        model_id_for("bad name=x")


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "a=smollm2", "--model", "a=other"], "two models are called 'a'"),
    (["--model", "smollm2", "--port", "70000"], "--port must be in 0..65535"),
    (["--model", "smollm2", "--max-body-mb", "0"], "--max-body-mb must be > 0"),
    (["--model", "/no/such/folder"], "neither an existing path nor a known sample"),
])
def test_bad_flags_are_one_line_errors(argv, message):
    with pytest.raises((ValueError, OSError), match=message):
        cmd_serve(parse(*argv))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh Python process importing torch: a few seconds, more on a busy machine
def test_a_real_server_process_serves_and_shuts_down_gracefully(engine_factory, tmp_path):
    from lmforge.model.checkpoint import save_checkpoint

    engine = engine_factory(max_seq_len=512)
    folder = save_checkpoint(tmp_path / "tiny-chat", engine.model, tokenizer=engine.tokenizer)
    port = _free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", str(folder), "--port", str(port),
         "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny-chat"]

        received: list[str] = []
        started = threading.Event()

        def stream() -> None:
            request = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        received.append(line[6:])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        process.send_signal(signal.SIGTERM)  # mid-reply
        reader.join(60)
        # uvicorn finishes, then re-raises the signal it caught so that the exit says why
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert received[-1] == "[DONE]"
    last = json.loads(received[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert "tiny-chat at http://127.0.0.1" in process.stderr.read()
