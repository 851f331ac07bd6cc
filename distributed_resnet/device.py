"""Which device a loop runs on, and whether it trains in bf16. Pure torch, no Ray.

bf16 autocast + channels_last pays on CUDA and on CPUs with native bf16 (Intel AMX or AVX512-BF16: about 2x
over fp32 for ResNet-20 on this project's Xeon); elsewhere a CPU emulates bf16 and is slower than fp32.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import UserError

PRECISIONS = ("auto", "bf16", "fp32", "fp64")


def cpu_has_native_bf16() -> bool:
    """True where oneDNN has bf16 kernels for this CPU (AMX or AVX512-BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def param_dtype(precision: str) -> torch.dtype:
    """fp64 weights and activations for `--precision fp64` (verification runs: N workers against one, without fp32's
    rounding noise, which training amplifies); fp32 otherwise."""
    return torch.float64 if precision == "fp64" else torch.float32


def use_bf16(precision: str, device: torch.device) -> bool:
    """The fast path (bf16 autocast, channels_last, fused Adam) for `precision` on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return cuda_has_native_bf16(torch.cuda.get_device_capability(device))
        return device.type == "cpu" and cpu_has_native_bf16()
    return precision == "bf16"


def precision_text(precision: str, gpu: bool, compiled: bool = False) -> str:
    """What a run computes in, for its first line; on CPU workers as this machine's CPU decides (`auto`)."""
    if precision != "auto":
        what = precision
    elif gpu:
        what = "bf16 on GPUs of compute capability 8.0+, else fp32"
    elif cpu_has_native_bf16():
        what = "bf16 (this CPU has native bf16)"
    else:
        what = "fp32 (this CPU has no native bf16, which it would emulate slower than fp32)"
    return f"precision {what}" + (", compiled step" if compiled else "")


def cuda_has_native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores start with Ampere (compute capability 8.0); a T4 (7.5) or V100 (7.0) emulates bf16."""
    return tuple(capability) >= (8, 0)


@contextlib.contextmanager
def exact_fp32():
    """Plain fp32 inside (evaluation): on Ampere and later, cuDNN convolutions and matmuls would otherwise run
    in TF32 (10-bit mantissa) by default. Restores the previous settings after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def local_device(use_gpu: bool | None) -> torch.device:
    """The device of a loop that runs in this process (`--num-workers 0`), from the flags, not from Ray.

    (Ray's `get_device()` there answers cuda whenever CUDA exists, whatever `use_gpu` says.)
    """
    if use_gpu is False or (use_gpu is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--gpu was given but this machine has no CUDA GPU; drop --gpu to train on the CPU")
    return torch.device("cuda", torch.cuda.current_device())
