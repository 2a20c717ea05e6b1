"""`EvalModel`: a loaded lmforge model asked lm-evaluation-harness's three questions.

Every task, ours and lm-eval's, reduces to these (lm-eval's `LM` API, same names, same
conventions, so that scores agree with lm-eval's on the same model):

- `loglikelihood([(context, continuation)])` -> [(sum log p(continuation | context), greedy)]:
  multiple choice (MMLU scores " A".." D" after the question).
- `loglikelihood_rolling([text])` -> [sum log p(text)]: perplexity and bits per byte.
- `generate_until([(context, gen_kwargs)])` -> [text]: maths, QA, translation, code.

Tokenization follows lm-eval's `HFLM` exactly, because the boundary decides the score:
trailing spaces of a context move to the continuation ("Answer:" + " A", never "Answer: "
+ "A"); the continuation's tokens are those of tokenize(context + continuation) after
tokenize(context)'s length; an empty context becomes the prefix token (BOS, else EOS);
inputs longer than the context window keep their last tokens. Rolling log-likelihoods
use lm-eval's disjoint windows: the text after the prefix token, cut into windows of
`max_length` tokens, each window's first token predicted from the last of the window
before.

Scoring goes through `lmforge.eval.scoring` (deduplicated, shared prefixes run once);
generation goes through the `Engine` (continuous batching, KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.eval.scoring import Progress, Scorer
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

__all__ = ["EvalModel", "Progress", "rolling_windows"]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int
                    ) -> Iterator[tuple[list[int], list[int]]]:
    """lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`:
    (context, continuation) pairs that together predict every token of `tokens` once."""
    tokens = list(tokens)
    if not tokens:
        return
    first = min(max_length, len(tokens))
    yield [prefix_token], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, max_length)
        end = predicted + count
        window = tokens[max(end - max_length - 1, 0):end - 1]
        yield window[:len(window) - (count - 1)], tokens[end - count:end]
        predicted = end


class EvalModel:
    """A model + tokenizer with the lm-eval `LM` API (see the module docstring).

    `max_length` is the context window scored and generated in (default: the model's);
    `batch_tokens` bounds the padded tokens of one scoring forward pass; `max_batch_size`
    is the number of generations run side by side.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, stop_ids: Sequence[int] = (),
                 max_length: int | None = None, batch_tokens: int = 4096, max_batch_size: int = 16,
                 name: str = "") -> None:
        if getattr(model, "prefix_tuning", None) is not None:
            raise ValueError("a prefix-tuning adapter is not supported by lmforge eval yet (its keys and "
                             "values live in the engine's cache); use a LoRA or IA3 adapter")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.max_length = min(max_length or model.config.max_seq_len, model.config.max_seq_len)
        self.max_batch_size = max_batch_size
        self.name = name
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.scorer = Scorer(model, batch_tokens=batch_tokens, pad_id=pad)
        self._engine: Engine | None = None

    @classmethod
    def load(cls, spec: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             quantize: str | None = None, prepare: Callable[[Transformer], object] | None = None,
             **kwargs: Any) -> EvalModel:
        """A checkpoint folder, run folder, quantized folder, `.gguf` file or sample name (`smollm2`).

        `prepare(model)` runs on the loaded model first (the CLI puts `--adapter` on it
        here); `quantize` ("int8", "int4") then quantizes its linear layers as `generate` does."""
        engine = Engine.from_pretrained(spec, dtype=dtype, device=device, quantize=quantize, prepare=prepare)
        return cls(engine.model, engine.tokenizer, stop_ids=sorted(engine.eos_ids), name=str(engine.path),
                   **kwargs)

    # ------------------------------------------------------------------ tokens
    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes (lm-eval: BOS, else EOS)."""
        token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.tokenizer.eos_token_id
        if token is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
        return token

    def tok_encode(self, text: str) -> list[int]:
        """The tokenizer's default special tokens (as HF's `add_special_tokens=True`), none if the
        text already starts with the prefix token's text."""
        prefix = self.tokenizer.decode([self.prefix_token_id])
        return self.tokenizer.encode(text, add_bos=False if prefix and text.startswith(prefix) else None)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split of context + continuation into tokens (see the module docstring)."""
        if context == "":
            tokens = self.tokenizer.encode(continuation, add_bos=False)
            if not tokens:
                raise ValueError("an empty context with an empty continuation has nothing to score")
            prefix = self.prefix_token_id
            return ([prefix], tokens) if tokens[0] != prefix else (tokens[:1], tokens[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    def _request(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[list[int], list[int]]:
        """lm-eval's model input: (context + continuation)[-(max_length + 1):][:-1]."""
        if not continuation_ids:
            raise ValueError("a continuation must add at least one token to its context")
        whole = (context_ids + continuation_ids)[-(self.max_length + 1):]
        return whole[:-1], continuation_ids

    # ------------------------------------------------------------------ the three questions
    def loglikelihood(self, requests: Sequence[tuple[str, str]], *,
                      progress: Progress | None = None) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding would produce it) per request."""
        pairs = [self.encode_pair(context, continuation) for context, continuation in requests]
        return self.loglikelihood_tokens(pairs, progress=progress)

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], *,
                             progress: Progress | None = None) -> list[tuple[float, bool]]:
        """`loglikelihood` on (context ids, continuation ids) pairs already tokenized."""
        return self.scorer.score([self._request(c, t) for c, t in pairs], progress=progress)

    def loglikelihood_rolling(self, texts: Sequence[str], *, progress: Progress | None = None) -> list[float]:
        """Sum of log p over every token of each text (disjoint windows of `max_length`)."""
        return [total for total, _count in self.rolling_token_scores(
            [self.tok_encode(t) for t in texts], progress=progress)]

    def rolling_token_scores(self, documents: Sequence[Sequence[int]], *,
                             progress: Progress | None = None) -> list[tuple[float, int]]:
        """(sum log p, tokens scored) per document of token ids."""
        pairs, owner = [], []
        for d, tokens in enumerate(documents):
            for window in rolling_windows(tokens, self.prefix_token_id, self.max_length):
                pairs.append(window)
                owner.append(d)
        scores = self.loglikelihood_tokens(pairs, progress=progress)
        totals = [[0.0, 0] for _ in documents]
        for d, (_context, continuation), (logp, _greedy) in zip(owner, pairs, scores):
            totals[d][0] += logp
            totals[d][1] += len(continuation)
        return [(float(t), int(n)) for t, n in totals]

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]], *,
                       progress: Progress | None = None) -> list[str]:
        """Each context's continuation, cut at the first of gen_kwargs["until"] (lm-eval's keys:
        until, max_gen_toks (256), do_sample, temperature, top_p, top_k, seed)."""
        engine = self.engine()
        ids = []
        for context, kwargs in requests:
            params = sampling_params(kwargs)
            room = self.max_length - (params.max_tokens or 0)
            if room < 1:
                raise ValueError(f"max_gen_toks {params.max_tokens} leaves no room for a context in "
                                 f"{self.max_length} tokens")
            prompt = self.tok_encode(context)[-room:] if context else [self.prefix_token_id]
            ids.append(engine.add_request(prompt, params))
        texts: dict[int, list[str]] = {i: [] for i in ids}
        done = 0
        while engine.has_unfinished():
            for event in engine.step():
                if event.request_id in texts:
                    texts[event.request_id].append(event.text)
                    if event.finish_reason is not None:
                        done += 1
                        if progress is not None:
                            progress(done, len(ids))
        for i in ids:
            engine.release(i)
        return ["".join(texts[i]) for i in ids]

    def engine(self) -> Engine:
        """The generation engine over this model (made on first use)."""
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, stop_ids=self.stop_ids,
                                  max_batch_size=self.max_batch_size, max_seq_len=self.max_length)
        return self._engine


def sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
    """lm-eval's gen_kwargs as `SamplingParams`: greedy unless do_sample (or a temperature > 0 without it)."""
    known = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown generation arguments {unknown}; known: {sorted(known)}")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    if kwargs.get("do_sample") is False:
        temperature = 0.0
    elif kwargs.get("do_sample") and temperature == 0.0:
        temperature = 1.0
    return SamplingParams(temperature=temperature, top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                          top_k=int(kwargs.get("top_k", 0) or 0), seed=kwargs.get("seed"),
                          max_tokens=int(kwargs.get("max_gen_toks", 256)), stop=tuple(until))
