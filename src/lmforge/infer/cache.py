"""KV caches: attention over the past without recomputing it.

Without a cache, generating token n re-runs the model over all n previous tokens: O(n^2)
work for a whole reply. The keys and values of past tokens never change (attention is
causal), so we keep them and each decode step computes only the new token's
projections. Memory: 2 (K and V) x layers x kv_heads x head_dim x bytes per value, for
every cached token of every sequence.

Two layouts, one interface:

- `StaticKVCache` preallocates `max_len` tokens for each of `batch_size` *slots*
  ([n_layers, slots, kv_heads, max_len, head_dim]). Attention reads a slot's keys in
  place, with no copy, which makes it the fastest layout; the price is that every slot
  reserves memory for its longest possible sequence.
- `PagedKVCache` keeps one pool of fixed-size *blocks* shared by all sequences; each
  sequence owns a list of blocks (its block table) that grows as it does, and gives them
  back when it ends. Memory follows the tokens actually cached, so many more sequences
  fit; the price is a gather of each sequence's blocks into contiguous keys and values
  for attention in every layer (PyTorch has no paged-attention kernel on CPU).

Both hand the model a *view* of some of their sequences, which implements the model's
`KVCache` protocol (`key_positions`, `update`, `advance`; see
`lmforge.model.layers.attention`). A view also carries `prior_lengths`, the tokens each
row held before this forward pass, which `ModelRunner` uses to choose the cheapest
attention call. `append` caches keys and values that no forward pass computed: a
prefix-tuning adapter's virtual tokens, written before a sequence's prompt.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from lmforge.model.config import ModelConfig


class CacheFullError(ValueError):
    """A sequence does not fit: its slot is full, or the block pool has no free block."""


def _dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    weight = model.embed.weight if hasattr(model, "embed") else next(model.parameters())
    return weight.dtype, weight.device


def _append(cache: StaticKVCache | PagedKVCache, seq: Hashable, keys: torch.Tensor,
            values: torch.Tensor) -> None:
    """Write n tokens' keys and values ([n_layers, kv_heads, n, head_dim]) after `seq`'s cached
    tokens, at the positions that follow, as a forward pass over them would have."""
    view = cache.view([seq])
    start, n = view.prior_lengths[0], keys.shape[2]
    positions = torch.arange(start, start + n, device=cache.key_pos.device)[None]
    view.key_positions(positions)
    for layer in range(keys.shape[0]):
        view.update(layer, keys[layer][None].to(cache.keys.dtype), values[layer][None].to(cache.values.dtype))
    view.advance(positions)


# ---------------------------------------------------------------------------------------- static
class StaticKVCache:
    """Preallocated slots of `max_len` tokens each.

    Used two ways: directly as the model's `KVCache` for a batch that is prefilled and
    decoded together (every slot is one row of the batch), or by the engine, which gives
    each request a slot with `allocate` and passes `view(ids)` to the model.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 lazy: bool = False) -> None:
        """`batch_size` slots of `max_len` tokens. With `lazy=True` only one slot of up to 256
        tokens is allocated at first, and both sizes double when a sequence needs more (up to
        those limits), so an engine's memory follows the longest sequence it actually holds."""
        self.n_layers, self.kv_heads, self.head_dim = config.n_layers, config.kv_heads, config.dim_per_head
        self.batch_size, self.max_len = batch_size, max_len
        slots, length = (1, min(max_len, 256)) if lazy else (batch_size, max_len)
        self.keys = torch.zeros(self._shape(slots, length), dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        # the position of every cached key (-1: empty); the model builds its mask from these
        self.key_pos = torch.full((slots, length), -1, dtype=torch.long, device=device)
        self.lengths = [0] * slots
        self._slot_of: dict[Hashable, int] = {}
        self._whole: _SlotRows | None = None

    def _shape(self, slots: int, length: int) -> tuple[int, ...]:
        return (self.n_layers, slots, self.kv_heads, length, self.head_dim)

    @torch.inference_mode(False)  # growing happens mid-forward; the cache must stay writable after it
    def _grow(self, slots: int, length: int) -> None:
        """Reallocate to at least `slots` x `length` (doubling), keeping what is cached."""
        old_slots, old_len = self.key_pos.shape
        slots = min(self.batch_size, max(slots, 2 * old_slots if slots > old_slots else old_slots))
        length = min(self.max_len, max(length, 2 * old_len if length > old_len else old_len))
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(self._shape(slots, length))
            new[:, :old_slots, :, :old_len] = old
            setattr(self, name, new)
        key_pos = self.key_pos.new_full((slots, length), -1)
        key_pos[:old_slots, :old_len] = self.key_pos
        self.key_pos = key_pos
        self.lengths += [0] * (slots - old_slots)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int, *,
                  lazy: bool = False) -> StaticKVCache:
        dtype, device = _dtype_device(model)
        return cls(model.config, batch_size, max_len, dtype=dtype, device=device, lazy=lazy)

    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return self.keys.numel() * self.keys.element_size() * 2

    @property
    def length(self) -> int:
        """The shared length when the cache is used as one batch."""
        if len(set(self.lengths)) != 1:
            raise ValueError(f"rows have different lengths: {self.lengths}")
        return self.lengths[0]

    # -- the model's KVCache protocol, over all slots (one batch decoded together)
    @property
    def prior_lengths(self) -> list[int]:
        return list(self.lengths)

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.shape[0] != len(self.lengths):
            raise ValueError(f"batch of {positions.shape[0]} rows for a cache of {len(self.lengths)}")
        self._whole = _SlotRows(self, 0, len(self.lengths))
        return self._whole.key_positions(positions)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._whole.update(layer, k, v)

    def advance(self, positions: torch.Tensor) -> None:
        self._whole.advance(positions)

    # -- slots for the engine
    def allocate(self, seq: Hashable) -> None:
        free = len(self._slot_of)  # slots in use are always 0..n-1 (see `free`)
        if free >= self.batch_size:
            raise CacheFullError(f"all {self.batch_size} slots are in use")
        if free >= self.key_pos.shape[0]:
            self._grow(free + 1, 0)
        self._slot_of[seq] = free
        self._clear(free, 0)

    def free(self, seq: Hashable) -> None:
        """Release a sequence's slot at once; the last occupied slot moves into the gap, so
        the sequences in use always fill slots 0..n-1 and a batch of them is a plain slice."""
        slot = self._slot_of.pop(seq)
        last = max(self._slot_of.values(), default=-1)
        if last > slot:
            mover = next(s for s, i in self._slot_of.items() if i == last)
            n = self.lengths[last]
            self.keys[:, slot, :, :n] = self.keys[:, last, :, :n]
            self.values[:, slot, :, :n] = self.values[:, last, :, :n]
            self.key_pos[slot] = self.key_pos[last]
            self.lengths[slot] = n
            self._slot_of[mover] = slot
            slot = last
        self._clear(slot, 0)

    def fork(self, source: Hashable, seq: Hashable) -> None:
        """Give `seq` a slot holding a copy of everything `source` has cached (a shared prompt)."""
        self.allocate(seq)
        src, dst = self._slot_of[source], self._slot_of[seq]
        n = self.lengths[src]
        self.keys[:, dst, :, :n] = self.keys[:, src, :, :n]
        self.values[:, dst, :, :n] = self.values[:, src, :, :n]
        self.key_pos[dst, :n] = self.key_pos[src, :n]
        self.lengths[dst] = n

    def _clear(self, slot: int, length: int) -> None:
        self.key_pos[slot, length:] = -1
        self.lengths[slot] = length

    def truncate(self, seq: Hashable, length: int) -> None:
        """Forget everything after the first `length` tokens (rejected speculative tokens)."""
        slot = self._slot_of[seq]
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate {self.lengths[slot]} tokens to {length}")
        self._clear(slot, length)

    def seq_length(self, seq: Hashable) -> int:
        return self.lengths[self._slot_of[seq]]

    def append(self, seq: Hashable, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Cache precomputed keys and values ([n_layers, kv_heads, n, head_dim]) after `seq`'s tokens."""
        _append(self, seq, keys, values)

    def capacity(self, seq: Hashable) -> int:
        return self.max_len

    def order(self, seq: Hashable) -> int:
        """Sort key that makes a batch of sequences a contiguous run of slots."""
        return self._slot_of[seq]

    def reorder(self, rows: Sequence[int]) -> None:
        """Slot i takes the contents of slot rows[i] (beam search: beams follow their parents)."""
        index = torch.tensor(rows, device=self.keys.device)
        n = len(rows)
        self.keys[:, :n] = self.keys[:, index]
        self.values[:, :n] = self.values[:, index]
        self.key_pos[:n] = self.key_pos[index]
        self.lengths[:n] = [self.lengths[r] for r in rows]

    def view(self, seqs: Sequence[Hashable]) -> _SlotRows:
        slots = [self._slot_of[s] for s in seqs]
        if slots != list(range(slots[0], slots[0] + len(slots))):
            raise ValueError(f"a batch must be consecutive slots in order (sort by `order`), got {slots}")
        return _SlotRows(self, slots[0], slots[0] + len(slots))


class _SlotRows:
    """Slots start..stop-1 of a StaticKVCache as one batch, for one forward pass."""

    def __init__(self, cache: StaticKVCache, start: int, stop: int) -> None:
        self.cache, self.start, self.stop = cache, start, stop
        self.prior_lengths = cache.lengths[start:stop]

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        c, (n, t) = self.cache, positions.shape
        longest = max(self.prior_lengths) + t
        if longest > c.max_len:
            raise CacheFullError(f"KV cache is full: {max(self.prior_lengths)} + {t} tokens > {c.max_len}")
        if longest > c.key_pos.shape[1]:
            c._grow(0, longest)
        self._t = t
        rows = slice(self.start, self.stop)
        first = self.prior_lengths[0]
        self._uniform = all(n_ == first for n_ in self.prior_lengths)
        if self._uniform:  # one shared offset: plain slices
            c.key_pos[rows, first:first + t] = positions
        else:  # ragged batch: each row writes at its own offset
            self._index = (torch.arange(self.start, self.stop, device=positions.device)[:, None].expand(n, t),
                           torch.tensor(self.prior_lengths, device=positions.device)[:, None]
                           + torch.arange(t, device=positions.device))
            c.key_pos[self._index] = positions
        self._longest = longest
        self._views: tuple | None = None
        return c.key_pos[rows, :longest]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        if self._views is None:  # built on first use: `ModelRunner`'s C decode path never asks
            rows, first = slice(self.start, self.stop), self.prior_lengths[0]
            new = slice(first, first + self._t)
            self._views = (c.keys[:, rows, :, new], c.values[:, rows, :, new],
                           c.keys[:, rows, :, :self._longest], c.values[:, rows, :, :self._longest])
        k_dst, v_dst, k_all, v_all = self._views
        if self._uniform:
            k_dst[layer].copy_(k)
            v_dst[layer].copy_(v)
        else:  # [slots, max_len, kv, hd] view so that (row, column) index pairs address one token
            c.keys[layer].transpose(1, 2)[self._index] = k.transpose(1, 2)
            c.values[layer].transpose(1, 2)[self._index] = v.transpose(1, 2)
        return k_all[layer], v_all[layer]

    def advance(self, positions: torch.Tensor) -> None:
        for slot in range(self.start, self.stop):
            self.cache.lengths[slot] += self._t


# ----------------------------------------------------------------------------------------- paged
class PagedKVCache:
    """A pool of `num_blocks` blocks of `block_size` tokens, shared by all sequences.

    Block 0 is never handed out: it pads short block tables, and its keys are marked
    empty (-1), so padding is masked out of attention.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("a paged cache needs at least 2 blocks of at least 1 token")
        slots = num_blocks * block_size
        # token-major ([tokens, kv_heads, head_dim]) so that one token's write is one row
        shape = (config.n_layers, slots, config.kv_heads, config.dim_per_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_pos = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = list(range(num_blocks - 1, 0, -1))  # a stack; block 0 is padding
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}
        self.max_len = (num_blocks - 1) * block_size

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        dtype, device = _dtype_device(model)
        return cls(model.config, num_blocks, block_size, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def allocate(self, seq: Hashable) -> None:
        self.tables[seq], self.lengths[seq] = [], 0

    def fork(self, source: Hashable, seq: Hashable) -> None:
        """Give `seq` blocks holding a copy of everything `source` has cached (a shared prompt).
        The blocks are copied, not shared: sharing them would need reference counts."""
        n = self.lengths[source]
        self.allocate(seq)
        self._grow(seq, n)
        src, dst = self._token_slots(source, n), self._token_slots(seq, n)
        self.keys[:, dst] = self.keys[:, src]
        self.values[:, dst] = self.values[:, src]
        self.key_pos[dst] = self.key_pos[src]
        self.lengths[seq] = n

    def _token_slots(self, seq: Hashable, n: int) -> torch.Tensor:
        """Where `seq`'s first n tokens are in the pool."""
        table = torch.tensor(self.tables[seq], dtype=torch.long, device=self.key_pos.device)
        i = torch.arange(n, device=self.key_pos.device)
        return table[i // self.block_size] * self.block_size + i % self.block_size

    def free(self, seq: Hashable) -> None:
        """Give a sequence's blocks back to the pool at once."""
        self.truncate(seq, 0)
        del self.tables[seq], self.lengths[seq]

    def truncate(self, seq: Hashable, length: int) -> None:
        if not 0 <= length <= self.lengths[seq]:
            raise ValueError(f"cannot truncate {self.lengths[seq]} tokens to {length}")
        table = self.tables[seq]
        keep = -(-length // self.block_size)
        for block in table[keep:]:
            self.key_pos[block * self.block_size:(block + 1) * self.block_size] = -1
        self.free_blocks.extend(reversed(table[keep:]))
        del table[keep:]
        if keep:
            last = table[-1] * self.block_size
            self.key_pos[last + length - (keep - 1) * self.block_size:last + self.block_size] = -1
        self.lengths[seq] = length

    def seq_length(self, seq: Hashable) -> int:
        return self.lengths[seq]

    def append(self, seq: Hashable, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Cache precomputed keys and values ([n_layers, kv_heads, n, head_dim]) after `seq`'s tokens."""
        _append(self, seq, keys, values)

    def capacity(self, seq: Hashable) -> int:
        """Tokens this sequence could reach if it got every free block."""
        return len(self.tables[seq]) * self.block_size + len(self.free_blocks) * self.block_size

    def free_tokens(self) -> int:
        return len(self.free_blocks) * self.block_size

    def order(self, seq: Hashable) -> int:
        return 0

    def view(self, seqs: Sequence[Hashable]) -> _PagedRows:
        return _PagedRows(self, list(seqs))

    def _grow(self, seq: Hashable, length: int) -> None:
        table = self.tables[seq]
        needed = -(-length // self.block_size) - len(table)
        if needed > len(self.free_blocks):
            raise CacheFullError(f"KV cache is full: {needed} more blocks needed, "
                                 f"{len(self.free_blocks)} free")
        table.extend(self.free_blocks.pop() for _ in range(max(needed, 0)))


class _PagedRows:
    """Some sequences of a PagedKVCache as one batch, for one forward pass."""

    def __init__(self, cache: PagedKVCache, seqs: list[Hashable]) -> None:
        self.cache, self.seqs = cache, seqs
        self.prior_lengths = [cache.lengths[s] for s in seqs]

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        c, (n, t) = self.cache, positions.shape
        bs, device = c.block_size, positions.device
        for seq, length in zip(self.seqs, self.prior_lengths):
            c._grow(seq, length + t)
        self._t = t
        longest = max(self.prior_lengths) + t
        width = -(-longest // bs)
        padded = [c.tables[s] + [0] * (width - len(c.tables[s])) for s in self.seqs]
        tables = torch.tensor(padded, device=device)
        token_slots = (tables[:, :, None] * bs + torch.arange(bs, device=device)).view(n, width * bs)
        self._read = token_slots[:, :longest]  # [n, S]: where each row's keys are, in order
        new = torch.tensor(self.prior_lengths, device=device)[:, None] + torch.arange(t, device=device)
        self._write = self._read.gather(1, new).reshape(-1)  # [n * t]: where the new keys go
        c.key_pos[self._write] = positions.reshape(-1)
        return c.key_pos[self._read]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        n, kv, t, hd = k.shape
        c.keys[layer].index_copy_(0, self._write, k.transpose(1, 2).reshape(n * t, kv, hd))
        c.values[layer].index_copy_(0, self._write, v.transpose(1, 2).reshape(n * t, kv, hd))
        # the gather: [n, S, kv, hd] copies of this batch's keys and values, viewed as [n, kv, S, hd]
        return c.keys[layer][self._read].transpose(1, 2), c.values[layer][self._read].transpose(1, 2)

    def advance(self, positions: torch.Tensor) -> None:
        for seq in self.seqs:
            self.cache.lengths[seq] += self._t
