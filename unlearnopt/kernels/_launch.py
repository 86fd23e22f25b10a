"""Launch settings and device guard shared by the row kernels (one place to tune them)."""

from __future__ import annotations

import contextlib

import torch
import triton


def row_launch_settings(vocab: int, dtype: torch.dtype, rows_per_chunk: int = 1) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a kernel that streams ``rows_per_chunk`` rows of ``vocab``
    logits of ``dtype`` together, one chunk of each held in float32 registers.

    The cap is on register elements: 8192 fp32 (16 per thread at 16 warps), or 16384 for
    2-byte inputs whose loads are half as wide, divided among the rows held at once. Large
    enough that each program keeps many loads in flight, small enough not to spill; short
    rows get a single chunk and fewer warps.
    """
    cap = (8192 if dtype == torch.float32 else 16384) // rows_per_chunk
    block = max(16, min(triton.next_power_of_2(vocab), cap))
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, warps


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_gradient_args(
    logits: torch.Tensor, grad_scale: torch.Tensor | None, grad_out: torch.Tensor | None
) -> tuple[torch.Tensor | None, int]:
    """Validate the optional gradient outputs of a row kernel over ``logits [N, V]``.

    ``grad_scale``: float32 on the logits' device with 1 (broadcast) or N elements;
    ``grad_out``: ``[N, V]`` of the logits' dtype with unit column stride (may be ``logits``).
    Both or neither. Returns ``(grad_scale flattened, its stride: 0 broadcast / 1 per row)``.
    """
    n, vocab = logits.shape
    device = logits.device
    if grad_scale is None:
        if grad_out is not None:
            raise ValueError("grad_out given without grad_scale")
        return None, 0
    if grad_out is None:
        raise ValueError("grad_out is required when grad_scale is given")
    if (
        grad_scale.dtype != torch.float32
        or grad_scale.numel() not in (1, n)
        or grad_scale.device != device
    ):
        raise ValueError(
            f"grad_scale must be float32 on {device} with 1 or {n} elements, "
            f"got {tuple(grad_scale.shape)} {grad_scale.dtype} on {grad_scale.device}"
        )
    if (
        grad_out.shape != logits.shape
        or grad_out.stride(1) != 1
        or grad_out.dtype != logits.dtype
        or grad_out.device != device
    ):
        raise ValueError(
            f"grad_out must be [{n}, {vocab}] {logits.dtype} with unit column "
            f"stride on {device}, got {tuple(grad_out.shape)} {grad_out.dtype} "
            f"strides {grad_out.stride()} on {grad_out.device}"
        )
    grad_scale = grad_scale.reshape(-1).contiguous()
    return grad_scale, 1 if grad_scale.numel() > 1 else 0
