"""The device and compute dtype a model is loaded on: ``--device auto`` and ``--dtype auto`` resolved from what this
machine has (CUDA devices and their compute capability, MPS, the CPU's native bf16 instructions), with the reason
logged at startup."""

from __future__ import annotations

import logging
from pathlib import Path
from types import MappingProxyType

import torch

from llava_med.model.args import LoadConfig

__all__ = ["CPU_BF16_FLAGS", "DTYPES", "choose_dtype", "cpu_native_bf16", "cuda_native_bf16", "dtype_reason",
           "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)

DTYPES = MappingProxyType({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16})


def resolve_device(device: str) -> str:
    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no CUDA device")
        if device == "mps" and not torch.backends.mps.is_available():
            raise ValueError("--device mps was asked for but MPS is not available")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cuda_native_bf16() -> bool:
    """True when every visible CUDA device computes bf16 in hardware (compute capability 8.0+: Ampere and later;
    ROCm). ``torch.cuda.is_bf16_supported()`` also counts emulation, which is slow (V100, T4)."""
    if torch.version.hip:
        return True
    return all(torch.cuda.get_device_properties(i).major >= 8 for i in range(torch.cuda.device_count()))


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """``auto`` (or None): bf16 (or fp16 where bf16 is unsupported) on GPUs, fp16 on MPS, bf16 on a CPU with native
    bf16 instructions (see :func:`cpu_native_bf16`), fp32 on other CPUs."""
    if dtype is not None and dtype != "auto":
        return DTYPES[dtype]
    if device == "cuda":
        return torch.bfloat16 if cuda_native_bf16() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic: x86 AVX512-BF16 and AMX, Arm's BF16 extension.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_native_bf16(cpuinfo: str | None = None) -> str | None:
    """The CPU flag that gives this CPU native bf16 arithmetic, or None (also where ``/proc/cpuinfo`` is absent).

    On such CPUs the ~150M model served 2.6x the tokens/s in bf16 than in fp32 (concurrency 16, measured side by
    side); elsewhere bf16 is emulated and slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)


def dtype_reason(dtype: str | None, device: str) -> str:
    """Why :func:`resolve_dtype` chose what it did (for the startup log)."""
    if dtype is not None and dtype != "auto":
        return f"--dtype {dtype}"
    if device != "cpu":
        return f"--dtype auto on {device}"
    flag = cpu_native_bf16()
    if flag:
        return f"--dtype auto: this CPU has native bf16 ({flag})"
    return "--dtype auto: this CPU has no native bf16 (no avx512_bf16/amx_bf16), bf16 would be emulated"


def choose_dtype(cfg: LoadConfig, device: str) -> tuple[torch.dtype, str]:
    """The compute dtype for ``cfg`` on ``device`` and why (for the log): :func:`resolve_dtype`, except that 8-bit
    quantisation on a GPU computes in fp16 (bitsandbytes' int8 matmuls cast every other dtype to fp16)."""
    dtype = resolve_dtype(cfg.dtype, device)
    if device != "cuda":
        return dtype, dtype_reason(cfg.dtype, device)
    gpus = ", ".join(sorted({f"{torch.cuda.get_device_name(i)} (compute capability "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                             for i in range(torch.cuda.device_count())}))
    native = cuda_native_bf16()
    explicit = cfg.dtype not in (None, "auto")
    if not explicit and cfg.load_8bit:
        return torch.float16, "--load-8bit computes in float16"
    if explicit:
        if dtype == torch.bfloat16 and not native:
            logger.warning("--dtype bfloat16 on %s: no native bfloat16, it is emulated and slow; float16 is faster",
                           gpus)
        if cfg.load_8bit and dtype != torch.float16:
            logger.warning("--load-8bit with --dtype %s: the int8 matmuls cast their inputs to float16 anyway",
                           cfg.dtype)
        return dtype, "--dtype"
    return dtype, f"{gpus} {'has' if native else 'has no'} native bfloat16"
