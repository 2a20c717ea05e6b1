"""Fixtures for the server tests: tiny random models with a real (trained) BPE tokenizer,
apps around them, and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from tests.conftest import one_torch_thread

from lmforge.infer.engine import Engine
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun. "
    "A server answers requests; a model predicts the next token. Tokens become text again. "
    "Paris is the capital of France. Berlin is the capital of Germany. Café, naïve, 東京, 🙂. "
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer trained here (ChatML template, <|im_end|> ends a turn)."""
    return train_bpe(CORPUS, 256 + 120, special_tokens=SPECIALS, min_frequency=2, workers=1).to_tokenizer()


def make_engine(tokenizer: Tokenizer, *, seed: int = 0, max_seq_len: int = 128, **kwargs) -> Engine:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                         max_seq_len=max_seq_len, position="rope", norm="rmsnorm", mlp="swiglu",
                         n_kv_heads=2, qkv_bias=False, out_bias=False, mlp_bias=False,
                         tie_embeddings=False)  # tied, a random model mostly repeats its last token
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the init's: peaked, varied distributions, not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    stop_ids = [tokenizer.special_tokens[s] for s in ("<|endoftext|>", "<|im_end|>")]
    return Engine(model, tokenizer, stop_ids=stop_ids, **kwargs)


@pytest.fixture(scope="session")
def engine_factory(tokenizer) -> Callable[..., Engine]:
    """`engine_factory(seed=0, max_seq_len=128, **Engine kwargs)` -> a tiny random model's engine."""
    return lambda **kwargs: make_engine(tokenizer, **kwargs)


_one_thread = one_torch_thread()


@contextlib.contextmanager
def live_server(app, *, startup_timeout: float = 20.0, **config) -> Iterator[tuple[str, object]]:
    """Run `app` under a real uvicorn server on a free loopback port, in a thread; yields (URL, server).
    `config`: more `uvicorn.Config` options (e.g. `http=` a protocol class)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, **{"log_level": "warning", "lifespan": "on", "timeout_graceful_shutdown": 30,
                                    **config})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def serve():
    """`with serve(app) as (url, server):` a live uvicorn server for `app`."""
    return live_server
