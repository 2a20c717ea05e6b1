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

**Prefix caching** (paged only, as vLLM does it). A full block's keys and values depend on
its tokens and on every token before it, and on nothing else: so a full block is named by
a hash chain, hash(parent block's hash, its own tokens), and a new sequence whose prompt
starts with the same tokens can use the same blocks instead of computing them again (a
conversation's earlier turns, a shared system prompt, k samples of one prompt). Blocks
carry reference counts; a block no sequence uses any more keeps its contents and its
name, and is evicted (least recently used first) only when a fresh block is needed and
none is free. Only full blocks are shared and nothing is ever written into a shared
block: a sequence's new tokens go to blocks of its own.

The static cache has a simpler form of it, made for one conversation at a time (`lmforge
chat`): a freed slot keeps what it held, and a new sequence placed in a free slot whose
tokens start its own keeps those and runs only the rest (any length, not whole blocks).
Slots are compacted as sequences leave, which overwrites what a freed slot held when
another sequence moves into it; the paged cache keeps more under concurrency.
"""

from __future__ import annotations

from collections import OrderedDict
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
        # the tokens whose keys and values each slot holds, when known (`register`); a freed slot keeps them
        self.resident: list[tuple[int, ...]] = [()] * slots

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
        self.resident += [()] * (slots - old_slots)

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
    def allocate(self, seq: Hashable, reuse: Sequence[int] = ()) -> int:
        """Give `seq` the next slot. With `reuse` (tokens `seq` starts with), a free slot holding the
        longest run of them is moved there and that run kept; returns how many tokens were kept."""
        free = len(self._slot_of)  # slots in use are always 0..n-1 (see `free`)
        if free >= self.batch_size:
            raise CacheFullError(f"all {self.batch_size} slots are in use")
        if free >= self.key_pos.shape[0]:
            self._grow(free + 1, 0)
        kept, best = 0, free
        if reuse:
            reuse = tuple(reuse)
            for slot in range(free, len(self.resident)):
                n = _common_prefix(self.resident[slot], reuse)
                if n > kept:
                    kept, best = n, slot
        if best != free:
            self._copy_slot(best, free, kept)
            self.resident[best] = ()  # its copy moves on; what stays there is not tracked
        self._slot_of[seq] = free
        self._clear(free, kept)
        self.resident[free] = ()
        return kept

    def register(self, seq: Hashable, tokens: Sequence[int]) -> None:
        """Record that `seq`'s slot holds these tokens (the first `len(tokens)` it has cached)."""
        slot = self._slot_of[seq]
        if len(tokens) > self.lengths[slot]:
            raise ValueError(f"{len(tokens)} tokens named, {self.lengths[slot]} cached")
        self.resident[slot] = tuple(tokens)

    def forget_prefixes(self) -> None:
        """Forget what free slots hold (the weights changed: those keys and values are stale)."""
        self.resident = [()] * len(self.resident)

    def _copy_slot(self, source: int, target: int, n: int) -> None:
        self.keys[:, target, :, :n] = self.keys[:, source, :, :n]
        self.values[:, target, :, :n] = self.values[:, source, :, :n]
        self.key_pos[target] = self.key_pos[source]
        self.lengths[target] = n

    def free(self, seq: Hashable) -> None:
        """Release a sequence's slot at once; the last occupied slot moves into the gap, so
        the sequences in use always fill slots 0..n-1 and a batch of them is a plain slice.
        Unless another sequence moved into it, the slot keeps its contents for `allocate`'s reuse."""
        slot = self._slot_of.pop(seq)
        last = max(self._slot_of.values(), default=-1)
        if last > slot:
            mover = next(s for s, i in self._slot_of.items() if i == last)
            self._copy_slot(last, slot, self.lengths[last])
            self._slot_of[mover] = slot
            self.resident[slot] = self.resident[last]
            self.resident[last] = ()  # the mover's old copy: its tokens are not known
            slot = last

    def fork(self, source: Hashable, seq: Hashable) -> None:
        """Give `seq` a slot holding a copy of everything `source` has cached (a shared prompt)."""
        self.allocate(seq)
        src, dst = self._slot_of[source], self._slot_of[seq]
        n = self.lengths[src]
        self.keys[:, dst, :, :n] = self.keys[:, src, :, :n]
        self.values[:, dst, :, :n] = self.values[:, src, :, :n]
        self.key_pos[dst, :n] = self.key_pos[src, :n]
        self.lengths[dst] = n

    def swap(self, a: Hashable, b: Hashable) -> None:
        """Exchange two sequences' slots, contents included (the engine keeps the requests that decode
        in the lowest slots and those whose prompt is still being prefilled above them)."""
        sa, sb = self._slot_of[a], self._slot_of[b]
        n = max(self.lengths[sa], self.lengths[sb])
        pair, flipped = [sa, sb], [sb, sa]  # advanced indexing copies the right-hand side first
        self.keys[:, pair, :, :n] = self.keys[:, flipped, :, :n]
        self.values[:, pair, :, :n] = self.values[:, flipped, :, :n]
        self.key_pos[pair] = self.key_pos[flipped]
        self.lengths[sa], self.lengths[sb] = self.lengths[sb], self.lengths[sa]
        self.resident[sa], self.resident[sb] = self.resident[sb], self.resident[sa]
        self._slot_of[a], self._slot_of[b] = sb, sa

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
    empty (-1), so padding is masked out of attention. With `prefix_caching` full blocks
    are named by their tokens and shared (see the module docstring).
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 prefix_caching: bool = True) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("a paged cache needs at least 2 blocks of at least 1 token")
        slots = num_blocks * block_size
        # token-major ([tokens, kv_heads, head_dim]) so that one token's write is one row
        shape = (config.n_layers, slots, config.kv_heads, config.dim_per_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_pos = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = list(range(num_blocks - 1, 0, -1))  # a stack of unused, unnamed blocks
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}
        self.max_len = (num_blocks - 1) * block_size
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks  # sequences whose table holds each block
        self.named: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (hash, its tokens)
        self.by_hash: dict[int, int] = {}  # hash -> the block holding those tokens after that prefix
        self.idle: OrderedDict[int, None] = OrderedDict()  # named blocks nobody uses, least recent first
        self.hits = self.lookups = 0  # prompt tokens found cached / asked for (`match_prefix`)

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int, block_size: int = 16, *,
                  prefix_caching: bool = True) -> PagedKVCache:
        dtype, device = _dtype_device(model)
        return cls(model.config, num_blocks, block_size, dtype=dtype, device=device,
                   prefix_caching=prefix_caching)

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def allocate(self, seq: Hashable, shared: Sequence[int] = ()) -> None:
        """A new sequence; `shared`: full cached blocks (`match_prefix`) its tokens start with."""
        for block in shared:
            self._use(block)
        self.tables[seq], self.lengths[seq] = list(shared), len(shared) * self.block_size

    def fork(self, source: Hashable, seq: Hashable) -> None:
        """Give `seq` everything `source` has cached (a shared prompt): its full blocks are
        shared, the last, partly filled one is copied (it will be written to)."""
        n, bs = self.lengths[source], self.block_size
        full = n // bs
        self.allocate(seq, self.tables[source][:full])
        tail = n - full * bs
        if tail:
            self._grow(seq, n)
            src, dst = self.tables[source][full] * bs, self.tables[seq][full] * bs
            self.keys[:, dst:dst + tail] = self.keys[:, src:src + tail]
            self.values[:, dst:dst + tail] = self.values[:, src:src + tail]
            self.key_pos[dst:dst + tail] = self.key_pos[src:src + tail]
        self.lengths[seq] = n

    # -- prefix caching
    def _hashes(self, tokens: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
        """(hash, tokens) of each full block of `tokens`, the hash chained through the blocks before."""
        out, parent, bs = [], 0, self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            block = tuple(tokens[start:start + bs])
            parent = hash((parent, block))
            out.append((parent, block))
        return out

    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """The cached blocks that hold the longest run of full blocks `tokens` starts with."""
        if not self.prefix_caching:
            return []
        blocks = []
        for name in self._hashes(tokens):
            block = self.by_hash.get(name[0])
            if block is None or self.named[block] != name:
                break
            blocks.append(block)
        self.lookups += len(tokens)
        self.hits += len(blocks) * self.block_size
        return blocks

    def register(self, seq: Hashable, tokens: Sequence[int]) -> None:
        """Name `seq`'s full blocks by `tokens`, the tokens it has cached (so later prompts find them)."""
        if not self.prefix_caching:
            return
        if len(tokens) > self.lengths[seq]:
            raise ValueError(f"{len(tokens)} tokens named, {self.lengths[seq]} cached")
        for block, name in zip(self.tables[seq], self._hashes(tokens)):
            if block in self.named or name[0] in self.by_hash:
                continue  # already named, or the same tokens already live in another block
            self.named[block], self.by_hash[name[0]] = name, block

    def forget_prefixes(self) -> None:
        """Drop every name (the weights changed: cached keys and values no longer match them)."""
        for block in self.idle:
            self._unname(block)
            self.free_blocks.append(block)
        self.idle.clear()
        for block in list(self.named):
            self._unname(block)

    def _unname(self, block: int) -> None:
        name = self.named.pop(block, None)
        if name is not None and self.by_hash.get(name[0]) == block:
            del self.by_hash[name[0]]

    def _use(self, block: int) -> None:
        self.refs[block] += 1
        self.idle.pop(block, None)

    def _release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block]:
            return
        if block in self.named:
            self.idle[block] = None  # kept, findable, and the first to go when a block is needed
        else:
            self._blank(block)
            self.free_blocks.append(block)

    def _blank(self, block: int) -> None:
        self.key_pos[block * self.block_size:(block + 1) * self.block_size] = -1

    def _take(self) -> int:
        """A block for new tokens: a free one, else the least recently used idle cached one."""
        if self.free_blocks:
            block = self.free_blocks.pop()
        else:
            block, _ = self.idle.popitem(last=False)
            self._unname(block)
            self._blank(block)
        self.refs[block] = 1
        return block

    def available_blocks(self) -> int:
        """Blocks a sequence could get: free ones and idle cached ones (evicted on demand)."""
        return len(self.free_blocks) + len(self.idle)

    def free(self, seq: Hashable) -> None:
        """Give a sequence's blocks back to the pool at once (named ones stay findable until evicted)."""
        for block in reversed(self.tables.pop(seq)):
            self._release(block)
        del self.lengths[seq]

    def truncate(self, seq: Hashable, length: int) -> None:
        if not 0 <= length <= self.lengths[seq]:
            raise ValueError(f"cannot truncate {self.lengths[seq]} tokens to {length}")
        table = self.tables[seq]
        keep = -(-length // self.block_size)
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]
        if keep and length % self.block_size:
            last = table[-1]
            if self.refs[last] > 1:
                raise ValueError("cannot cut into a block other sequences share")
            self._unname(last)  # its tail will be written again
            start = last * self.block_size
            self.key_pos[start + length - (keep - 1) * self.block_size:start + self.block_size] = -1
        self.lengths[seq] = length

    def seq_length(self, seq: Hashable) -> int:
        return self.lengths[seq]

    def append(self, seq: Hashable, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Cache precomputed keys and values ([n_layers, kv_heads, n, head_dim]) after `seq`'s tokens."""
        _append(self, seq, keys, values)

    def capacity(self, seq: Hashable) -> int:
        """Tokens this sequence could reach if it got every available block."""
        return (len(self.tables[seq]) + self.available_blocks()) * self.block_size

    def free_tokens(self) -> int:
        return self.available_blocks() * self.block_size

    def blocks_needed(self, seq: Hashable, length: int) -> int:
        """Blocks `seq` lacks to hold `length` tokens."""
        return max(-(-length // self.block_size) - len(self.tables[seq]), 0)

    def reserve(self, seq: Hashable, length: int) -> None:
        """Give `seq` the blocks for `length` tokens now (a prompt prefilled in chunks: its later
        chunks cannot then find the pool empty). Raises `CacheFullError` if too few are available."""
        self._grow(seq, length)

    def order(self, seq: Hashable) -> int:
        return 0

    def view(self, seqs: Sequence[Hashable]) -> _PagedRows:
        return _PagedRows(self, list(seqs))

    def _grow(self, seq: Hashable, length: int) -> None:
        table = self.tables[seq]
        needed = -(-length // self.block_size) - len(table)
        if needed > self.available_blocks():
            raise CacheFullError(f"KV cache is full: {needed} more blocks needed, "
                                 f"{self.available_blocks()} free")
        table.extend(self._take() for _ in range(max(needed, 0)))


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
        padded = [c.tables[s][:width] + [0] * (width - len(c.tables[s])) for s in self.seqs]  # (reserved)
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
