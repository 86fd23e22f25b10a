"""Triton kernels of the gradient Gram matrices: one launch over all tensors (multi-tensor).

Host tables, built once per call (and cached by data pointers, so a training loop that
reuses its gradient buffers builds them once):

* ``addr [K, P]`` int64: ``data_ptr()`` of objective k's gradient of tensor p, 0 for
  ``None`` (its loads are masked off, so a missing gradient reads as zeros and costs no
  traffic). The kernel turns a row of it into pointers with ``tl.pointer_type``; this also
  works in the interpreter (``TRITON_INTERPRET=1``), where pointers are host addresses of
  CPU tensors, so the same path is tested on CPU.
* ``chunks [C, 3]`` int64: (tensor index p, first element, output slot) per chunk of at
  most ``CHUNK`` elements; all chunks of all tensors, so big and small tensors are balanced
  over the concatenated element range, not one program per tensor.
* ``numel [P]`` and ``first_chunk [P + 1]`` int64.

Stage 1 (grid = chunks): a program loads the ``[K, BLOCK]`` tile of its chunk once per
step and accumulates all products ``x_i * x_j`` elementwise in float32 registers (the
full ``K x K`` square: the symmetric half is free on a memory-bound kernel), reduces over
the block at the end and writes its ``K x K`` partial to its own slot. Stage 2 (grid =
tensors) sums the slots of each tensor in chunk order in float64. No atomics: the result
is bitwise reproducible. All element offsets are int64.

One stage-1 launch per gradient dtype present (the pointer element type is a compile-time
constant); usually that is one launch.

Imported lazily (``import triton`` happens here only), see ``unlearnopt.kernels``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from unlearnopt.kernels._launch import device_guard

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def launch_settings(k: int) -> tuple[int, int, int]:
    """``(CHUNK, BLOCK, num_warps)`` for K objectives: the only place they are set.

    The accumulator is ``K_pad^2 * BLOCK`` float32 held in registers, so BLOCK shrinks as K
    grows (8 x 8 x 64 = 4096 values = 32 per thread at 4 warps). CHUNK (elements per
    program) is large enough to amortise the table loads and the partial write, small
    enough to give thousands of programs on a 170M-parameter model.
    """
    kp = triton.next_power_of_2(k)
    block = max(64, min(1024, 4096 // (kp * kp)))
    return 16384, block, 4


@triton.jit
def _gram_chunks_kernel(
    chunks_ptr,
    numel_ptr,
    addr_ptr,
    partial_ptr,
    P,
    K: tl.constexpr,
    KP: tl.constexpr,
    DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    p = tl.load(chunks_ptr + c * 3)
    start = tl.load(chunks_ptr + c * 3 + 1)
    slot = tl.load(chunks_ptr + c * 3 + 2)
    end = tl.minimum(start + CHUNK, tl.load(numel_ptr + p))
    rows = tl.arange(0, KP)
    row_ok = rows < K
    addr = tl.load(addr_ptr + rows.to(tl.int64) * P + p, mask=row_ok, other=0)
    present = addr != 0
    base = addr.to(tl.pointer_type(DTYPE))
    cols = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros((KP, KP, BLOCK), dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + cols
        m = present[:, None] & (idx < end)[None, :]
        x = tl.load(base[:, None] + idx[None, :], mask=m, other=0.0).to(tl.float32)
        acc += x[:, None, :] * x[None, :, :]
    g = tl.sum(acc, axis=2)
    out = partial_ptr + slot * (K * K) + rows[:, None] * K + rows[None, :]
    tl.store(out, g, mask=row_ok[:, None] & row_ok[None, :])


@triton.jit
def _gram_reduce_kernel(partial_ptr, first_chunk_ptr, out_ptr, KK: tl.constexpr, KKP: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    lo = tl.load(first_chunk_ptr + p)
    hi = tl.load(first_chunk_ptr + p + 1)
    cols = tl.arange(0, KKP)
    m = cols < KK
    acc = tl.zeros((KKP,), dtype=tl.float64)
    for c in range(lo, hi):
        acc += tl.load(partial_ptr + c * KK + cols, mask=m, other=0.0).to(tl.float64)
    tl.store(out_ptr + p * KK + cols, acc, mask=m)


class _Tables:
    __slots__ = ("addr", "first_chunk", "groups", "n_chunks", "numel")

    def __init__(self, addr, numel, first_chunk, groups, n_chunks):
        self.addr = addr
        self.numel = numel
        self.first_chunk = first_chunk
        self.groups = groups  # [(triton dtype, chunks [C_g, 3] int64)]
        self.n_chunks = n_chunks


_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 8


def _to_device(rows: list, device: torch.device) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: a pageable host-to-device copy would sync the stream.
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _tables(
    grads: Sequence[Sequence[torch.Tensor | None]], device: torch.device, chunk: int
) -> _Tables:
    k, p_count = len(grads), len(grads[0])
    addr = [[0 if g is None else g.data_ptr() for g in seq] for seq in grads]
    numel = [0] * p_count
    dtypes: list[torch.dtype | None] = [None] * p_count
    for seq in grads:
        for p, g in enumerate(seq):
            if g is not None:
                numel[p], dtypes[p] = g.numel(), g.dtype
    key = (device, chunk, tuple(map(tuple, addr)), tuple(numel), tuple(dtypes))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    first_chunk = [0] * (p_count + 1)
    per_dtype: dict[torch.dtype, list[list[int]]] = {}
    slot = 0
    for p in range(p_count):
        first_chunk[p] = slot
        if dtypes[p] is not None:
            rows = per_dtype.setdefault(dtypes[p], [])
            for start in range(0, numel[p], chunk):
                rows.append([p, start, slot])
                slot += 1
    first_chunk[p_count] = slot
    groups = [(_TL_DTYPE[dt], _to_device(rows, device)) for dt, rows in per_dtype.items()]
    tables = _Tables(
        _to_device(addr if k * p_count else [[0]], device),
        _to_device(numel or [0], device),
        _to_device(first_chunk, device),
        groups,
        slot,
    )
    _CACHE[key] = tables
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return tables


def grad_gram_per_tensor(grads: Sequence[Sequence[torch.Tensor | None]]) -> torch.Tensor:
    """``[P, K, K]`` float64 Gram matrices of K lists of P flat contiguous gradients.

    ``grads[k][p]``: 1-D contiguous float32 / bfloat16 / float16 tensor (the same dtype and
    size across k) or ``None`` (zeros); all on one device (CUDA, or CPU when interpreting).
    """
    k, p_count = len(grads), len(grads[0])
    device = next(g.device for seq in grads for g in seq if g is not None)
    chunk, block, warps = launch_settings(k)
    tables = _tables(grads, device, chunk)
    out = torch.zeros(p_count, k, k, dtype=torch.float64, device=device)
    if tables.n_chunks == 0:
        return out
    partial = torch.empty(tables.n_chunks, k * k, dtype=torch.float32, device=device)
    kp = triton.next_power_of_2(k)
    with device_guard(device):
        for tl_dtype, chunks in tables.groups:
            _gram_chunks_kernel[(chunks.shape[0],)](
                chunks,
                tables.numel,
                tables.addr,
                partial,
                p_count,
                K=k,
                KP=kp,
                DTYPE=tl_dtype,
                CHUNK=chunk,
                BLOCK=block,
                num_warps=warps,
            )
        _gram_reduce_kernel[(p_count,)](
            partial, tables.first_chunk, out, KK=k * k, KKP=triton.next_power_of_2(k * k)
        )
    return out
