"""Build and load lmforge's CPU decode kernels (`decode.c`) on first use, and call them.

The C file is compiled once per machine with the system C compiler (about a second),
cached under `~/.cache/lmforge/kernels/<hash>/`, and loaded with ctypes. It needs no
PyTorch headers; it links the same OpenMP runtime (libgomp) that PyTorch has already
loaded, so both share one thread pool and `torch.set_num_threads` applies to both.

The instruction set is chosen from what this CPU reports (/proc/cpuinfo), never
assumed: the AVX2 + FMA + F16C path where all three exist, portable C elsewhere
(`LMFORGE_KERNEL_ISA=portable` forces it, so both paths can be tested on one machine).
The cached library is loaded only if its sha256 matches the one recorded when it was
built; anything else in that folder is rebuilt, not run.

Everything that uses these kernels has a plain PyTorch path, taken when they are
unavailable and on every device but the CPU; nothing depends on them but speed. Why they
are unavailable is never hidden: `status()` says (disabled, another platform, or the
compiler's error), and a failed build logs a warning.
The structures below mirror `decode.c`.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path

import torch

from lmforge.atomic import atomic_write

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode.c")
F32, INT8, INT4 = 0, 1, 2
# a matmul's input: fp32, or int8 with a scale per row (per token, or one fixed scale) or per 32 inputs
ACT_F32, ACT_DYNAMIC, ACT_STATIC, ACT_BLOCK = 0, 1, 2, 3
RMSNORM, LAYERNORM = 0, 1
MLP_KINDS = {"swiglu": 0, "gelu_tanh": 1, "gelu": 2, "relu2": 3}


class Weight(ctypes.Structure):
    """A weight matrix in one of three formats (`lmf_weight`); pointers into PyTorch tensors. `act`
    says whether the matmul rounds its input to int8 first (int8 and int4 weights)."""

    _fields_ = [("kind", ctypes.c_int32), ("group", ctypes.c_int32), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("data", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("act", ctypes.c_int32), ("act_scale", ctypes.c_float)]


class Layer(ctypes.Structure):
    """One transformer layer's sizes, weights and KV-cache location (`lmf_layer`)."""

    _fields_ = [("d", ctypes.c_int64), ("n_heads", ctypes.c_int64), ("n_kv", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("d_ff", ctypes.c_int64), ("eps", ctypes.c_float),
                ("norm", ctypes.c_int32), ("mlp", ctypes.c_int32), ("window", ctypes.c_int32),
                ("attn_norm_w", ctypes.c_void_p), ("attn_norm_b", ctypes.c_void_p),
                ("mlp_norm_w", ctypes.c_void_p), ("mlp_norm_b", ctypes.c_void_p),
                ("q_norm_w", ctypes.c_void_p), ("k_norm_w", ctypes.c_void_p),
                ("qkv", Weight), ("o", Weight), ("up", Weight), ("down", Weight),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("slot_stride", ctypes.c_int64), ("head_stride", ctypes.c_int64),
                ("token_stride", ctypes.c_int64)]


class Model(ctypes.Structure):
    """Everything a decode step reads: embeddings, layers, final norm, LM head (`lmf_model`)."""

    _fields_ = [("n_layers", ctypes.c_int64), ("d", ctypes.c_int64), ("vocab", ctypes.c_int64),
                ("layers", ctypes.POINTER(Layer)), ("embed", ctypes.c_void_p), ("pos_embed", ctypes.c_void_p),
                ("final_norm", ctypes.c_int32), ("final_w", ctypes.c_void_p), ("final_b", ctypes.c_void_p),
                ("final_eps", ctypes.c_float), ("head", Weight), ("inv_freq", ctypes.c_void_p)]


class Step(ctypes.Structure):
    """What changes every decode step (`lmf_step`)."""

    _fields_ = [("batch", ctypes.c_int64), ("tokens", ctypes.c_void_p), ("slots", ctypes.c_void_p),
                ("lengths", ctypes.c_void_p), ("scratch", ctypes.c_void_p), ("max_keys", ctypes.c_int64),
                ("token_index", ctypes.c_void_p), ("argmax", ctypes.c_void_p), ("chunk", ctypes.c_int32),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p)]


ISA_FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "portable": []}
ISA_CODES = {"portable": 0, "avx2": 1}  # what the built library's lmf_isa() returns


def cpu_features() -> set[str]:
    """The CPU's feature flags as the kernel reports them (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa() -> str:
    """The instruction set to build for: forced by `LMFORGE_KERNEL_ISA`, else the best this CPU has."""
    forced = os.environ.get("LMFORGE_KERNEL_ISA")
    if forced:
        if forced not in ISA_FLAGS:
            raise ValueError(f"LMFORGE_KERNEL_ISA={forced!r}: choose one of {', '.join(ISA_FLAGS)}")
        return forced
    return "avx2" if {"avx2", "fma", "f16c"} <= cpu_features() else "portable"


def _flags(target_isa: str) -> list[str]:
    return ["-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp", *ISA_FLAGS[target_isa], "-lm"]


class KernelBuildError(RuntimeError):
    """The kernels could not be built (no compiler, or it failed); the message says why."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trusted(target: Path) -> bool:
    """The library exists and is byte for byte the one this process's build recorded."""
    digest = target.with_name(target.name + ".sha256")
    return target.exists() and digest.exists() and digest.read_text().strip() == _sha256(target)


def _compile(target: Path, target_isa: str) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise KernelBuildError("no C compiler found (install gcc, or set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes building at once: the second waits, then reuses
        if _trusted(target):
            return
        with tempfile.TemporaryDirectory() as tmp:  # a crash mid-build must not leave a broken library
            built = Path(tmp) / target.name
            try:
                result = subprocess.run([compiler, str(SOURCE), "-o", str(built), *_flags(target_isa)],
                                        capture_output=True, text=True)
            except OSError as err:
                raise KernelBuildError(f"cannot run the C compiler {compiler!r}: {err}") from err
            if result.returncode != 0 or not built.exists():
                detail = (result.stderr or result.stdout).strip()[-2000:] or f"exit {result.returncode}"
                raise KernelBuildError(f"{compiler} could not compile {SOURCE.name}: {detail}")
            with atomic_write(target) as f:
                f.write(built.read_bytes())
            with atomic_write(target.with_name(target.name + ".sha256"), "w") as f:
                f.write(_sha256(target) + "\n")


_status = "not loaded yet"


def status() -> str:
    """Why the kernels are or are not in use, in a phrase (shown by `lmforge info` and the tests)."""
    library()
    return _status


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it first if needed; None when unavailable (see `status`)."""
    global _status
    if os.environ.get("LMFORGE_KERNELS", "1") == "0":
        _status = "disabled by LMFORGE_KERNELS=0"
        return None
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        _status = f"not built for {platform.system()} {platform.machine()} (Linux x86-64 only)"
        return None
    from lmforge.hub import cache_dir

    target_isa = isa()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(_flags(target_isa)).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / key / "lmforge_decode.so"
    try:
        if not _trusted(target):
            if target.exists():
                log.warning("%s does not match the sha256 recorded when it was built; rebuilding", target)
            else:
                log.info("building lmforge's CPU kernels for %s (once)", target_isa)
            _compile(target, target_isa)
        lib = ctypes.CDLL(str(target))
    except (KernelBuildError, OSError) as err:  # a missing compiler must never break inference, only slow it
        _status = f"unavailable, using plain PyTorch: {err}"
        log.warning("lmforge CPU kernels %s", _status)
        return None
    lib.lmf_isa.restype = ctypes.c_int
    if lib.lmf_isa() != ISA_CODES[target_isa]:
        _status = f"unavailable: the library built for {target_isa} reports another instruction set"
        return None
    _status = f"built for {target_isa}"
    lib.lmf_linear.argtypes = [ctypes.POINTER(Weight), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_int]
    lib.lmf_norm.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_float, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.lmf_decode.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Step), ctypes.c_void_p]
    lib.lmf_scratch_floats.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, ctypes.c_int64]
    lib.lmf_scratch_floats.restype = ctypes.c_int64
    lib.lmf_read_stream.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32]
    lib.lmf_read_stream.restype = ctypes.c_double
    for fn in (lib.lmf_linear, lib.lmf_norm, lib.lmf_decode):
        fn.restype = None
    return lib


def available() -> bool:
    return library() is not None


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s this machine reads from memory on all threads (best of `repeats` passes over `nbytes`,
    far larger than the caches): the bound a batch-1 decode step, which reads every weight once,
    cannot beat. A streaming loop in C (`lmf_read_stream`), not `torch.sum`, whose reduction
    does more than load and underestimates the machine."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"lmforge's CPU kernels are {status()}")
    data = torch.ones(nbytes // 4 // 64 * 64)
    lib.lmf_read_stream(data.data_ptr(), data.numel(), 1)  # touch every page once first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total = lib.lmf_read_stream(data.data_ptr(), data.numel(), 1)
        best = min(best, time.perf_counter() - start)
    if total != data.numel():
        raise RuntimeError(f"the read loop summed {total} ones, not {data.numel()}")
    return data.numel() * 4 / best


def pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def weight(kind: int, data: torch.Tensor, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
           group: int = 0, act: int = ACT_F32, act_scale: float = 0.0) -> Weight:
    """A `Weight` viewing these tensors (fp32 CPU, contiguous). The caller keeps them alive.
    `act`: ACT_DYNAMIC rounds each input row to int8 with its own scale (max|x| / 127), ACT_STATIC
    with `act_scale`, ACT_BLOCK with a scale per 32 inputs; then the products are integer (int8
    and int4 weights only)."""
    if act != ACT_F32 and kind == F32:
        raise ValueError("int8 activations need int8 or int4 weights")
    n = data.shape[0]
    k = data.shape[1] * (2 if kind == INT4 else 1)
    if act == ACT_BLOCK and k % 32:
        raise ValueError(f"int8 activations with a scale per 32 inputs need a multiple of 32 inputs, got {k}")
    return Weight(kind, group, n, k, pointer(data), pointer(scale), pointer(bias), act, act_scale)


def linear(w: Weight, x: torch.Tensor, out: torch.Tensor | None = None,
           accumulate: bool = False) -> torch.Tensor:
    """out[m] (= or +=) x[m] @ W^T + bias for a contiguous fp32 x [M, K]."""
    if out is None:
        out = torch.empty(x.shape[0], w.n, dtype=torch.float32)
    library().lmf_linear(ctypes.byref(w), x.data_ptr(), x.shape[0], out.data_ptr(), int(accumulate))
    return out
