"""`generate`: the first generation path's function, now a thin wrapper over `Engine`.

Kept for its callers and its contract: one prompt (token ids), `max_new_tokens`
(lowered to fit the context, ending with `finish_reason="length"`), the model's stop
ids, a `TokenEvent` per generated token, timings in a `GenerationStats`. New code should
use `lmforge.infer.engine.Engine` directly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from lmforge.infer.engine import Engine, GenerationError, GenerationStats, TokenEvent
from lmforge.infer.sampling import SamplingParams
from lmforge.model.transformer import Transformer

__all__ = ["GenerationError", "GenerationStats", "TokenEvent", "generate"]

# One engine per model, so repeated calls reuse its fused weights and cache.
_ENGINES: weakref.WeakKeyDictionary[Transformer, Engine] = weakref.WeakKeyDictionary()


def _engine_for(model: Transformer) -> Engine:
    engine = _ENGINES.get(model)
    if engine is None or engine.has_unfinished():
        engine = Engine(model, max_batch_size=1)
        _ENGINES[model] = engine
    return engine


def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: Sequence[int] = (),
    token_bytes: Callable[[int], bytes] | None = None,
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
    engine = _engine_for(model)
    engine.eos_ids = frozenset(stop_ids)
    engine.token_bytes = token_bytes
    params = replace(params, max_tokens=min(max_new_tokens, context - len(prompt_ids)))
    yield from engine.generate(prompt_ids, params, stats=stats)
