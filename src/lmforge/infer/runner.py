"""`ModelRunner`: a `Transformer`'s forward pass, arranged for inference.

`lmforge.model.Transformer` is written to be read and trained: one module per idea,
autograd-friendly, every projection its own layer. At batch 1 a decode step of a small
model does little arithmetic per operation, and the fixed cost of launching each of its
~2,500 PyTorch operations (a few microseconds each on a CPU) rivals the time spent
reading the weights. The runner computes the same function in two ways:

**The PyTorch path** (any device, any dtype, any number of new tokens: prefill, decode,
speculative verification). Compared with `Transformer.forward`:
- q, k and v come from one fused matmul, and so do SwiGLU's gate and up projections;
- the residual add is folded into the output projection (`addmm_`);
- the attention mask is built once per step, not per layer, and skipped entirely when
  every key is visible (a uniform batch decoding one token), or replaced by SDPA's causal
  kernel over the new tokens alone (a fresh prefill);
- grouped-query attention uses `enable_gqa=True` instead of copying KV heads.

**The C decode path** (CPU, fp32 activations, one new token per row, no MoE/ALiBi):
the whole step is one call into `infer/kernels/decode.c` (embedding; per layer norm,
fused q/k/v, QK-norm, RoPE, cache write, attention, output projection, norm, MLP; final
norm and LM head), reading fp32, int8 or int4 weights directly (with int8 activations
where the layers round their inputs: W8A8, `quant.int8_activations`), inside one OpenMP
parallel region. Python's share of a decode step drops from ~2,500 operations to ~15.

Both read the model's weights (sharing their memory except for the fused
concatenations) and are checked against `Transformer.forward` for every architecture
variant (`tests/infer/test_runner.py`). Quantized layers (`lmforge.infer.quant`) are
used as they are, fused the same way.

**Adapters that do not merge into the weights** (`lmforge.tune.apply.load_adapter`
merges LoRA and (IA)^3; these two stay), found on the model by duck typing since
`infer` does not import `tune`:
- bottleneck adapters (tune/adapters.py): a block's `attn_adapter` / `mlp_adapter`
  module maps the sublayer's output h to adapter(h) before the residual add. The
  PyTorch path calls them (the residual add is then not folded into the projection);
  the C kernel does not know them, so a model that has any runs without it.
- a prefix (tune/prefix.py): `model.prefix_tuning.key_values()` gives N keys and values
  per layer. They are not computed here but cached: `prefix` holds them for the engine,
  which writes them into each sequence's cache before its prompt, so that both paths
  (the C kernel too) see them as N tokens already cached, at positions 0..N-1.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer import kernels
from lmforge.infer.cache import PagedKVCache, StaticKVCache, _PagedRows, _SlotRows
from lmforge.infer.quant import concat_linears, interleave_linears
from lmforge.model.layers.alibi import alibi_bias, alibi_slopes
from lmforge.model.layers.attention import attention_mask
from lmforge.model.layers.norms import RMSNorm
from lmforge.model.transformer import Transformer


class _Projection:
    """A linear layer as two calls: `y = p(x)` and `p.add_to(residual, x)` (residual += x W^T + b)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.dense = isinstance(layer, nn.Linear)
        if self.dense:
            self.weight_t = layer.weight.detach().t()  # a view: BLAS reads it transposed for free
            self.bias = None if layer.bias is None else layer.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dense:
            return self.layer(x)
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> None:
        if not self.dense:
            residual.add_(self.layer(x))
            return
        residual.addmm_(x, self.weight_t)
        if self.bias is not None:
            residual.add_(self.bias)

    def kernel_weight(self) -> tuple[kernels.Weight, list[torch.Tensor]]:
        """The C kernels' view of this layer, and the tensors that must outlive it."""
        if self.dense:
            w = self.layer.weight.detach().contiguous()
            b = None if self.bias is None else self.bias.contiguous()
            return kernels.weight(kernels.F32, w, None, b), [w] + ([b] if b is not None else [])
        b = self.layer.bias
        return self.layer.kernel_weight(b), [b] if b is not None else []


class _Norm:
    def __init__(self, norm: nn.Module) -> None:
        self.rms = isinstance(norm, RMSNorm)
        self.weight = norm.weight.detach()
        self.bias = None if self.rms or norm.bias is None else norm.bias.detach()
        self.eps = norm.eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:  # as RMSNorm.forward: statistics in fp32, the gain in the model's dtype
            x32 = x.float()
            return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _Layer:
    def __init__(self, block: nn.Module) -> None:
        attn, mlp = block.attn, block.mlp
        self.attn_norm, self.mlp_norm = _Norm(block.attn_norm), _Norm(block.mlp_norm)
        self.qkv = _Projection(concat_linears([attn.q_proj, attn.k_proj, attn.v_proj]))
        self.o_proj = _Projection(attn.o_proj)
        self.q_norm = attn.q_norm if attn.qk_norm else None
        self.k_norm = attn.k_norm if attn.qk_norm else None
        self.moe = mlp if not hasattr(mlp, "kind") else None
        if self.moe is None:
            self.kind = mlp.kind
            # SwiGLU: gate and up rows interleaved (g0, u0, g1, u1, ...), see `interleave_linears`
            swiglu = mlp.kind == "swiglu"
            self.up = _Projection(interleave_linears(mlp.gate_proj, mlp.up_proj) if swiglu else mlp.up_proj)
            self.down = _Projection(mlp.down_proj)
        # bottleneck adapters after the sublayers (tune/adapters.py), if the block has them
        self.attn_adapter = block._modules.get("attn_adapter")
        self.mlp_adapter = block._modules.get("mlp_adapter")


class ModelRunner:
    """Inference forward over a KV-cache view: `logits = runner(ids, cache)`.

    `ids` is [B, T]; row b holds the next T tokens of a sequence that already has
    `cache.prior_lengths[b]` tokens cached, so positions follow from the cache.
    `fast_decode=False` keeps single-token steps on the PyTorch path too.
    """

    def __init__(self, model: Transformer, *, fast_decode: bool | None = None) -> None:
        self.model = model
        self.config = cfg = model.config
        self._fast_decode = fast_decode
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        self._build()

    def _build(self) -> None:
        model, cfg = self.model, self.config
        self.dtype = model.embed.weight.dtype
        self.device = model.embed.weight.device
        self.layers = [_Layer(block) for block in model.blocks]
        self.final_norm = _Norm(model.final_norm)
        head = model._modules.get("lm_head")
        self.head = _Projection(head if head is not None else _tied_head(model.embed))
        self.inv_freq = model.rotary.inv_freq if cfg.position == "rope" else None
        self.alibi = alibi_slopes(cfg.n_heads).to(self.device) if cfg.position == "alibi" else None
        prefix = model._modules.get("prefix_tuning")
        with torch.no_grad():  # (keys, values), each [n_layers, kv_heads, N, head_dim], for the engine
            self.prefix = (None if prefix is None else
                           tuple(t.detach().to(self.dtype).contiguous() for t in prefix.key_values()))
        adapters = any(la.attn_adapter is not None or la.mlp_adapter is not None for la in self.layers)
        self.fast = (self._fast_decode is not False and self.device.type == "cpu"
                     and self.dtype == torch.float32 and cfg.position != "alibi" and not cfg.n_experts
                     and not adapters and kernels.available())
        if self.fast:
            self._build_kernel_layers()
        self._weights_version = self._version()

    def _version(self) -> tuple:
        return tuple((id(t), t._version) for t in (*self.model.parameters(), *self.model.buffers()))

    def refresh(self) -> bool:
        """Rebuild the fused weights if the model's weights changed since (e.g. a PPO update
        between rollouts, which modifies parameters in place). Returns whether it did."""
        if self._version() == self._weights_version:
            return False
        self._build()
        return True

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache, *, last_only: bool = True) -> torch.Tensor:
        """Logits [B, V] for each row's last token (or [B, T, V] with `last_only=False`)."""
        B, T = ids.shape
        lengths = cache.prior_lengths
        if max(lengths) + T > self.config.max_seq_len:
            raise ValueError(f"position {max(lengths) + T - 1} exceeds the model's context "
                             f"of {self.config.max_seq_len}")
        if self.fast and isinstance(cache, (_SlotRows, StaticKVCache, _PagedRows)):
            if T == 1:  # one new token per row: a decode step
                logits = self._decode_c(ids, cache, lengths)
                return logits if last_only else logits[:, None]
            if B == 1 and T <= MAX_C_CHUNK:  # a few tokens of one sequence: speculative verification
                logits = self._decode_c(ids, cache, lengths)
                return logits[-1:] if last_only else logits[None]
        return self._forward_torch(ids, cache, lengths, last_only)

    def _forward_torch(self, ids: torch.Tensor, cache, lengths: list[int], last_only: bool) -> torch.Tensor:
        cfg = self.config
        B, T = ids.shape
        positions = torch.tensor(lengths, device=self.device)[:, None] + torch.arange(T, device=self.device)
        k_pos = cache.key_positions(positions)

        x = self.model.embed(ids).view(B * T, -1)
        if cfg.position == "learned":
            x = x + self.model.pos_embed(positions).view(B * T, -1)
        rope = self._rope(positions) if self.inv_freq is not None else None
        mode, mask = self._attention_plan(lengths, T, positions, k_pos)

        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(layer.attn_norm(x)).view(B, T, H + 2 * KV, hd)
            if layer.q_norm is not None:
                qkv = torch.cat([layer.q_norm(qkv[:, :, :H]), layer.k_norm(qkv[:, :, H:H + KV]),
                                 qkv[:, :, H + KV:]], dim=2)
            if rope is not None:
                qkv = self._apply_rope(qkv, rope)
            q, k, v = (qkv[:, :, :H].transpose(1, 2), qkv[:, :, H:H + KV].transpose(1, 2),
                       qkv[:, :, H + KV:].transpose(1, 2))
            keys, values = cache.update(i, k, v)
            if mode == "causal":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=KV != H)
            out = out.transpose(1, 2).reshape(B * T, H * hd)
            if layer.attn_adapter is None:
                layer.o_proj.add_to(x, out)
            else:
                x.add_(layer.attn_adapter(layer.o_proj(out)))

            h = layer.mlp_norm(x)
            if layer.moe is not None:  # the model's own module: its adapter's hook (if any) applies it
                x.add_(layer.moe(h)[0])
            elif layer.mlp_adapter is None:
                layer.down.add_to(x, self._act(layer, h))
            else:
                x.add_(layer.mlp_adapter(layer.down(self._act(layer, h))))
        cache.advance(positions)

        if last_only:
            x = x.view(B, T, -1)[:, -1]
            return self.head(self.final_norm(x.contiguous()))
        return self.head(self.final_norm(x)).view(B, T, -1)

    def _act(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        up = layer.up(h)
        if layer.kind == "swiglu":
            return F.silu(up[:, 0::2]) * up[:, 1::2]
        if layer.kind == "gelu_tanh":
            return F.gelu(up, approximate="tanh")
        if layer.kind == "gelu":
            return F.gelu(up)
        return F.relu(up).square()

    def greedy(self, logits: torch.Tensor) -> list[int]:
        """Each row's argmax; free when `logits` came from the C decode path, which computed it."""
        if logits is getattr(self, "_argmax_of", None):
            return list(self._argmax)
        return logits.argmax(-1).tolist()

    # ------------------------------------------------------------------ attention plumbing
    def _attention_plan(self, lengths: list[int], T: int, positions: torch.Tensor,
                        k_pos: torch.Tensor) -> tuple[str, torch.Tensor | None]:
        """("causal", None): fresh prefill, attend over the new tokens only with the causal kernel;
        ("cached", None): every cached key is visible to every query, no mask needed;
        ("cached", mask): anything else (ragged batch, sliding window, ALiBi, a chunk after a prefix)."""
        cfg = self.config
        window_ok = cfg.sliding_window is None or max(lengths) + T <= cfg.sliding_window
        simple = self.alibi is None and window_ok
        uniform = all(n == lengths[0] for n in lengths)
        if simple and uniform and lengths[0] == 0 and T > 1:
            return "causal", None
        if simple and uniform and T == 1:
            return "cached", None
        allowed = attention_mask(positions, k_pos, cfg.sliding_window)  # [B, 1, T, S]
        if self.alibi is None:  # additive, in the model's dtype: SDPA would convert a boolean mask per layer
            zero = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            return "cached", zero.masked_fill_(~allowed, float("-inf"))
        bias = alibi_bias(self.alibi, positions, k_pos)
        return "cached", bias.masked_fill(~allowed, float("-inf")).to(self.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each position's angles, [B, T, hd/2] (fp32, as `RotaryEmbedding`)."""
        angles = positions[..., None].float() * self.inv_freq.float()
        return angles.cos(), angles.sin()

    def _apply_rope(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate q and k (heads 0..H+KV-1 of the fused output) in the model's "rotate half" layout."""
        cos, sin = rope
        n_rot = self.n_heads + self.n_kv
        x = qkv[:, :, :n_rot].float()
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, :, None], sin[:, :, None]
        rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(qkv.dtype)
        return torch.cat([rotated, qkv[:, :, n_rot:]], dim=2)

    # ------------------------------------------------------------------ the C decode path
    def _build_kernel_layers(self) -> None:
        cfg, model = self.config, self.model
        self._keep: list[torch.Tensor] = []  # every tensor the C structures point into

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            t = t.detach().float().contiguous()
            self._keep.append(t)
            return t.data_ptr()

        def weight(p: _Projection) -> kernels.Weight:
            w, keep = p.kernel_weight()
            self._keep += keep
            return w

        layers = [kernels.Layer(
            d=cfg.d_model, n_heads=cfg.n_heads, n_kv=cfg.kv_heads, head_dim=cfg.dim_per_head, d_ff=cfg.d_ff,
            eps=layer.attn_norm.eps, norm=kernels.RMSNORM if layer.attn_norm.rms else kernels.LAYERNORM,
            mlp=kernels.MLP_KINDS[layer.kind], window=cfg.sliding_window or 0,
            attn_norm_w=ptr(layer.attn_norm.weight), attn_norm_b=ptr(layer.attn_norm.bias),
            mlp_norm_w=ptr(layer.mlp_norm.weight), mlp_norm_b=ptr(layer.mlp_norm.bias),
            q_norm_w=ptr(layer.q_norm.weight) if layer.q_norm is not None else None,
            k_norm_w=ptr(layer.k_norm.weight) if layer.k_norm is not None else None,
            qkv=weight(layer.qkv), o=weight(layer.o_proj), up=weight(layer.up), down=weight(layer.down))
            for layer in self.layers]
        self._c_layers = (kernels.Layer * len(layers))(*layers)
        final = self.final_norm
        self._c_model = kernels.Model(
            n_layers=len(layers), d=cfg.d_model, vocab=cfg.vocab_size, layers=self._c_layers,
            embed=ptr(model.embed.weight),
            pos_embed=ptr(model.pos_embed.weight) if cfg.position == "learned" else None,
            final_norm=kernels.RMSNORM if final.rms else kernels.LAYERNORM, final_w=ptr(final.weight),
            final_b=ptr(final.bias), final_eps=final.eps, head=weight(self.head),
            inv_freq=ptr(self.inv_freq) if self.inv_freq is not None else None)
        self._cache_storage: tuple[int, int] | None = None
        self._scratch, self._scratch_keys, self._scratch_rows = torch.empty(0), 0, 0

    def _point_at_cache(self, cache: StaticKVCache | PagedKVCache) -> None:
        """Aim every layer's cache pointers at the cache's storage (it moves when a cache grows)."""
        storage = (id(cache), cache.keys.data_ptr())
        if storage == self._cache_storage:
            return
        if isinstance(cache, PagedKVCache):  # [layers, tokens, kv, hd]
            strides = (0, cache.keys.stride(2), cache.keys.stride(1))
        else:  # [layers, slots, kv, max_len, hd]
            strides = (cache.keys.stride(1), cache.keys.stride(2), cache.keys.stride(3))
        for i, layer in enumerate(self._c_layers):
            layer.k_cache, layer.v_cache = cache.keys[i].data_ptr(), cache.values[i].data_ptr()
            layer.slot_stride, layer.head_stride, layer.token_stride = strides
        self._cache_storage = storage

    def _decode_c(self, ids: torch.Tensor, cache, lengths: list[int]) -> torch.Tensor:
        """One token per row through `lmf_decode`: a single call for the whole model.

        The per-row integers travel as ctypes arrays, not tensors: after a step has streamed
        every weight through the caches, each PyTorch call costs tens of microseconds.
        """
        lib = kernels.library()
        n, T = ids.shape
        # a chunk (one sequence, T > 1 tokens) runs as T rows that share the sequence's slot
        positions = torch.tensor(lengths)[:, None] + torch.arange(T)
        cache.key_positions(positions)  # capacity, growth, key-position bookkeeping
        self._point_at_cache(cache.cache if isinstance(cache, (_SlotRows, _PagedRows)) else cache)
        B = n * T
        rows = ctypes.c_int64 * B
        lengths = [lengths[0] + t for t in range(T)] if T > 1 else lengths
        token_index = None
        if isinstance(cache, _PagedRows):
            token_index = cache._read.expand(B, -1).contiguous()
            slots = rows()  # unused by the paged addressing
        else:
            start = cache.start if isinstance(cache, _SlotRows) else 0
            slots = rows(*([start] * T if T > 1 else range(start, start + B)))
        max_keys = max(lengths) + 1
        if max_keys > self._scratch_keys or self._scratch_rows < B:  # grow by doubling
            self._scratch_keys = max(max_keys, 2 * self._scratch_keys)
            self._scratch_rows = max(B, self._scratch_rows)
            model = ctypes.byref(self._c_model)
            self._scratch = torch.empty(lib.lmf_scratch_floats(model, self._scratch_rows, self._scratch_keys))
        logits = torch.empty(B, self.config.vocab_size)
        self._argmax = rows()
        tokens, lengths_c = rows(*ids.reshape(-1).tolist()), rows(*lengths)
        step = kernels.Step(batch=B, tokens=ctypes.addressof(tokens), slots=ctypes.addressof(slots),
                            lengths=ctypes.addressof(lengths_c), scratch=self._scratch.data_ptr(),
                            max_keys=max_keys, token_index=kernels.pointer(token_index),
                            argmax=ctypes.addressof(self._argmax), chunk=int(T > 1))
        lib.lmf_decode(ctypes.byref(self._c_model), ctypes.byref(step), logits.data_ptr())
        self._argmax_of = logits
        cache.advance(positions)
        return logits


MAX_C_CHUNK = 16  # longer chunks (prefills) are matrix-matrix work: PyTorch's BLAS does it better


def _tied_head(embed: nn.Embedding) -> nn.Linear:
    """The LM head of a tied model: a linear layer sharing the embedding matrix."""
    head = nn.Linear(embed.weight.shape[1], embed.weight.shape[0], bias=False, device="meta")
    head.weight = embed.weight
    return head
