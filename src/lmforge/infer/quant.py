"""Weight-only int8 and int4 linear layers, for decoding near the memory-bandwidth limit.

A decode step reads every weight once to produce one token, so its time is (weight
bytes) / (memory bandwidth). Storing a weight in 8 bits instead of 32 reads 4x fewer
bytes; in 4 bits, about 6x fewer once the per-group scales are counted. Activations
stay in floating point (only weights are rounded), which keeps the error small:

- **int8, per output channel** (symmetric): each row n of W gets one scale
  s_n = max|W[n, :]| / 127 and q = round(W / s_n) in [-127, 127]. Since the scale is
  per output, y_n = s_n * (x . q_n): the integer dot product is scaled once at the end.
- **int4, group-wise** (asymmetric, like GGUF's Q4_1): every G consecutive inputs of a
  row share a step d = (max - min) / 15 and an offset m = min, q = round((w - m) / d) in
  0..15, stored two per byte (in an order that the kernel unpacks with shifts alone, see
  `pack_int4`); d and m are fp16. Groups let outliers in one part of a row
  spoil only their own group's resolution.

**int8 activations** (an option, `int8_activations`): an int8 or int4 layer can also
round its input to int8, x ~ s * c with s = max|x| / 127 per 32 inputs (as llama.cpp
rounds its activations for Q8_0/Q4_1 files) or per token, and multiply integers: fewer
instructions per weight on CPUs without fast float conversion, at the cost of the
activations' rounding error. `Int8ActLinear` (SmoothQuant's W8A8) always does, per token
or with one calibrated scale.

On CPU, small batches (decode) go to lmforge's kernels (`infer/kernels/decode.c`),
which read the small integers directly (and, with int8 activations, round the input and
multiply integers). Everywhere else (long prefills, CUDA, no
compiler) the weights are dequantized and a normal matmul runs: correct, not fast.
Full quantization tooling (calibration, GPTQ/AWQ, QAT) belongs to `lmforge.compress`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer import kernels

QuantMode = Literal["int8", "int4"]
ActivationScales = Literal["dynamic", "static"]  # W8A8: one scale per token, or one calibrated per layer
#: how a layer rounds its input: per token ("dynamic"), per 32 inputs ("block"), one fixed scale ("static")
InputRounding = Literal["dynamic", "block", "static"]
KERNEL_MAX_ROWS = 16  # beyond this many rows a dequantize + BLAS matmul is faster than the kernels


def round_activations(x: torch.Tensor, scale: torch.Tensor | None = None, *,
                      block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x [rows, in] rounded to int8: (codes as fp32 integers in [-127, 127], scale), x ~ codes
    * scale. Without `scale`, each row's own max|x| / 127 (per token; scale [rows, 1]), or with
    `block` each `block` inputs' own (scale [rows, in], repeated over its block). The C kernels round
    the same way (fp32 division, ties to even)."""
    x = x.float()
    if block is not None:
        scale = x.view(x.shape[0], -1, block).abs().amax(dim=2) / 127
        scale = scale.repeat_interleave(block, dim=1)
    elif scale is None:
        scale = x.abs().amax(dim=1, keepdim=True) / 127
    scale = scale.clamp(min=1e-12)
    return torch.round(x / scale).clamp_(-127, 127), scale


class QuantizedLinear(nn.Module, abc.ABC):
    """Base: y = x @ W^T + b with W kept quantized; subclasses define the storage, `dequantize`
    and `kernel_weight`."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    #: None: weight-only (fp32 inputs); "dynamic" / "block": each input row is rounded to int8 first with
    #: its own scale / a scale per 32 inputs (`int8_activations`); "static": with the layer's one
    #: calibrated `act_scale` (W8A8 only)
    activations: InputRounding | None = None

    def weight_bytes(self) -> int:
        """Bytes a forward pass reads for the weight (values + scales)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "bias")

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] in floating point."""

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes as fp32 integers [rows, in], scale [rows, 1] or [1]): x ~ codes * scale."""
        return round_activations(x, self.act_scale if self.activations == "static" else None,
                                 block=32 if self.activations == "block" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" and x2.shape[0] <= KERNEL_MAX_ROWS and kernels.available():
            fp32_bias = self.bias is not None and self.bias.dtype == torch.float32
            y = kernels.linear(self.kernel_weight(self.bias if fp32_bias else None), x2.float().contiguous())
            if self.bias is not None and not fp32_bias:
                y = y + self.bias.float()
            y = y.to(x.dtype)
        else:
            if self.activations is not None:  # the rounded input, in floating point
                codes, scale = self.quantize_input(x2)
                x2 = (codes * scale).to(x.dtype)
            y = F.linear(x2, self.dequantize(x.dtype), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    @abc.abstractmethod
    def kernel_weight(self, bias: torch.Tensor | None = None) -> kernels.Weight:
        """This layer as the CPU kernels' `Weight` (pointers into its buffers)."""

    def _kernel_activations(self) -> dict[str, int | float]:
        """How the kernels take this layer's input (`kernels.weight`'s act and act_scale)."""
        if self.activations is None:
            return {}
        if self.activations == "static":
            return {"act": kernels.ACT_STATIC, "act_scale": float(self.act_scale)}
        return {"act": kernels.ACT_BLOCK if self.activations == "block" else kernels.ACT_DYNAMIC}

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class Int8Linear(QuantizedLinear):
    """int8 codes with one fp32 scale per output row (`scale` [out], what `from_float` makes) or
    one per group of inputs (`scale` [out, in / group], group a multiple of 32): GGUF's Q8_0
    keeps a scale per 32 weights, and a layer holding those scales runs the file's weights
    exactly, where folding them into one scale per row would round every weight again."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        groups = scale.shape[1] if scale.dim() == 2 else 1
        if (scale.shape[0] != self.out_features or scale.dim() > 2 or self.in_features % groups
                or (groups > 1 and (self.in_features // groups) % 32)):
            raise ValueError(f"int8 needs a scale per row [{self.out_features}] or per group of a multiple "
                             f"of 32 inputs [{self.out_features}, in / group], got {tuple(scale.shape)}")
        self.register_buffer("qweight", qweight.contiguous())  # int8 [out, in]
        self.register_buffer("scale", scale.float().contiguous())  # fp32 [out] or [out, in / group]
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def group_size(self) -> int:
        """Inputs sharing one scale: all of them (per row) unless the layer holds grouped scales."""
        return self.in_features // (self.scale.shape[1] if self.scale.dim() == 2 else 1)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale, None if bias is None else bias.detach())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.qweight.float().view(self.out_features, -1, self.group_size)
        return (q * self.scale.view(self.out_features, -1, 1)).view(self.out_features, -1).to(dtype)

    def kernel_weight(self, bias: torch.Tensor | None = None) -> kernels.Weight:
        grouped = self.group_size < self.in_features
        return kernels.weight(kernels.INT8, self.qweight, self.scale, bias, self.group_size if grouped else 0,
                              **self._kernel_activations())


class Int8ActLinear(Int8Linear):
    """W8A8 (SmoothQuant): int8 weights per output channel *and* int8 activations.

    Each input row is rounded to int8 before the product: x ~ s_x * x_q with x_q in
    [-127, 127], so y_n = s_x * s_n * (x_q . q_n) + b_n is an integer dot product scaled
    once. `activations="dynamic"` takes s_x = max|x_row| / 127 for every token as it
    comes (as llama.cpp does for its Q8 activations); `"static"` uses one scale per layer
    fixed from calibration text (`act_scale`), which needs no reduction at run time but
    clips tokens beyond the calibrated range.

    Where the integer product runs: on CUDA, `torch._int_mm` (int8 tensor cores) for
    more than 16 rows. On CPU up to 16 rows (decode, in the engine's fused step too), the
    C kernels round the input and multiply integers; longer inputs multiply the codes as
    fp32 numbers with BLAS: the result is the integer product (sums of int8 x int8 terms
    are exact in fp32 up to 2^24), because PyTorch's CPU int8 GEMM measured ~50x slower
    than sgemm on an AVX2 CPU.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                 activations: ActivationScales = "dynamic", act_scale: float | torch.Tensor = 0.0) -> None:
        super().__init__(qweight, scale, bias)
        if self.scale.dim() != 1:  # the integer dot product needs one weight scale per row
            raise ValueError(f"W8A8 needs one weight scale per output row, got {tuple(self.scale.shape)}")
        if activations not in ("dynamic", "static"):
            raise ValueError(f"activation scales must be dynamic or static, got {activations!r}")
        self.activations = activations
        self.register_buffer("act_scale", torch.as_tensor(act_scale, dtype=torch.float32).reshape(1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" and x2.shape[0] <= KERNEL_MAX_ROWS and kernels.available():
            return super().forward(x)  # the kernel rounds the input itself
        codes, x_scale = self.quantize_input(x2)
        if x2.device.type == "cuda" and x2.shape[0] > 16:
            dot = torch._int_mm(codes.to(torch.int8), self.qweight.t()).float() * self.scale
        else:  # integers times integers: exact in fp32, the weight scale applied after
            dot = F.linear(codes, self.qweight.float()) * self.scale
        y = dot * x_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activations={self.activations}"


class Int4Linear(QuantizedLinear):
    def __init__(self, packed: torch.Tensor, dm: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("packed", packed.contiguous())  # uint8 [out, in / 2]
        self.register_buffer("dm", dm.contiguous())  # fp16 [out, in / group, 2]: step d, offset m
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int = 32) -> Int4Linear:
        out_features, in_features = weight.shape
        if group_size % 32 or in_features % group_size or in_features % 64:
            raise ValueError(f"int4 needs a group size that is a multiple of 32 and divides the inputs "
                             f"({in_features}, itself a multiple of 64), got {group_size}")
        w = weight.detach().float().view(out_features, in_features // group_size, group_size)
        low, high = w.amin(-1), w.amax(-1)
        # round d and m to fp16 first, so that q is chosen for the values actually stored
        d = ((high - low) / 15).half().float()
        m = low.half().float()
        d = torch.where(d > 0, d, torch.ones_like(d))
        q = torch.round((w - m[..., None]) / d[..., None]).clamp(0, 15)
        return cls.from_codes(q.view(out_features, in_features), d, m, bias)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor,
                   bias: torch.Tensor | None = None) -> Int4Linear:
        """The layer holding exactly w = step * code + offset: codes [out, in] in 0..15, step and
        offset [out, in / group] (stored in fp16); the group size follows from their widths."""
        dm = torch.stack([step, offset], dim=-1).half()
        return cls(pack_int4(codes.to(torch.uint8)), dm, codes.shape[1] // step.shape[1], bias)

    def unpack(self) -> torch.Tensor:
        """The 4-bit codes as uint8 [out, in]."""
        return unpack_int4(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.unpack().float().view(self.out_features, -1, self.group_size)
        d, m = self.dm.float().unbind(-1)
        return (q * d[..., None] + m[..., None]).view(self.out_features, self.in_features).to(dtype)

    def kernel_weight(self, bias: torch.Tensor | None = None) -> kernels.Weight:
        return kernels.weight(kernels.INT4, self.packed, self.dm, bias, self.group_size,
                              **self._kernel_activations())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] (0..15) -> [out, in / 2] bytes in the kernels' order.

    Each 64 inputs become 32 bytes read as eight 32-bit lanes; nibble j of lane i holds
    input 8j + i, so that shifting all lanes right by 4j yields inputs 8j..8j+7 in order.
    Byte b of lane i (byte 4i + b of the block) holds inputs 16b + i (low nibble) and
    16b + 8 + i (high nibble).
    """
    out_features, in_features = codes.shape
    if codes.device.type == "cpu":  # numpy's strided uint8 arithmetic measured ~30x faster than PyTorch's
        c = codes.numpy().reshape(out_features, in_features // 64, 4, 2, 8)  # [block, b, low/high, lane i]
        packed = np.ascontiguousarray((c[:, :, :, 0] | (c[:, :, :, 1] << 4)).transpose(0, 1, 3, 2))
        return torch.from_numpy(packed.reshape(out_features, in_features // 2))
    q = codes.view(out_features, in_features // 64, 4, 2, 8)
    return (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(2, 3).reshape(out_features, in_features // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`."""
    out_features = packed.shape[0]
    if packed.device.type == "cpu":
        p = packed.numpy().reshape(out_features, -1, 8, 4).transpose(0, 1, 3, 2)  # [block, b, lane i]
        return torch.from_numpy(np.stack([p & 15, p >> 4], axis=3).reshape(out_features, -1))
    p = packed.view(out_features, -1, 8, 4).transpose(2, 3)  # [block, b, lane i]
    q = torch.stack([p & 15, p >> 4], dim=3)  # [block, b, low/high, lane i]
    return q.reshape(out_features, -1)


def quantize_linear(linear: nn.Linear | torch.Tensor, mode: QuantMode,
                    group_size: int = 32) -> QuantizedLinear:
    """An `nn.Linear` (or a bare [out, in] weight) as an int8 or int4 layer."""
    weight = linear if isinstance(linear, torch.Tensor) else linear.weight
    bias = None if isinstance(linear, torch.Tensor) else linear.bias
    if mode == "int8":
        layer: QuantizedLinear = Int8Linear.from_float(weight, bias)
    elif mode == "int4":
        layer = Int4Linear.from_float(weight, bias, group_size)
    else:
        raise ValueError(f"quantize must be int8 or int4, got {mode!r}")
    return layer.to(weight.device)


def quantize_model(model: nn.Module, mode: QuantMode, *, group_size: int = 32,
                   head: bool | QuantMode = True) -> nn.Module:
    """Replace, in place, every linear layer of a `Transformer` with its quantized version.

    Covers attention and MLP (and MoE experts') projections; MoE routers stay in floating
    point (tiny, and routing is sensitive). `head=True` quantizes the LM head the same way,
    `head="int8"` (or "int4") another way (GGUF files often keep the head at 8 bits),
    `head=False` leaves it. For tied embeddings a quantized copy of the embedding matrix
    becomes `model.lm_head` (the model uses an `lm_head` module when it has one) and the
    embedding itself stays, since looking up one row per token costs nothing.
    """
    head_mode = mode if head is True else head
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or name == "router":
                continue
            if name == "lm_head":
                if head_mode:
                    setattr(module, name, quantize_linear(child, head_mode, group_size))
            else:
                setattr(module, name, quantize_linear(child, mode, group_size))
    if head_mode and getattr(model.config, "tie_embeddings", False) and "lm_head" not in model._modules:
        model.lm_head = quantize_linear(model.embed.weight, head_mode, group_size)
    return model


def concat_linears(layers: Sequence[nn.Module]) -> nn.Module:
    """One layer computing all of `layers` at once (their outputs side by side).

    Fusing q/k/v (and gate/up) saves a matmul call per projection in every layer of
    every decode step. Per-channel and group-wise formats concatenate exactly: each
    output row keeps its own scales, so the fused layer computes the same numbers.
    """
    first = layers[0]
    if not all(type(m) is type(first) for m in layers):
        raise TypeError("can only fuse layers of one kind")
    bias = None
    if any(m.bias is not None for m in layers):
        like = next(m.bias for m in layers if m.bias is not None)
        bias = torch.cat([m.bias if m.bias is not None else like.new_zeros(m.out_features) for m in layers])
    if isinstance(first, nn.Linear):
        fused = nn.Linear(first.in_features, sum(m.out_features for m in layers), bias=bias is not None,
                          device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in layers]))
            if bias is not None:
                fused.bias.copy_(bias)
        return fused.requires_grad_(False)
    if isinstance(first, Int8ActLinear):
        if len({(m.activations, float(m.act_scale)) for m in layers}) != 1:
            raise TypeError("can only fuse W8A8 layers that round their (shared) input the same way")
        return Int8ActLinear(torch.cat([m.qweight for m in layers]), torch.cat([m.scale for m in layers]),
                             bias, activations=first.activations, act_scale=first.act_scale)
    if len({m.activations for m in layers}) != 1:
        raise TypeError("can only fuse layers that all take int8 activations or all take floats")
    if isinstance(first, Int8Linear):
        quantized: QuantizedLinear = Int8Linear(torch.cat([m.qweight for m in layers]),
                                                torch.cat([m.scale for m in layers]), bias)
    elif isinstance(first, Int4Linear):
        if len({m.group_size for m in layers}) != 1:
            raise TypeError("can only fuse int4 layers with one group size")
        quantized = Int4Linear(torch.cat([m.packed for m in layers]), torch.cat([m.dm for m in layers]),
                               first.group_size, bias)
    else:
        raise TypeError(f"cannot fuse {type(first).__name__}")
    quantized.activations = first.activations
    return quantized


def int8_activations(model: nn.Module, scales: Literal["block", "token"] = "block") -> int:
    """Make every weight-only int8 and int4 layer of `model` round its input to int8, with a scale
    per 32 inputs (`scales="block"`, as llama.cpp) or per token, and multiply integers; returns how
    many layers that is. W8A8 layers keep their own scales. Set it before building an
    `Engine`/`ModelRunner`, which fuse the layers."""
    if scales not in ("block", "token"):
        raise ValueError(f"int8 activation scales are per 'block' (of 32 inputs) or per 'token', "
                         f"got {scales!r}")
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))
              and not isinstance(m, Int8ActLinear)]
    if not layers and not any(isinstance(m, Int8ActLinear) for m in model.modules()):
        raise ValueError("int8 activations need int8 or int4 weights: quantize the model first "
                         "(--quantize int8 or int4)")
    if scales == "block" and (odd := next((m for m in layers if m.in_features % 32), None)) is not None:
        raise ValueError(f"int8 activations per 32 inputs need layers of a multiple of 32 inputs, one has "
                         f"{odd.in_features}: use scales='token'")
    for layer in layers:
        layer.activations = "block" if scales == "block" else "dynamic"
    return len(layers)


def interleave_linears(a: nn.Module, b: nn.Module) -> nn.Module:
    """One layer whose output rows alternate a0, b0, a1, b1, ... (a and b of equal size).

    SwiGLU needs gate row r and up row r together; with the two rows adjacent in memory,
    a decode kernel that produces silu(gate_r) * up_r reads one sequential stream of
    weights instead of two streams far apart, which streams measurably faster.
    """
    fused = concat_linears([a, b])
    n = a.out_features
    order = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1).reshape(-1)
    for t in [*fused.parameters(recurse=False), *fused.buffers(recurse=False)]:
        if t is not None and t.dim() and t.shape[0] == 2 * n:  # per-output tensors (not a layer-wide scale)
            t.data = t.data[order.to(t.device)].contiguous()
    return fused


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix once; of the embedding one row.

    For a tied model without a separate `lm_head`, the embedding matrix *is* the LM head
    and is read in full.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.weight_bytes()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, nn.Embedding):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 1 or (name == "bias"):
                total += p.numel() * p.element_size()
    if "lm_head" not in model._modules and getattr(model.config, "tie_embeddings", False):
        total += model.embed.weight.numel() * model.embed.weight.element_size()
    return total
