"""The machine a benchmark runs on, described the same way by every benchmark.

A number without its machine cannot be judged: a CPU with AVX-512 BF16 or AMX runs bf16
matmuls in hardware, one without falls back to a slow generic path; two vCPUs of a shared
VM are not two cores of an idle laptop. Every benchmark therefore calls `announce()`
first: it prints one line (CPU model, instruction-set flags that decide matmul and
kernel speed, cores, memory, GPU, Python, torch and its thread count, load) and returns
the same facts as a dict, which the benchmark records under "machine" in its JSON.

    python benchmarks/machine.py          # the line and the JSON for this machine
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

#: instruction sets that decide the speed of what the benchmarks run: AVX2/FMA/F16C for
#: lmforge's C kernels and fp32 GEMMs, AVX-512 (and its BF16/VNNI parts) and AMX for bf16
#: and int8 matmuls in hardware
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
             "amx_int8")


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            entry[key.strip()] = value.strip()
        cpus.append(entry)
    return cpus


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """This machine's facts; `packages` (distribution names, e.g. the anchors) get their versions too."""
    import torch

    cpus = _cpuinfo()
    first = cpus[0] if cpus else {}
    flags = set(first.get("flags", "").split())
    cores = {(c.get("physical id"), c.get("core id")) for c in cpus if "core id" in c}
    return {
        "cpu": first.get("model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": len(cores) or None,
        "flags": {flag: flag in flags for flag in ISA_FLAGS} if flags else None,
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "packages": {name: _version(name) for name in packages},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _isa(flags: dict[str, bool] | None) -> str:
    if flags is None:
        return "instruction sets unknown"
    have = [name for name in ("avx2", "fma", "f16c") if flags[name]]
    avx512 = [name for name in ("avx512f", "avx512_bf16", "avx512_vnni") if flags[name]]
    amx = [name for name in ("amx_tile", "amx_bf16", "amx_int8") if flags[name]]
    parts = [" + ".join(name.upper() for name in have) or "no AVX2"]
    parts.append(f"AVX-512 ({', '.join(avx512)})" if avx512 else "no AVX-512")
    parts.append(f"AMX ({', '.join(amx)})" if amx else "no AMX")
    return ", ".join(parts)


def summary(info: dict[str, Any]) -> str:
    """One line: what a table's header needs to name the machine its figures come from."""
    cores = f"{info['logical_cpus']} logical CPUs"
    if info["physical_cores"]:
        cores += f" ({info['physical_cores']} cores)"
    if info["usable_cpus"] != info["logical_cpus"]:
        cores += f", {info['usable_cpus']} usable"
    memory = f", {info['memory_bytes'] / 2**30:.0f} GiB RAM" if info["memory_bytes"] else ""
    gpus = ", ".join(info["gpus"]) or "no GPU"
    packages = "".join(f", {name} {version or 'not installed'}" for name, version in info["packages"].items())
    threads = f"{info['torch_threads']} thread{'s' if info['torch_threads'] != 1 else ''}"
    load = f"; load average {info['load_average'][0]:.1f}" if info["load_average"] else ""
    return (f"machine: {info['cpu']}, {cores}, {_isa(info['flags'])}{memory}; {gpus}; "
            f"Python {info['python']}, torch {info['torch']} ({threads}){packages}{load}")


def announce(packages: tuple[str, ...] = (), file: Any = None) -> dict[str, Any]:
    """Print this machine's one-line summary (first thing a benchmark does); return its facts."""
    info = describe(packages)
    print(summary(info), file=file or sys.stdout, flush=True)
    return info


if __name__ == "__main__":
    print(json.dumps(announce(), indent=2))
