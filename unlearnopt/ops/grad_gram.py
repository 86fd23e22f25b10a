"""Gram matrices of K gradients over many tensors, and the cosines that derive from them.

``grads`` is K sequences (one per objective) of P tensors with the same shapes in the same
order, typically each parameter's ``.grad`` after each objective's backward. The op reads
every gradient element once and emits all K(K+1)/2 products from that read (one launch
over all tensors on CUDA, one OpenMP pass on CPU), accumulating in float32 per block and
in float64 across blocks and chunks.

Distributed (DDP / FSDP2): DTensor gradients are reduced from their local shards (the
small ``[P, K, K]`` result is all-reduced, the gradients are never gathered); plain local
shards are reduced when the caller passes ``process_group=`` (or ``reduce=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unlearnopt.ops._backend import choose_backend, kernel, requested_backend
from unlearnopt.reference import grad_gram as ref
from unlearnopt.reference.grad_gram import GradGram, gram_to_cosine

__all__ = ["GradGram", "grad_cosine", "grad_gram", "gram_to_cosine"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: Elements per chunk of the native kernel (OpenMP task): 256 KB of float32 per objective.
NATIVE_CHUNK = 1 << 16
#: Largest K per kernel (Triton holds a K_pad x K_pad x BLOCK accumulator in registers; the
#: C++ kernel has fixed-size row tables). Larger K runs on the reference (see ``backend=``).
MAX_OBJECTIVES = {"triton": 16, "native": 64}


def _check_structure(grads) -> tuple[int, int]:
    if isinstance(grads, torch.Tensor) or not isinstance(grads, Sequence):
        raise TypeError(
            "grads must be a sequence of K sequences of tensors (one per objective), "
            f"got {type(grads).__name__}"
        )
    k = len(grads)
    if k == 0:
        raise ValueError("grads must hold at least one objective's gradients, got 0 sequences")
    for i, seq in enumerate(grads):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(
                f"grads[{i}] must be a sequence of tensors (or None), got {type(seq).__name__}"
            )
    p_count = len(grads[0])
    for i, seq in enumerate(grads):
        if len(seq) != p_count:
            raise ValueError(
                f"grads[{i}] has {len(seq)} tensors but grads[0] has {p_count}; "
                "every objective must list the same tensors in the same order"
            )
        for p, g in enumerate(seq):
            if g is not None and not isinstance(g, torch.Tensor):
                raise TypeError(
                    f"grads[{i}][{p}] must be a torch.Tensor or None, got {type(g).__name__}"
                )
    return k, p_count


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def _unwrap(grads, k: int, p_count: int):
    """Local tensors, and per tensor the DTensor (mesh, placements) or None."""
    dtensor = _dtensor_type()
    local = [list(seq) for seq in grads]
    layout: list[tuple | None] = [None] * p_count
    if dtensor is None:
        return local, layout
    for p in range(p_count):
        owner = None
        for i in range(k):
            g = local[i][p]
            if not isinstance(g, dtensor):
                if g is not None and owner is not None:
                    raise ValueError(
                        f"grads[{i}][{p}] is a plain tensor but grads[{owner}][{p}] is "
                        "a DTensor; expected the same kind for every objective"
                    )
                continue
            here = (g.device_mesh, tuple(g.placements))
            if owner is None:
                if any(local[j][p] is not None for j in range(i)):
                    raise ValueError(
                        f"grads[{i}][{p}] is a DTensor but an earlier objective's "
                        f"gradient of tensor {p} is a plain tensor"
                    )
                owner, layout[p] = i, here
            elif here != layout[p]:
                raise ValueError(
                    f"grads[{i}][{p}] has placements {here[1]} on {here[0]} but "
                    f"grads[{owner}][{p}] has {layout[p][1]} on {layout[p][0]}"
                )
            if any(pl.is_partial() for pl in here[1]):
                raise ValueError(
                    f"grads[{i}][{p}] is a DTensor with Partial placement "
                    f"{here[1]}: its Gram is not a sum over ranks; redistribute it "
                    "to Shard or Replicate first"
                )
            local[i][p] = g.to_local()
    return local, layout


def _check_tensors(local, k: int, p_count: int) -> torch.device | None:
    device = None
    first = None
    for p in range(p_count):
        ref_i = None
        for i in range(k):
            g = local[i][p]
            if g is None:
                continue
            if g.dtype not in _DTYPES:
                raise ValueError(
                    f"grads[{i}][{p}] must be float32/bfloat16/float16/float64, got dtype {g.dtype}"
                )
            if device is None:
                device, first = g.device, (i, p)
            elif g.device != device:
                raise ValueError(
                    f"grads[{i}][{p}] is on {g.device} but grads[{first[0]}]"
                    f"[{first[1]}] is on {device}; expected one device"
                )
            if ref_i is None:
                ref_i = i
                continue
            r = local[ref_i][p]
            if g.shape != r.shape:
                raise ValueError(
                    f"grads[{i}][{p}] has shape {tuple(g.shape)} but grads[{ref_i}]"
                    f"[{p}] has shape {tuple(r.shape)}; expected the same shape"
                )
            if g.dtype != r.dtype:
                raise ValueError(
                    f"grads[{i}][{p}] has dtype {g.dtype} but grads[{ref_i}][{p}] "
                    f"has dtype {r.dtype}; expected the same dtype"
                )
    return device


def _dense_layout(t: torch.Tensor) -> tuple[int, ...] | None:
    """The strides of a dense, non-overlapping tensor (any dim order), else None."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return None
        expected *= n
    return tuple(s for s, n in zip(t.stride(), t.shape) if n != 1)


def _flatten(local, k: int, p_count: int) -> list[list[torch.Tensor | None]]:
    """1-D contiguous views, copying only where needed.

    The Gram is invariant to one permutation of the elements applied to every objective,
    so dense tensors in ANY dim order (e.g. transposed) are read in place, as long as all
    objectives share the same strides; otherwise that tensor index is made contiguous
    (a copy for the non-contiguous gradients only).
    """
    flat: list[list[torch.Tensor | None]] = [[None] * p_count for _ in range(k)]
    for p in range(p_count):
        present = [(i, local[i][p]) for i in range(k) if local[i][p] is not None]
        if not present:
            continue
        layouts = {_dense_layout(g) for _, g in present}
        in_place = len(layouts) == 1 and None not in layouts
        for i, g in present:
            if g.numel() == 0:
                flat[i][p] = g.reshape(0)
            elif in_place:
                flat[i][p] = g.as_strided((g.numel(),), (1,))
            else:
                flat[i][p] = g.contiguous().view(-1)
    return flat


def _per_tensor(flat, backend: str) -> torch.Tensor:
    entry = kernel("grad_gram", backend)
    if backend == "triton":
        return entry(flat)
    # The C++ op takes the K x P gradients as one flat list.
    return entry([g for seq in flat for g in seq], len(flat), NATIVE_CHUNK)


def _kernel_gap(k: int, any_f64: bool, needs_grad: bool):
    """``unsupported`` for :func:`choose_backend`: what the Gram kernels cannot run."""

    def gap(backend: str) -> str | None:
        if any_f64:
            return "float64 gradients (the kernels accumulate in float32 blocks)"
        if needs_grad:
            return "gradients that require grad (the kernels have no autograd graph)"
        if k > MAX_OBJECTIVES[backend]:
            return f"more than {MAX_OBJECTIVES[backend]} objectives"
        return None

    return gap


def _all_reduce(per: torch.Tensor, layout, reduce: bool | None, process_group) -> torch.Tensor:
    import torch.distributed as dist

    dtensors = [lay for lay in layout if lay is not None]
    if dtensors and reduce is not False:
        if process_group is not None:
            raise ValueError(
                "process_group= is for plain local shards; DTensor gradients are "
                "reduced over their own device mesh"
            )
        meshes = {lay[0] for lay in dtensors}
        if len(meshes) != 1:
            raise ValueError(
                f"DTensor gradients must share one device mesh, got {len(meshes)} meshes"
            )
        mesh = meshes.pop()
        for d in range(mesh.ndim):
            sharded = torch.tensor(
                [lay is not None and lay[1][d].is_shard() for lay in layout], dtype=torch.bool
            )
            if not bool(sharded.any()):
                continue
            # Replicated tensors are counted once: only mesh coordinate 0 contributes them.
            if not bool(sharded.all()) and mesh.get_local_rank(d) != 0:
                per = per * sharded.to(per.device).view(-1, 1, 1)
            dist.all_reduce(per, group=mesh.get_group(d))
        return per
    if reduce or (reduce is None and process_group is not None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "reduce=True / process_group= need an initialised torch.distributed process group"
            )
        dist.all_reduce(per, group=process_group)
    return per


@torch.compiler.disable
def grad_gram(
    grads: Sequence[Sequence[torch.Tensor | None]],
    *,
    reduce: bool | None = None,
    process_group=None,
    backend: str | None = None,
) -> GradGram:
    """Per-tensor and total Gram matrices of K gradients, from one read of every element.

    Args:
        grads: K sequences of P tensors, ``grads[k][p]`` = objective k's gradient of tensor
            p: float32 / bfloat16 / float16 / float64, any shape, the same shape and dtype
            for every k, all on one device. ``None`` counts as zeros (a parameter that
            objective does not touch). Zero-size tensors give zero rows. Dense tensors in
            any dim order (e.g. transposed) are read in place when all objectives share the
            strides; other layouts are copied with ``.contiguous()``. DTensors are read
            through ``.to_local()``.
        reduce: sum the result over ranks with ``torch.distributed.all_reduce``. ``None``
            (auto): when the gradients are DTensors with a Shard placement (FSDP2; tensors
            replicated on a mesh dim are counted once), or when ``process_group`` is given
            (plain local shards). Plain tensors mixed with sharded DTensors count as
            replicated. ``False``: never (the Gram of the local shards).
        process_group: the group whose ranks hold the shards of plain-tensor gradients.
        backend: ``"auto"`` / ``"triton"`` / ``"native"`` / ``"reference"``; default from
            ``UNLEARNOPT_BACKEND``. Float64 gradients, gradients that require grad (to
            differentiate through the Gram, e.g. OFMU's autograd HVP) and K above
            ``MAX_OBJECTIVES`` (16 Triton, 64 native) run on the reference: ``auto`` takes
            it (one warning per reason), a named kernel backend raises ``ValueError``.

    Returns:
        ``GradGram(per_tensor [P, K, K], total [K, K])``, float32 (float64 when any gradient
        is float64), symmetric PSD; ``per_tensor[p, i, j] = <grads[i][p], grads[j][p]>``
        and ``total = per_tensor.sum(0)`` (summed in float64). Plain PyTorch equivalent:
        ``torch.stack([torch.stack([torch.stack([(a[p].double() * b[p].double()).sum()
        for b in grads]) for a in grads]) for p in range(P)]).float()``.

    Example:
        >>> w = [torch.randn(4, 3), torch.randn(3)]
        >>> g = grad_gram([w, [2 * t for t in w], [None, torch.ones(3)]])
        >>> g.per_tensor.shape, g.total.shape
        (torch.Size([2, 3, 3]), torch.Size([3, 3]))
        >>> cos = gram_to_cosine(g.total)  # [3, 3], cos[0, 1] == 1
    """
    if reduce is not None and not isinstance(reduce, bool):
        raise TypeError(f"reduce must be a bool or None, got {type(reduce).__name__}")
    requested_backend(backend)  # a bad name raises even when there is nothing to compute
    k, p_count = _check_structure(grads)
    local, layout = _unwrap(grads, k, p_count)
    device = _check_tensors(local, k, p_count)
    any_f64 = any(g is not None and g.dtype == torch.float64 for seq in local for g in seq)
    needs_grad = torch.is_grad_enabled() and any(
        g is not None and g.requires_grad for seq in local for g in seq
    )
    out_dtype = torch.float64 if any_f64 else torch.float32
    if device is None:  # nothing but None (or no tensors at all)
        device = torch.device("cpu")
        per = torch.zeros(p_count, k, k, dtype=torch.float64)
    else:
        chosen = choose_backend("grad_gram", backend, device, _kernel_gap(k, any_f64, needs_grad))
        if chosen == "reference":
            per = ref.grad_gram(local, out_dtype=torch.float64).per_tensor
        else:
            per = _per_tensor(_flatten(local, k, p_count), chosen)
    if any(lay is not None for lay in layout) or reduce or process_group is not None:
        per = _all_reduce(per, layout, reduce, process_group)
    total = per.sum(0)
    return GradGram(per.to(out_dtype), total.to(out_dtype))


def grad_cosine(grads: Sequence[Sequence[torch.Tensor | None]], **kwargs) -> GradGram:
    """Cosine similarities per tensor ``[P, K, K]`` and global ``[K, K]`` (see
    :func:`gram_to_cosine` for zero gradients); keyword arguments as :func:`grad_gram`."""
    g = grad_gram(grads, **kwargs)
    return GradGram(gram_to_cosine(g.per_tensor), gram_to_cosine(g.total))
