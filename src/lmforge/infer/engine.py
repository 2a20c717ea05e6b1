"""`Engine`: everything that generates text goes through here.

The engine owns the model (through a `ModelRunner`), the tokenizer and the KV cache,
and runs requests with *continuous batching*:

```
add_request(prompt, params) -> request id          (queued: "waiting")
step():
    prefill up to `prefill_chunk` prompt tokens:   prompts under way first, then waiting
                                                   requests while a slot is free; a prompt's
                                                   last chunk gives its first token
    one decode step for every running request:     one batched forward, [n, 1] tokens
    finished requests (stop, length) leave at once and free their cache
    -> the TokenEvents produced by this step
cancel(request id)                                 frees its cache immediately
```

Requests join and leave the running batch between any two decode steps; nothing waits
for the slowest member of a batch. A decode step reads every weight once whatever the
batch size, so at small batches n requests cost little more than one: that is where the
throughput comes from.

*Chunked prefill*: a step runs at most `prefill_chunk` prompt tokens, so a long prompt
is prefilled over several steps while the running requests go on decoding a token in
every one of them (without it, a 2,000-token prompt stalls every stream for as long as
its whole prefill takes). A request joins the decode batch once its last chunk has
given its first token. The chunks attend to the keys and values the earlier ones
cached, so the output is what one whole-prompt forward gives (up to float rounding).

With a draft model, the running requests are decoded speculatively
(`lmforge.infer.speculative`): the draft proposes k tokens for each of them, the model
checks them all in one forward pass, and the accept/reject rule keeps the model's own
output distribution.

Convenience wrappers: `generate` (stream one request), `complete` (run many to the end),
`beam_search` (`lmforge.infer.beam`).

A model with a prefix-tuning adapter (`lmforge.tune.prefix`, see `ModelRunner.prefix`)
has each sequence's cache start with the prefix's N keys and values, written at
admission before the prompt: the prompt's tokens then sit at positions N, N+1, ..., and
a request has N tokens less of context.
"""

from __future__ import annotations

import codecs
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge.infer.cache import CacheFullError, PagedKVCache, StaticKVCache
from lmforge.infer.quant import int8_activations
from lmforge.infer.runner import ModelRunner
from lmforge.infer.sampling import (
    SamplingParams,
    TokenCounts,
    TokenLogprob,
    apply_penalties,
    draw,
    filter_logits,
    logprobs_of,
)
from lmforge.infer.speculative import Drafter, judge
from lmforge.model.transformer import Transformer

#: prompt tokens per engine step (chunked prefill); chosen by measurement, see docs/benchmarks.md
PREFILL_CHUNK = 256


class GenerationError(ValueError):
    """A request the model cannot serve, e.g. a prompt longer than its context."""


@dataclass
class TokenEvent:
    """One generated token of one request."""

    token_id: int
    text: str  # newly completed text (may be empty while a character or a possible stop string is incomplete)
    finish_reason: str | None = None  # "stop" (stop token or string) or "length", on a request's last event
    request_id: int = 0
    index: int = 0  # position in the reply
    logprob: float | None = None  # the model's log-probability of this token (with params.logprobs)
    top_logprobs: list[TokenLogprob] | None = None  # the most likely alternatives (params.top_logprobs)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0  # the prompt's forward pass and the first token
    decode_seconds: float = 0.0  # from the first token to the last
    finish_reason: str | None = None
    draft_tokens: int = 0  # speculative decoding: tokens the draft proposed ...
    accepted_tokens: int = 0  # ... and how many of them the model accepted
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None


@dataclass
class Completion:
    """A finished request, as `Engine.complete` returns it."""

    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stats: GenerationStats
    logprobs: list[float] | None = None


class _StopStrings:
    """Finds stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops, self.held = list(stops), ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buffer[:min(hits)], True
        keep = 0
        for stop in self.stops:  # the longest suffix of the buffer that a stop string starts with
            for k in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:k]):
                    keep = k
                    break
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


@dataclass(eq=False)  # compared by identity: `seq in self.waiting` must not compare every field
class _Sequence:
    """A request's state inside the engine."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    counts: TokenCounts | None
    decoder: codecs.IncrementalDecoder
    stopper: _StopStrings
    stats: GenerationStats
    output_ids: list[int] = field(default_factory=list)
    finished: str | None = None
    admitted: float = 0.0
    first_token_at: float = 0.0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        """len(all_ids), without building the list (asked after every token)."""
        return len(self.prompt_ids) + len(self.output_ids)


def _vocabulary_bytes(tokenizer) -> Callable[[int], bytes]:
    """The tokenizer's bytes of a token, and b"" for ids past its vocabulary: models often pad
    their embedding matrix beyond the tokenizer (to a multiple of 64, say), and a sampled
    (or untrained) model can draw those rows, which then print as nothing."""
    size = tokenizer.vocab_size
    return lambda token: tokenizer.token_bytes(token) if token < size else b""


class Engine:
    """Continuous-batching generation over one model.

    `cache="static"` (default) gives each running request a preallocated slot (grown by
    doubling as needed); `cache="paged"` shares a pool of `num_blocks` blocks of
    `block_size` tokens. `max_seq_len` caps prompt + reply (default: the model's context).
    `stop_ids` are the model's end-of-sequence tokens (`LoadedModel.stop_ids()`). A new
    prompt reuses the keys and values earlier requests left for the tokens it starts with
    (prefix caching: shared blocks of the paged cache, or what a free static slot holds; see
    `lmforge.infer.cache`) unless `prefix_caching=False`. `prefill_chunk` caps the prompt
    tokens one step runs (chunked prefill; None or 0: every admitted prompt whole at once).
    `activations="int8"` makes the model's int8 and int4 layers round their inputs to int8 with a
    scale per 32 inputs (as llama.cpp; "int8-token": per token) and multiply integers
    (`lmforge.infer.quant.int8_activations`; changes the model).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        *,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        cache: Literal["static", "paged"] = "static",
        block_size: int = 16,
        num_blocks: int | None = None,
        stop_ids: Sequence[int] = (),
        token_bytes: Callable[[int], bytes] | None = None,
        draft_model: Transformer | None = None,
        num_speculative: int = 4,
        prefix_caching: bool = True,
        prefill_chunk: int | None = PREFILL_CHUNK,
        activations: Literal["int8", "int8-token"] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk is not None and prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: whole prompts), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk or None
        self.model = model.eval()
        if activations is not None:  # int8/int4 weights times int8-rounded inputs (`quant.int8_activations`)
            if activations not in ("int8", "int8-token"):
                raise ValueError(f"activations must be 'int8' or 'int8-token' (or None: as the layers are), "
                                 f"got {activations!r}")
            int8_activations(model, "token" if activations == "int8-token" else "block")
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes or (_vocabulary_bytes(tokenizer) if tokenizer is not None else None)
        self.runner = ModelRunner(model)
        self.context = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        self.max_batch_size = max_batch_size
        self.eos_ids = frozenset(stop_ids)
        self.device = self.runner.device
        if cache == "static":
            self.cache: StaticKVCache | PagedKVCache = StaticKVCache.for_model(
                model, max_batch_size, self.context, lazy=True)
        elif cache == "paged":
            blocks = num_blocks or max_batch_size * -(-min(self.context, 1024) // block_size) + 1
            self.cache = PagedKVCache.for_model(model, blocks, block_size, prefix_caching=prefix_caching)
        else:
            raise ValueError(f"cache must be 'static' or 'paged', got {cache!r}")
        self.prefix_caching = prefix_caching
        self.path = None  # what `from_pretrained` loaded
        self.draft = None
        if draft_model is not None:
            if draft_model.config.vocab_size != model.config.vocab_size:
                raise ValueError("the draft model must share the model's vocabulary")
            self.draft = Drafter(draft_model, self.context, max_batch_size)
        if num_speculative < 1:
            raise ValueError(f"num_speculative must be >= 1, got {num_speculative}")
        self.num_speculative = num_speculative
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # decoding: their prompt is cached and they have a first token
        self.prefilling: list[_Sequence] = []  # holding a cache while their prompt is run chunk by chunk
        self.sequences: dict[int, _Sequence] = {}
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, spec, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        quantize: str | None = None, draft=None, draft_quantize: str | None = None,
                        prepare: Callable[[Transformer], object] | None = None, **kwargs) -> Engine:
        """An engine for a checkpoint folder, `.gguf` file or sample name (`smollm2`).

        `prepare(model)` runs on the loaded model before anything else (the CLI puts a
        fine-tuned adapter on it here); `quantize` ("int8", "int4") then quantizes the
        model's linear layers; from a GGUF, either mode first keeps the file's Q4_0/Q4_1 and
        Q8_0 matrices as they are, read straight into int4 and int8 layers (never rounded a
        second time), and quantizes only what the file holds in another type; `draft` names a
        draft model for speculative decoding (loaded the same way, quantized with `draft_quantize`).
        Other keywords go to `Engine(...)`. `engine.path` is the file or folder loaded."""
        from lmforge.infer.loading import load_model
        from lmforge.infer.quant import quantize_model

        def load(spec, mode, prepare=None):
            keep = ("int4", "int8") if mode and prepare is None else ()  # an adapter (`prepare`) needs floats
            loaded = load_model(spec, dtype=dtype, device=device, keep=keep)
            if prepare is not None:
                prepare(loaded.model)
            if mode:
                quantize_model(loaded.model, mode)  # the layers still in float
            return loaded

        loaded = load(spec, quantize, prepare)
        draft_model = load(draft, draft_quantize).model if draft is not None else None
        engine = cls(loaded.model, loaded.tokenizer, stop_ids=loaded.stop_ids(), draft_model=draft_model,
                     **kwargs)
        engine.path = loaded.path
        return engine

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    truncate: bool = False) -> int:
        """Queue a request; returns its id. A prompt is text (needs a tokenizer) or token ids.

        Raises `GenerationError` if the prompt, or the prompt plus `max_tokens`, does not
        fit the context; with `truncate=True` an over-long prompt keeps its last tokens.
        """
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError("a text prompt needs an engine with a tokenizer")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
        if params.stop and self.token_bytes is None:
            raise GenerationError("stop strings need an engine with a tokenizer")
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise GenerationError("the prompt is empty")
        if not all(0 <= t < vocab for t in prompt_ids):
            raise GenerationError(f"prompt token ids must be in 0..{vocab - 1}")
        context = self._capacity()
        wanted = params.max_tokens or 1
        if wanted > context - 1 and params.max_tokens is not None:
            raise GenerationError(f"max_tokens ({params.max_tokens}) leaves no room for a prompt: the "
                                  f"context is {context} tokens")
        if len(prompt_ids) + wanted > context:
            if not truncate:
                raise GenerationError(
                    f"the prompt has {len(prompt_ids)} tokens and {wanted} new tokens were asked for, but "
                    f"the context is {context} tokens (shorten the prompt, lower max_tokens, or truncate)")
            prompt_ids = prompt_ids[len(prompt_ids) + wanted - context:]
        max_tokens = params.max_tokens or context - len(prompt_ids)

        seq = _Sequence(
            id=next(self._ids), prompt_ids=prompt_ids, params=params, max_tokens=max_tokens,
            stop_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids),
            generator=(torch.Generator(device=self.device).manual_seed(params.seed)
                       if params.seed is not None else None),
            counts=TokenCounts(vocab, prompt_ids, self.device) if params.penalized else None,
            decoder=codecs.getincrementaldecoder("utf-8")(errors="replace"),
            stopper=_StopStrings(params.stop),
            stats=GenerationStats(prompt_tokens=len(prompt_ids)),
        )
        self.sequences[seq.id] = seq
        self.waiting.append(seq)
        return seq.id

    def cancel(self, request_id: int) -> bool:
        """Stop a request now and free its cache; False if it had already finished."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.finished:
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "cancelled")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def stats(self, request_id: int) -> GenerationStats:
        return self.sequences[request_id].stats

    def release(self, request_id: int) -> None:
        """Forget a finished request's bookkeeping (a long-running server calls this)."""
        seq = self.sequences.get(request_id)
        if seq is not None and seq.finished:
            del self.sequences[request_id]

    def _capacity(self) -> int:
        """Tokens a request (prompt and reply) may have: the context less a prefix adapter's tokens."""
        if isinstance(self.cache, PagedKVCache):
            return min(self.context, self.cache.max_len) - self._prefix_length()
        return self.context - self._prefix_length()

    def _prefix_length(self) -> int:
        """N, the virtual tokens of a prefix-tuning adapter that every sequence's cache starts with."""
        prefix = self.runner.prefix
        return 0 if prefix is None else prefix[0].shape[2]

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[TokenEvent]:
        """Prefill up to `prefill_chunk` prompt tokens, then decode one token for every running request."""
        events: list[TokenEvent] = []
        # prompts whose last chunk ran in this step, and the logits of their first token: an
        # identical prompt admitted next copies the cache instead of running the prompt again
        prefilled: dict[tuple[int, ...], tuple[_Sequence, torch.Tensor]] = {}
        budget = self.prefill_chunk or self.context
        for seq in list(self.prefilling):  # prompts under way first, in slot order
            if budget <= 0:
                break
            budget -= self._prefill_chunk(seq, budget, events, prefilled)
        while (self.waiting and len(self.running) + len(self.prefilling) < self.max_batch_size
               and self._fits(self.waiting[0])):
            seq = self.waiting[0]
            twin = prefilled.get(tuple(seq.all_ids))
            if twin is not None and not twin[0].finished:  # the same prompt was just prefilled: copy it
                events.append(self._fork(self.waiting.popleft(), *twin))
                continue
            if budget <= 0 or any(p.all_ids == seq.all_ids for p in self.prefilling):
                break  # no tokens left in this step; or its twin is still being prefilled (it forks later)
            self._start(self.waiting.popleft())
            budget -= self._prefill_chunk(seq, budget, events, prefilled)
        if not self.running:
            if self.waiting and not self.prefilling:  # nothing runs, and the first request cannot fit alone
                seq = self.waiting.popleft()
                self._finish(seq, "length")
                raise GenerationError(f"request {seq.id} does not fit in the KV cache")
            return events
        self._settle()
        if self.draft is not None:
            depths = self._speculation_depths()
            if max(depths) >= 1:
                return events + self._speculative(depths)
        self._make_room(1)
        if self.running:
            events += self._decode()
        return events

    def _fits(self, seq: _Sequence) -> bool:
        if isinstance(self.cache, PagedKVCache):  # its prefix and prompt, plus one block to grow into
            return self.cache.free_tokens() >= self._prefix_length() + seq.length + self.cache.block_size
        return True

    def _make_room(self, tokens: int) -> None:
        """Paged cache: if the running requests need more blocks than are free for `tokens` more
        tokens each, send the most recently admitted requests (decoding or still prefilling) back
        to the queue (their cache is freed; they are prefilled again later)."""
        if not isinstance(self.cache, PagedKVCache):
            return
        while self.running:
            needed = sum(self.cache.blocks_needed(s.id, self.cache.seq_length(s.id) + tokens)
                         for s in self.running)
            if needed <= self.cache.available_blocks():
                return
            seq = max(self.running + self.prefilling, key=lambda s: s.admitted)
            (self.running if seq in self.running else self.prefilling).remove(seq)
            self._release_cache(seq)
            if self.draft is not None:
                self.draft.forget(seq.id)
            self.waiting.appendleft(seq)

    def _settle(self) -> None:
        """Static cache: keep the decoding requests in the lowest slots, those still prefilling above
        them (a decode batch must be one run of slots). A prompt's slot is taken after every other
        one's, and prompts finish in slot order, so this has work to do only when a freed slot was
        filled with a prefilling request's, or a fork's slot lies past a prompt still under way."""
        if not isinstance(self.cache, StaticKVCache) or not self.prefilling:
            return
        n = len(self.running)
        high = [s for s in self.running if self.cache.order(s.id) >= n]
        low = [s for s in self.prefilling if self.cache.order(s.id) < n]
        for a, b in zip(high, low):
            self.cache.swap(a.id, b.id)
        self._sort()

    def _sort(self) -> None:
        self.running.sort(key=lambda s: self.cache.order(s.id))
        self.prefilling.sort(key=lambda s: self.cache.order(s.id))

    def _start(self, seq: _Sequence) -> None:
        """Give a request its cache: the part of its prompt an earlier request left (prefix caching:
        the paged cache's leading full blocks, or a free static slot's tokens), a prefix adapter's
        keys and values, and with a paged cache the blocks for the rest of its prompt."""
        reuse = self._prefix_caching()
        if self.runner.refresh() and reuse:
            self.cache.forget_prefixes()  # computed with the old weights
        if isinstance(self.cache, PagedKVCache):
            shared = self.cache.match_prefix(seq.all_ids[:-1]) if reuse else []
            self._admit(seq, lambda seq_id: self.cache.allocate(seq_id, shared), self.prefilling)
        else:
            self._admit(seq, lambda seq_id: self.cache.allocate(seq_id, seq.all_ids[:-1] if reuse else ()),
                        self.prefilling)
        if self.runner.prefix is not None:  # a prefix adapter's keys and values come first
            self.cache.append(seq.id, *self.runner.prefix)
        if isinstance(self.cache, PagedKVCache):
            self.cache.reserve(seq.id, self._prefix_length() + seq.length)
        seq.stats.cached_tokens = self.cache.seq_length(seq.id) - self._prefix_length()

    def _prefill_chunk(self, seq: _Sequence, budget: int, events: list[TokenEvent],
                       prefilled: dict[tuple[int, ...], tuple[_Sequence, torch.Tensor]]) -> int:
        """Run the next `budget` tokens (at most) of a prompt (plus anything generated before a
        preemption); after its last chunk, take the first token and join the decode batch.
        Returns how many tokens it ran."""
        start = self.cache.seq_length(seq.id) - self._prefix_length()
        end = min(seq.length, start + budget)
        ids = torch.tensor([seq.all_ids[start:end]], device=self.device)
        logits = self.runner(ids, self.cache.view([seq.id]))
        if self._prefix_caching():  # as soon as computed: a twin admitted next can share it
            self.cache.register(seq.id, seq.all_ids[:end])
        if end == seq.length:
            self.prefilling.remove(seq)
            self.running.append(seq)
            self._sort()
            prefilled[tuple(seq.all_ids)] = (seq, logits[0])
            events.append(self._emit(seq, self._choose(logits[:1], [seq])[0], logits[0]))
        return end - start

    def _prefix_caching(self) -> bool:
        """Whether prompts may reuse what earlier requests cached (blocks, or a static slot's tokens):
        on unless turned off, and never with a prefix adapter (whose virtual tokens sit unnamed in
        the cache)."""
        return self.prefix_caching and self.runner.prefix is None

    def _release_cache(self, seq: _Sequence) -> None:
        """Free `seq`'s cache, first naming its full blocks so that a later prompt can reuse them."""
        if self._prefix_caching():
            self.cache.register(seq.id, seq.all_ids[:self.cache.seq_length(seq.id)])
        self.cache.free(seq.id)

    def _fork(self, seq: _Sequence, twin: _Sequence, logits: torch.Tensor) -> TokenEvent:
        """Admit a request whose tokens are exactly those `twin` was just prefilled with (k samples
        of one prompt, as RL rollouts and `n > 1` ask for): copy twin's cache instead of running
        the prompt again, and draw its own first token from the same logits with its own seed."""
        self._admit(seq, lambda seq_id: self.cache.fork(twin.id, seq_id), self.running)
        return self._emit(seq, self._choose(logits[None], [seq])[0], logits)

    def _admit(self, seq: _Sequence, place: Callable[[int], None], into: list[_Sequence]) -> None:
        """Give `seq` its cache (`place(seq.id)`: a fresh one, or a copy) and a place in `into`
        (`prefilling`, or the running batch for a copy)."""
        seq.admitted = time.perf_counter()
        place(seq.id)
        into.append(seq)
        self._sort()

    def _decode(self) -> list[TokenEvent]:
        batch = self.running
        ids = torch.tensor([[s.output_ids[-1]] for s in batch], device=self.device)
        logits = self.runner(ids, self.cache.view([s.id for s in batch]))
        if all(s.params.plain_greedy for s in batch):
            tokens = self.runner.greedy(logits)
        else:
            tokens = self._choose(logits, batch)
        return [self._emit(s, t, logits[i]) for i, (s, t) in enumerate(zip(list(batch), tokens))]

    def _choose(self, logits: torch.Tensor, seqs: Sequence[_Sequence]) -> list[int]:
        """Each row's next token: penalties, temperature, top-k/p, min-p, then a seeded draw.

        Batched: rows that share their filtering settings are filtered together, and every
        sampled row is drawn in one `draw` (one random number from each row's generator)."""
        logits = logits.float()
        if any(s.params.penalized for s in seqs):  # a copy: the raw logits still give the reported logprobs
            logits = torch.stack([apply_penalties(row, s.params, s.counts) for row, s in zip(logits, seqs)])
        tokens = logits.argmax(-1).tolist()
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            p = s.params
            if not p.greedy:
                groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
        if groups:
            rows = [i for members in groups.values() for i in members]
            probs = torch.cat([filter_logits(logits[members], seqs[members[0]].params).softmax(-1)
                               for members in groups.values()])
            for i, token in zip(rows, draw(probs, [seqs[i].generator for i in rows]).tolist()):
                tokens[i] = token
        return tokens

    def _emit(self, seq: _Sequence, token: int, logits: torch.Tensor | None) -> TokenEvent:
        """Record a token, turn it into text, and decide whether the request is done."""
        now = time.perf_counter()
        seq.output_ids.append(token)
        n = len(seq.output_ids)
        if n == 1:
            seq.first_token_at = now
            seq.stats.prefill_seconds = now - seq.admitted
        seq.stats.decode_seconds = now - seq.first_token_at
        seq.stats.completion_tokens = n
        if seq.counts is not None:
            seq.counts.add(token)
        event = TokenEvent(token, "", request_id=seq.id, index=n - 1)
        if logits is not None and (seq.params.logprobs or seq.params.top_logprobs):
            event.logprob, alternatives = logprobs_of(logits, token, seq.params.top_logprobs)
            event.top_logprobs = alternatives if seq.params.top_logprobs else None

        if token in seq.stop_ids:
            event.text = seq.stopper.flush() + seq.decoder.decode(b"", final=True)
            event.finish_reason = "stop"
        else:
            piece = seq.decoder.decode(self.token_bytes(token)) if self.token_bytes else ""
            event.text, hit = seq.stopper.feed(piece)
            if hit:
                event.finish_reason = "stop"
            elif n >= seq.max_tokens or seq.length >= self._capacity():
                event.text += seq.stopper.feed(seq.decoder.decode(b"", final=True))[0] + seq.stopper.flush()
                event.finish_reason = "length"
        if event.finish_reason:
            self._finish(seq, event.finish_reason)
        return event

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.finished = seq.stats.finish_reason = reason
        held = self.running if seq in self.running else self.prefilling if seq in self.prefilling else None
        if held is not None:
            held.remove(seq)
            self._release_cache(seq)
            self._sort()  # a static cache refills a freed slot with its last one: keep slot order
        if self.draft is not None:
            self.draft.forget(seq.id)

    def _speculation_depths(self) -> list[int]:
        """Each running request's k for a speculative round: as many drafts as it would get alone
        (`num_speculative`, less near its `max_tokens`; 0: its round is a plain decode step), all
        short enough that the batch's longest row, which every row is padded to, fits the context."""
        room = min(self._capacity() - seq.length - 1 for seq in self.running)
        return [max(min(self.num_speculative, seq.max_tokens - len(seq.output_ids) - 1, room), 0)
                for seq in self.running]

    def _speculative(self, depths: list[int]) -> list[TokenEvent]:
        """One round for every running request: k drafts each (batched), one verification forward
        over all of them ([n, max k + 1] tokens, shorter rows padded), then each accepts its own drafts."""
        self._make_room(max(depths) + 1)
        batch = list(self.running)
        if not batch:
            return []
        if len(batch) < len(depths):  # some were preempted: the rest have room for as many tokens as before
            depths = [min(k, max(depths)) for k in self._speculation_depths()]
        width = max(depths) + 1
        drafts, dists = self.draft.propose([s.id for s in batch], [s.all_ids for s in batch], depths,
                                           [s.params for s in batch], [s.counts for s in batch],
                                           [s.generator for s in batch])
        rows = [[s.output_ids[-1], *d] for s, d in zip(batch, drafts)]
        ids = torch.tensor([row + row[-1:] * (width - len(row)) for row in rows], device=self.device)
        logits = self.runner(ids, self.cache.view([s.id for s in batch]), last_only=False)  # [n, width, V]
        events = []
        for i, seq in enumerate(batch):
            result = judge(self.draft, seq.id, seq.all_ids, drafts[i], dists[i], logits[i, :depths[i] + 1],
                           seq.params, seq.counts, seq.generator)
            # keep a prefix adapter's tokens, the sequence's (the last included) and the accepted drafts
            self.cache.truncate(seq.id, self._prefix_length() + seq.length + result.accepted)
            seq.stats.draft_tokens += result.proposed
            seq.stats.accepted_tokens += result.accepted
            for token, row in zip(result.tokens, result.logits):
                events.append(self._emit(seq, token, row))
                if seq.finished:
                    break
        return events

    # ------------------------------------------------------------------ conveniences
    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                 truncate: bool = False, stats: GenerationStats | None = None) -> Iterator[TokenEvent]:
        """Stream one request's events (for an engine serving one caller at a time).

        Stopping the iteration early (or Ctrl-C) cancels the request and frees its cache.
        """
        rid = self.add_request(prompt, params, truncate=truncate)
        seq = self.sequences[rid]
        try:
            while not seq.finished:
                for event in self.step():
                    if event.request_id == rid:
                        yield event
        finally:
            if not seq.finished:
                self.cancel(rid)
            if stats is not None:
                for name in stats.__dataclass_fields__:
                    setattr(stats, name, getattr(seq.stats, name))
            self.release(rid)

    def complete(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 truncate: bool = False) -> list[Completion]:
        """Run many requests to the end with continuous batching; results in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp, truncate=truncate) for p, sp in zip(prompts, params)]
        texts: dict[int, list[str]] = {i: [] for i in ids}
        logprobs: dict[int, list[float]] = {i: [] for i in ids}
        while self.has_unfinished():
            for event in self.step():
                if event.request_id in texts:
                    texts[event.request_id].append(event.text)
                    if event.logprob is not None:
                        logprobs[event.request_id].append(event.logprob)
        results = []
        for i in ids:
            seq = self.sequences.pop(i)
            results.append(Completion(i, seq.prompt_ids, seq.output_ids, "".join(texts[i]), seq.finished,
                                      seq.stats, logprobs[i] if seq.params.logprobs else None))
        return results

    def beam_search(self, prompt: str | Sequence[int], *, width: int, max_tokens: int = 256,
                    length_penalty: float = 1.0, early_stopping: bool = False):
        """The `width` best replies by total log-probability (see `lmforge.infer.beam`)."""
        from lmforge.infer.beam import beam_search

        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise GenerationError("the prompt is empty")
        if self.runner.prefix is not None:
            raise GenerationError("beam search does not run a prefix-tuning adapter yet (lmforge.infer.beam "
                                  "fills a cache of its own, without the prefix); sample or decode greedily")
        if len(prompt_ids) + max_tokens > self.context:
            raise GenerationError(f"the prompt has {len(prompt_ids)} tokens and {max_tokens} new tokens were "
                                  f"asked for, but the context is {self.context} tokens")
        self.runner.refresh()
        return beam_search(self.runner, prompt_ids, width=width, max_tokens=max_tokens, stop_ids=self.eos_ids,
                           length_penalty=length_penalty, early_stopping=early_stopping)


__all__ = ["CacheFullError", "Completion", "Engine", "GenerationError", "GenerationStats", "TokenEvent"]
