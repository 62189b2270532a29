"""The device stage: choose device and dtype, move uint8 batches there and finish the pixels on whole batches."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterator

from mv2batch.config import DEVICE_PATTERN
from mv2batch.errors import ConfigError
from mv2batch.loading.preprocess import PixelNorm

if TYPE_CHECKING:
    import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def pick_device(requested: str, local_rank: int | None = None) -> torch.device:
    """auto: cuda (the local rank's GPU under torchrun / Slurm), then mps, then cpu."""
    import torch

    if not DEVICE_PATTERN.match(requested):
        raise ConfigError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", (local_rank or 0) % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: no CUDA GPU is available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available here")
    return device


def dtype_of(requested: str) -> torch.dtype:
    """The torch dtype of --dtype; auto is fp32 everywhere for now: exact parity with transformers is the default
    promise. Needs no device (a job is described before it is placed)."""
    import torch

    if requested == "auto":
        return torch.float32
    if requested not in DTYPES:
        raise ConfigError(f"unknown dtype {requested!r}: use auto, fp32, bf16 or fp16")
    return getattr(torch, DTYPES[requested])


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot run."""
    import torch

    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("--dtype fp16 is not supported on the CPU: use bf16 or fp32")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """dtype_of, checked against the device."""
    dtype = dtype_of(requested)
    check_dtype(dtype, device)
    return dtype


@contextmanager
def float32_math(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """fp32 on a CUDA GPU computed in IEEE float32 while the block runs; the previous settings come back after.

    PyTorch lets cuDNN run float32 convolutions in TF32 (10-bit mantissa) by default. Measured on an H200 over
    256 photos, that moved a calibrated MobileViTV2's probabilities by up to 0.2 between two fp32 runs that
    differed only in batch size: not "the same as transformers". bf16 / fp16 and other devices are left alone.
    """
    import torch

    if getattr(device, "type", None) != "cuda" or dtype != torch.float32:
        yield
        return
    settings = _fp32_precision_settings()
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in settings]
    for owner, name, exact in settings:
        setattr(owner, name, exact)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _fp32_precision_settings() -> list[tuple[object, str, str | bool]]:
    """(object, attribute, IEEE value) for cuDNN convolutions and CUDA matrix products.

    torch >= 2.9 has fp32_precision ("ieee" / "tf32") and refuses a mix with the older allow_tf32 flags.
    """
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return [(conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]


@dataclass
class PixelStage:
    """uint8 NHWC on the host to model-ready NCHW on the device: rescale, BGR flip, normalise, cast."""

    norm: PixelNorm
    device: torch.device
    dtype: torch.dtype
    channels_last: bool = False

    def __call__(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        import torch

        x = pixels_u8.to(self.device, non_blocking=True)
        # Flip and lay out the uint8 bytes (a quarter of float32's), then convert once: per element the same
        # operations in the same order as rescale -> flip -> permute, so the same bits, ~7x faster on the CPU.
        if self.norm.flip_bgr:
            x = x.flip(-1)
        x = x.permute(0, 3, 1, 2)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=memory_format)
        if _divides_in_half_precision(x, self.norm.rescale_factor, self.dtype):
            return x.to(self.dtype).div_(255)
        x = rescale(x, self.norm.rescale_factor)
        return x if x.dtype == self.dtype else x.to(self.dtype)


def _divides_in_half_precision(x: torch.Tensor, factor: float | None, dtype: torch.dtype) -> bool:
    """Whether bf16 / fp16 pixels can come from uint8 in one step: the same bits, in 0.026 instead of 0.064 ms
    per 256x256 image (2 threads), the 16-bit float formats holding every integer up to 255 exactly.

    The CPU divides a 16-bit float in float32 and rounds once to the 16-bit format: that is the float32 quotient
    `rescale` gives, cast as before, without writing and reading it back as float32 twice.
    """
    import torch

    return x.device.type == "cpu" and factor == 1 / 255 and dtype in (torch.bfloat16, torch.float16)


def rescale_by_lookup(x: torch.Tensor, factor: float) -> torch.Tensor:
    """rescale through a table of the 256 values computed as transformers computes them; keeps x's layout."""
    import torch

    return _rescale_table(factor, x.device)[x.to(torch.int32)]


@lru_cache(maxsize=8)
def _rescale_table(factor: float, device: torch.device) -> torch.Tensor:
    import torch

    return (torch.arange(256, dtype=torch.float64) * factor).to(torch.float32).to(device)


def rescale(x: torch.Tensor, factor: float | None,
            lookup: Callable[[torch.Tensor, float], torch.Tensor] = rescale_by_lookup) -> torch.Tensor:
    """uint8 to float32, bit-identical to transformers' numpy rescale (float64 product, cast to float32).

    lookup: how the values are found off the CPU (a test passes a spy, to see it used where no kernel runs).
    """
    import torch

    if factor is None:
        return x.to(torch.float32)
    if x.device.type != "cpu":
        # CUDA divides by a Python number as a multiplication by its float32 reciprocal, which misses the
        # correctly rounded quotient for 126 of the 256 values (by one ulp: 1e-4 in a probability end to end,
        # measured on an H200), and float64 is slow on most GPUs: look the 256 exact values up instead.
        return lookup(x, factor)
    if factor == 1 / 255:
        # On the CPU a correctly rounded float32 division gives the same 256 values as the float64 route, faster.
        return x.to(torch.float32).div_(255)
    return (x.to(torch.float64) * factor).to(torch.float32)


def to_host_later(tensors: list[torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
    """Start copying device tensors to the host and return at once; calling the result waits for the copies and
    gives the host tensors. On CUDA the copies go behind the work already queued, so that the next batch can be
    queued before this one's results are read; on the CPU there is nothing to copy or wait for."""
    import torch

    if not tensors or tensors[0].device.type == "cpu":
        return lambda: tensors
    if tensors[0].device.type != "cuda":
        return lambda: [t.cpu() for t in tensors]  # copied (and waited for) when asked
    host = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[torch.Tensor]:
        copied.synchronize()
        return host

    return wait
