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
