"""The autoregressive loop: prefill the prompt once, then decode one token at a time.

Prefill runs the whole prompt through the model in one batch and fills the KV cache;
each decode step feeds only the newest token. Text is streamed as it becomes valid
UTF-8 (one token may hold half of a multi-byte character).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.infer.cache import StaticKVCache
from lmforge.infer.sampling import SamplingParams, sample
from lmforge.model.transformer import Transformer


class GenerationError(ValueError):
    """A request the model cannot serve, e.g. a prompt longer than its context."""


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the newly completed text (may be empty while a character is incomplete)
    finish_reason: str | None = None  # "stop" (end token) or "length" on the last event


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: Sequence[int] = (),
    token_bytes=None,
    stats: GenerationStats | None = None,
) -> Iterator[TokenEvent]:
    """Yield one `TokenEvent` per generated token. `token_bytes(id)` decodes for streaming."""
    context = model.config.max_seq_len
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    if len(prompt_ids) >= context:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_new_tokens = min(max_new_tokens, context - len(prompt_ids))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt_ids)

    device = next(model.parameters()).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = StaticKVCache.for_model(model, 1, len(prompt_ids) + max_new_tokens)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stop = set(stop_ids)

    ids = torch.tensor([list(prompt_ids)], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    started = time.perf_counter()
    for step in range(max_new_tokens):
        logits = model(ids, positions, cache, logits_for="last").logits[:, -1]
        token = int(sample(logits, params, generator)[0])
        now = time.perf_counter()
        if step == 0:
            stats.prefill_seconds = now - started
        else:
            stats.decode_seconds = now - started - stats.prefill_seconds
        stats.completion_tokens = step + 1
        if token in stop:
            stats.finish_reason = "stop"
            yield TokenEvent(token, decoder.decode(b"", final=True), "stop")
            return
        text = decoder.decode(token_bytes(token)) if token_bytes else ""
        last = step == max_new_tokens - 1
        if last:
            text += decoder.decode(b"", final=True)
            stats.finish_reason = "length"
        yield TokenEvent(token, text, "length" if last else None)
        ids = torch.tensor([[token]], device=device)
        positions = positions[:, -1:] + 1
