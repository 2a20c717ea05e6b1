"""Preference data: rows as trl reads them, tokenized into the pair batches every preference loss reads.

1. Rows (`read_preferences`), JSONL or a ``.json`` list, one kind per file:
   - paired, standard: ``{"prompt": str, "chosen": str, "rejected": str}``;
   - paired, conversational: ``prompt`` a list of messages, ``chosen``/``rejected`` lists of
     assistant messages; without ``prompt``, chosen and rejected are whole conversations and
     the prompt is the messages they share at the start (trl's "implicit prompt");
   - unpaired (KTO): ``{"prompt", "completion", "label": bool}``, strings or messages.
   A bad row is a `PreferenceDataError` naming the file, the line and the problem.
2. Tokens (`encode_pair`, `encode_completion`), by trl's rule: the prompt alone and the
   prompt followed by each completion are tokenized (text: as one string, the completion
   ending in EOS; messages: rendered by the chat template, the prompt with the generation
   prompt), and the completion is whatever follows the longest common prefix of the two,
   so a token merged across the seam stays whole. Special-token text inside a message or a
   string is read as ordinary text, as in SFT.
3. Truncation keeps the start (trl 1.16's default and only non-deprecated mode): each
   sequence is cut to its first `max_length` tokens, which cuts the completion and keeps the
   whole prompt. A pair whose prompt alone fills `max_length` has no completion token left
   to compare and is dropped; both are counted.
4. The held-out split (`split_preferences`) hashes the prompt, so every pair about one
   prompt lands on the same side: no prompt is trained on and evaluated.
5. `PreferenceSource` (a `BatchSource`): each epoch shuffles the examples with (seed, epoch);
   a row is one example, padded to the longest sequence of its batch. Batches follow the
   pair-batch convention (see `PreferenceSource.batch`). The position is (epoch, index), so a
   resumed run draws exactly the batches the first run would have.
6. `cache_reference_logps` runs the frozen reference model once over every example; from
   then on each batch carries its reference log-probs and training needs no second model.

KTO's reference point is a KL estimate from mismatched pairs: prompt i with the completion of
example i-1 (the first with the last's). trl rotates completions the same way within each
chunk of a batch's size; here the rotation runs over the whole file, once, so every unpaired
example carries its mismatched completion from the start and its reference log-prob is
cached like the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lmforge.train.batch import IGNORE_INDEX, Batch
from lmforge.tune.datasets import json_rows
from lmforge.tune.sft_data import hash_split

__all__ = ["EncodedCompletion", "EncodedPair", "LabelledCompletion", "PreferenceDataError", "PreferencePair",
           "PreferenceSource", "PreferenceStats", "cache_reference_logps", "encode_completion", "encode_pair",
           "encode_preferences", "example_from_row", "load_preferences", "read_preferences",
           "split_preferences"]

Message = dict[str, str]
Text = str | list[Message]  # a string, or messages (conversational)
ROLES = ("system", "user", "assistant", "tool")


class PreferenceDataError(ValueError):
    """Preference data that cannot be trained on: a bad row, mixed kinds, nothing left after
    truncation, a resume from other data, batches without cached reference log-probs."""


@dataclass(frozen=True)
class PreferencePair:
    """A prompt, a preferred completion and a dispreferred one (all strings, or all messages)."""

    prompt: Text
    chosen: Text
    rejected: Text


@dataclass(frozen=True)
class LabelledCompletion:
    """One completion judged on its own (KTO): desirable (label True) or not."""

    prompt: Text
    completion: Text
    label: bool


Example = PreferencePair | LabelledCompletion


# ============================================================================ 1. rows
def example_from_row(row: Any) -> Example:
    """One JSON row -> a pair or a labelled completion; a ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    if "chosen" in row or "rejected" in row:
        return _pair(row)
    if "completion" in row or "label" in row:
        return _labelled(row)
    keys = ", ".join(sorted(row)) or "none"
    raise ValueError(f"a row needs 'prompt'+'chosen'+'rejected' (pairs) or 'prompt'+'completion'+'label' "
                     f"(unpaired) (it has: {keys})")


def _pair(row: dict[str, Any]) -> PreferencePair:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise ValueError(f"missing {key!r}")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row:  # implicit prompt: the messages both conversations open with
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise ValueError("missing 'prompt' (only conversational chosen/rejected may leave it implicit)")
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt: Text = chosen[:shared]
        chosen, rejected = chosen[shared:], rejected[shared:]
        if not prompt:
            raise ValueError("no 'prompt', and chosen and rejected share no opening message to use as one")
    else:
        prompt = row["prompt"]
    conversational = isinstance(prompt, list)
    prompt = _text_or_messages(prompt, "prompt", conversational)
    chosen = _completion(chosen, "chosen", conversational)
    rejected = _completion(rejected, "rejected", conversational)
    return PreferencePair(prompt, chosen, rejected)


def _labelled(row: dict[str, Any]) -> LabelledCompletion:
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise ValueError(f"missing {key!r}")
    if not isinstance(row["label"], bool):
        raise ValueError(f"'label' must be true or false, not {row['label']!r}")
    conversational = isinstance(row["prompt"], list)
    return LabelledCompletion(_text_or_messages(row["prompt"], "prompt", conversational),
                              _completion(row["completion"], "completion", conversational), row["label"])


def _text_or_messages(value: Any, field: str, conversational: bool) -> Text:
    if conversational:
        return _messages(value, field)
    if not isinstance(value, str):
        raise ValueError(f"{field!r} must be a string (or, in a conversational row, a list of messages), "
                         f"not {type(value).__name__}")
    return value


def _completion(value: Any, field: str, conversational: bool) -> Text:
    if conversational != isinstance(value, list):
        want = "a list of messages" if conversational else "a string"
        raise ValueError(f"{field!r} must be {want} like the prompt (a row is all strings or all messages)")
    if not conversational:
        return _text_or_messages(value, field, False)
    messages = _messages(value, field)
    if messages[0]["role"] != "assistant":
        raise ValueError(f"{field!r} must start with an assistant message, not {messages[0]['role']!r}")
    return messages


def _messages(raw: Any, field: str) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{field!r} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where} has unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"{where} ({role}) content must be a string, not {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def read_preferences(path: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of a JSONL file (one row a line) or a ``.json`` list: all pairs or all unpaired."""
    path = Path(path)
    examples: list[Example] = []
    for where, row in json_rows(path, PreferenceDataError):
        try:
            example = example_from_row(row)
            if examples and type(example) is not type(examples[0]):
                raise ValueError(f"this row is {_kind(example)}, the rows before it {_kind(examples[0])}")
            if examples and _is_chat(example) != _is_chat(examples[0]):
                raise ValueError("a file mixes string rows and conversational rows")
        except ValueError as err:
            raise PreferenceDataError(f"{where}: {err}") from None
        examples.append(example)
        if len(examples) == limit:
            break
    if not examples:
        raise PreferenceDataError(f"{path}: no preference row in it (an empty file?)")
    return examples


def _kind(example: Example) -> str:
    return "paired" if isinstance(example, PreferencePair) else "unpaired"


def _is_chat(example: Example) -> bool:
    return isinstance(example.prompt, list)


def load_preferences(spec: str | Path, limit: int | None = None, *, quiet: bool = False) -> list[Example]:
    """Examples from a file or a named sample (`lmforge.align.champ.PREFERENCE_SAMPLES`); a file wins."""
    from lmforge.align.champ import PREFERENCE_SAMPLES, preference_sample_path

    path = Path(spec).expanduser()
    if path.exists():
        return read_preferences(path, limit)
    if str(spec) in PREFERENCE_SAMPLES:
        return read_preferences(preference_sample_path(str(spec), quiet=quiet), limit)
    raise PreferenceDataError(f"{str(spec)!r} is neither an existing file nor a preference sample "
                              f"({', '.join(PREFERENCE_SAMPLES)})")


# ============================================================================ 4. the held-out split
def _prompt_key(example: Example) -> str:
    return json.dumps(example.prompt, ensure_ascii=False, sort_keys=True)


def split_preferences(examples: Sequence[Example], val_fraction: float, seed: int = 0
                      ) -> tuple[list[Example], list[Example]]:
    """(train, val) by a hash of (seed, the prompt) (`hash_split`): all pairs about one prompt
    land together, so a prompt seen in training is never scored as held out."""
    return hash_split(examples, _prompt_key, val_fraction, seed, error=PreferenceDataError)


# ============================================================================ 2-3. tokens
class PreferenceTokenizer(Protocol):
    """What preference data needs of a tokenizer (lmforge's `Tokenizer` is one)."""

    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool | None = None,
               allow_special: bool = True) -> list[int]: ...

    def encode_chat_prompt(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
                           ) -> list[int]: ...


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a pair: the shared prompt and each completion (the sequences are prompt + completion)."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


@dataclass(frozen=True)
class EncodedCompletion:
    """Token ids of an unpaired example, its label, and the mismatched completion for KTO's KL estimate."""

    prompt: np.ndarray
    completion: np.ndarray
    label: bool
    kl_completion: np.ndarray


def _ids(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _prompt_and_completions(tokenizer: PreferenceTokenizer, prompt: Text, completions: Sequence[Text]
                            ) -> tuple[list[int], list[list[int]]]:
    """trl's rule: tokenize the prompt and each prompt + completion; completions start where they diverge."""
    if isinstance(prompt, list):
        prompt_ids = tokenizer.encode_chat_prompt(prompt, add_generation_prompt=True)
        full = [tokenizer.encode_chat_prompt(prompt + list(c), add_generation_prompt=False)
                for c in completions]
    else:
        if tokenizer.eos_token_id is None:
            raise PreferenceDataError("the tokenizer has no EOS token to end string completions with")
        prompt_ids = tokenizer.encode(prompt, add_eos=False, allow_special=False)
        eos = [tokenizer.eos_token_id]
        full = [tokenizer.encode(prompt + str(c), add_eos=False, allow_special=False) + eos
                for c in completions]
    shared = min(_common_prefix(prompt_ids, ids) for ids in full)
    return prompt_ids[:shared], [ids[shared:] for ids in full]


def encode_pair(tokenizer: PreferenceTokenizer, pair: PreferencePair) -> EncodedPair:
    prompt, (chosen, rejected) = _prompt_and_completions(tokenizer, pair.prompt, [pair.chosen, pair.rejected])
    return EncodedPair(_ids(prompt), _ids(chosen), _ids(rejected))


def encode_completion(tokenizer: PreferenceTokenizer, example: LabelledCompletion
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, completion ids) of an unpaired example (its KL partner is set by `encode_preferences`)."""
    prompt, (completion,) = _prompt_and_completions(tokenizer, example.prompt, [example.completion])
    return _ids(prompt), _ids(completion)


def encode_preferences(tokenizer: PreferenceTokenizer, examples: Sequence[Example], max_length: int
                       ) -> tuple[list[EncodedPair] | list[EncodedCompletion], int, int]:
    """Encoded examples cut to `max_length` (keep-start), and how many were truncated and dropped.

    Unpaired examples get their KL partner here: example i is paired with the completion of
    example i-1 (the last with the first's), as trl rotates completions within a batch.
    """
    if max_length < 2:
        raise PreferenceDataError(f"max_length must be at least 2, got {max_length}")
    if not examples:
        raise PreferenceDataError("no preference example to encode")
    truncated = dropped = 0
    if isinstance(examples[0], PreferencePair):
        pairs: list[EncodedPair] = []
        for example in examples:
            pair = encode_pair(tokenizer, example)  # type: ignore[arg-type]
            if len(pair.prompt) >= max_length:
                dropped += 1
                continue
            room = max_length - len(pair.prompt)
            truncated += len(pair.chosen) > room or len(pair.rejected) > room
            pairs.append(EncodedPair(pair.prompt, pair.chosen[:room], pair.rejected[:room]))
        return pairs, truncated, dropped
    encoded = [encode_completion(tokenizer, example) for example in examples]  # type: ignore[arg-type]
    singles: list[EncodedCompletion] = []
    for i, (example, (prompt, completion)) in enumerate(zip(examples, encoded, strict=True)):
        if len(prompt) >= max_length:
            dropped += 1
            continue
        room = max_length - len(prompt)
        truncated += len(completion) > room
        kl_completion = encoded[i - 1][1][:room]
        singles.append(EncodedCompletion(prompt, completion[:room], bool(example.label), kl_completion))
    return singles, truncated, dropped


# ============================================================================ 5. batches
def _sequence(prompt: np.ndarray, completion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids of prompt + completion and next-token labels on the completion only (Batch's SFT convention)."""
    ids = np.concatenate([prompt, completion])
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    start = len(prompt)  # the first completion token is predicted at position start - 1
    labels[max(start - 1, 0):len(ids) - 1] = ids[max(start, 1):]
    return ids, labels


def _pad(rows: Sequence[np.ndarray], width: int, value: int) -> torch.Tensor:
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return torch.from_numpy(out)


@dataclass(frozen=True)
class PreferenceStats:
    examples: int
    paired: bool
    tokens: int  # real tokens over every sequence (both sides of a pair)
    completion_tokens: int  # those that take a loss
    truncated: int
    dropped: int

    def describe(self) -> str:
        kind = "pairs" if self.paired else "unpaired completions"
        return (f"{self.examples:,} {kind}, {self.tokens:,} tokens ({self.completion_tokens:,} in "
                f"completions), {self.truncated:,} truncated, {self.dropped:,} dropped")


class PreferenceSource:
    """Encoded preference examples as a resumable `BatchSource`, one example per row.

    Paired batches: `input_ids`/`labels` are prompt + chosen; extras `rejected_ids`,
    `rejected_labels` (prompt + rejected, the same width), `chosen_length`, `rejected_length`
    (real tokens per row) and, once cached, `ref_chosen_logps`, `ref_rejected_logps`.
    Unpaired batches: `input_ids`/`labels` are prompt + completion; extras `kto_label` (bool),
    `kl_ids`, `kl_labels` (prompt + the mismatched completion), `length`, `kl_length` and,
    once cached, `ref_logps`, `ref_kl_logps`. Rows are padded with `pad_id` to the longest
    sequence in the batch; padding takes no loss.
    """

    def __init__(self, examples: Sequence[EncodedPair] | Sequence[EncodedCompletion], pad_id: int, *,
                 seed: int = 0, shuffle: bool = True, truncated: int = 0, dropped: int = 0) -> None:
        if not examples:
            why = f" ({dropped:,} dropped: the prompt fills max_length)" if dropped else ""
            raise PreferenceDataError(f"no preference example to train on{why}")
        self.examples = list(examples)
        self.paired = isinstance(self.examples[0], EncodedPair)
        self.pad_id, self.seed, self.shuffle = pad_id, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._order_for(0)
        self.reference_logps: np.ndarray | None = None  # [N, 2] float32 once cached
        sides = [self._completions(k) for k in range(len(self.examples))]
        self.stats = PreferenceStats(
            examples=len(self.examples), paired=self.paired,
            tokens=sum(len(e.prompt) * len(s) + sum(map(len, s)) for e, s in zip(self.examples, sides)),
            completion_tokens=sum(sum(map(len, s)) for s in sides), truncated=truncated, dropped=dropped)
        self.fingerprint = self._fingerprint()

    @classmethod
    def from_examples(cls, tokenizer: PreferenceTokenizer, examples: Sequence[Example], max_length: int, *,
                      seed: int = 0, shuffle: bool = True) -> PreferenceSource:
        """Encode (trl's tokenization, keep-start truncation) and wrap; pads with the pad id, else EOS."""
        encoded, truncated, dropped = encode_preferences(tokenizer, examples, max_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(encoded, pad_id if pad_id is not None else 0, seed=seed, shuffle=shuffle,
                   truncated=truncated, dropped=dropped)

    def __len__(self) -> int:
        return len(self.examples)

    def _completions(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        e = self.examples[k]
        return (e.chosen, e.rejected) if isinstance(e, EncodedPair) else (e.completion, e.kl_completion)

    def _order_for(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()

    # ------------------------------------------------------------------ rows -> Batch
    def batch(self, indices: Sequence[int]) -> Batch:
        """The examples `indices` as one Batch (the convention in the class docstring)."""
        first, second = [], []
        for k in indices:
            prompt = self.examples[k].prompt
            a, b = self._completions(k)
            first.append(_sequence(prompt, a))
            second.append(_sequence(prompt, b))
        width = max(len(ids) for ids, _ in first + second)
        lengths = [torch.tensor([len(ids) for ids, _ in side], dtype=torch.int64) for side in (first, second)]
        other, first_length = ("rejected", "chosen_length") if self.paired else ("kl", "length")
        extras: dict[str, torch.Tensor] = {
            f"{other}_ids": _pad([ids for ids, _ in second], width, self.pad_id),
            f"{other}_labels": _pad([labels for _, labels in second], width, IGNORE_INDEX),
            first_length: lengths[0],
            f"{other}_length": lengths[1],
        }
        if not self.paired:
            extras["kto_label"] = torch.tensor([self.examples[k].label for k in indices], dtype=torch.bool)
        if self.reference_logps is not None:
            ref = torch.from_numpy(self.reference_logps[list(indices)])
            a, b = ("ref_chosen_logps", "ref_rejected_logps") if self.paired else \
                ("ref_logps", "ref_kl_logps")
            extras[a], extras[b] = ref[:, 0].contiguous(), ref[:, 1].contiguous()
        return Batch(_pad([ids for ids, _ in first], width, self.pad_id),
                     _pad([labels for _, labels in first], width, IGNORE_INDEX), None, extras)

    # ------------------------------------------------------------------ BatchSource
    def next_batch(self, rows: int) -> Batch:
        chosen = []
        for _ in range(rows):
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._order_for(self.epoch)
            chosen.append(self._order[self.index])
            self.index += 1
        return self.batch(chosen)

    def first_batches(self, rows: int, max_batches: int) -> Iterator[Batch]:
        """The examples in their given order, `rows` at a time; the position stays."""
        count = min(len(self.examples), rows * max_batches)
        for begin in range(0, count, rows):
            yield self.batch(range(begin, min(begin + rows, count)))

    def set_reference_logps(self, logps: np.ndarray) -> None:
        """Reference log-probs [N, 2] (chosen, rejected) or (completion, KL completion), in example order."""
        logps = np.asarray(logps, dtype=np.float32)
        if logps.shape != (len(self.examples), 2):
            raise PreferenceDataError(f"reference log-probs must be [{len(self.examples)}, 2], got "
                                      f"{list(logps.shape)}")
        self.reference_logps = logps

    # ------------------------------------------------------------------ resumable position
    def _fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=8)
        for k, example in enumerate(self.examples):
            for ids in (example.prompt, *self._completions(k)):
                digest.update(np.asarray(len(ids), dtype=np.int64).tobytes())
                digest.update(ids.tobytes())
            if isinstance(example, EncodedCompletion):
                digest.update(bytes([example.label]))
        return digest.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "examples": len(self.examples),
                "paired": self.paired, "shuffle": self.shuffle, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ours = {k: v for k, v in self.state_dict().items() if k not in ("epoch", "index")}
        theirs = {k: state.get(k) for k in ours}
        if theirs != ours:
            changed = ", ".join(f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in ours if theirs[k] != ours[k])
            raise PreferenceDataError(f"the checkpoint's data position is for other preference data "
                                      f"({changed}): the rows, tokenizer, template, max_length or seed "
                                      "changed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._order_for(self.epoch)


# ============================================================================ 6. reference log-probs
@torch.no_grad()
def cache_reference_logps(source: PreferenceSource, ref_model: nn.Module, *, rows: int = 8,
                          device: torch.device | str | None = None) -> np.ndarray:
    """The reference model's log-prob of both sequences of every example, computed once and stored in
    `source` (its batches then carry them); also returned, [N, 2] float32.

    The log-probs are a sum over the completion, so they do not depend on which other rows
    share the batch or how wide the padding is: caching them is exact.
    """
    from lmforge.align.dpo import sequence_logps

    device = torch.device(device) if device is not None else next(ref_model.parameters()).device
    was_training = ref_model.training
    ref_model.eval()
    out = np.zeros((len(source), 2), dtype=np.float32)
    second = "rejected" if source.paired else "kl"
    try:
        for begin in range(0, len(source), rows):
            indices = range(begin, min(begin + rows, len(source)))
            batch = source.batch(indices).to(device)
            ids = torch.cat([batch.input_ids, batch.extras[f"{second}_ids"]])  # both sides in one forward
            labels = torch.cat([batch.labels, batch.extras[f"{second}_labels"]])
            logps = sequence_logps(ref_model, ids, labels).float().cpu().numpy()
            n = len(indices)
            out[begin:begin + n, 0], out[begin:begin + n, 1] = logps[:n], logps[n:]
    finally:
        ref_model.train(was_training)
    source.set_reference_logps(out)
    return out
