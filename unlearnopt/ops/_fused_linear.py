"""The token-chunk loop shared by the fused-linear ops (cross-entropy and masked KL).

For a linear head ``logits = hidden @ weight.T + bias`` (hidden ``[N, H]``, weight ``[V, H]``)
under a loss that sums per-token terms of each token's logits row, with ``G = dloss/dlogits``
(``[N, V]``):

    grad_hidden = G @ weight,    grad_weight = G.T @ hidden,    grad_bias = G.sum(0).

:func:`chunk_loop` computes the logits ``chunk`` tokens at a time into one reused buffer and
hands each chunk to the op's row step, which computes the chunk's losses and, in place, its
rows of ``G`` (the row kernels write the gradient over the logits). Those rows are then
contracted at once: ``grad_hidden``'s rows are written directly (hidden's dtype, one
rounding of a float32-accumulated product), ``grad_weight`` and ``grad_bias`` are summed
over chunks in float32 whatever the inputs' dtype (``addmm_`` into a float32 accumulator),
so the chunked sum adds no rounding beyond one final cast. At most one chunk of logits per
model exists at a time; nothing is recomputed in the backward.

The upstream gradient is not known in the forward. For ``mean``/``sum`` it is one scalar,
so the forward uses 1 and the backward scales the float32 results in place
(:func:`take_scaled`). For ``none`` it is one factor per token: that factor distributes
over ``grad_hidden``'s rows, but not over the sum over tokens inside ``grad_weight``, so an
op whose head needs a gradient recomputes the chunks in the backward with the per-token
factors (the row kernels then skip their statistics pass, given the saved statistics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

#: Logits per chunk (2^24: 64 MiB in float32). The chunk's rows set the efficiency: every
#: chunk runs three matrix multiplications with ``rows`` as one dimension and reads and
#: writes the float32 weight-gradient accumulator once, so flops per byte of accumulator
#: traffic grow with the rows, whatever V. A few hundred rows keep the multiplications at
#: full speed and the accumulator traffic small; 64 MiB stays small next to the ``[N, V]``
#: logits that the chunking avoids (400 MiB for 2048 tokens at V = 49152).
CHUNK_ELEMENTS = 1 << 24
#: Fewest rows per chunk (unless there are fewer tokens), for very large vocabularies.
MIN_CHUNK_ROWS = 128


def default_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """Tokens per chunk: about ``CHUNK_ELEMENTS`` logits, at least ``MIN_CHUNK_ROWS`` tokens,
    at most ``n_tokens`` (and at least 1).

    Example: 2048 tokens at V = 49152 give 6 chunks of 341 tokens (64 MiB of float32 logits
    each); at V = 128256, 16 chunks of 130 tokens; at V = 256000, chunks of 128 tokens.
    """
    rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab_size, 1))
    return max(1, min(n_tokens, rows))


class HeadGrads(NamedTuple):
    """Gradients of the head's inputs; None where not wanted."""

    hidden: torch.Tensor | None  # [N, H], hidden's dtype
    weight: torch.Tensor | None  # [V, H] float32
    bias: torch.Tensor | None  # [V] float32


#: ``step(lo, hi, logits) -> G rows | None``: the losses of tokens ``[lo, hi)`` from their
#: logits (``[hi - lo, V]`` in hidden's dtype, a reused buffer the step may overwrite), and
#: their rows of ``G`` (any float dtype, typically the logits buffer itself), or None when
#: no gradient is wanted.
RowStep = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


def chunk_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk: int,
    step: RowStep,
    want: tuple[bool, bool, bool],
) -> HeadGrads:
    """Run ``step`` over the logits of ``hidden @ weight.T + bias``, ``chunk`` tokens at a time.

    Args:
        hidden: ``[N, H]`` (rows of any stride); weight ``[V, H]`` and bias ``[V]`` | None of
            the same dtype.
        chunk: tokens per chunk (>= 1).
        step: see ``RowStep``.
        want: which of (hidden, weight, bias) gradients to form from the steps' ``G`` rows.

    Returns:
        ``HeadGrads``: ``G @ weight``, ``G.T @ hidden`` (float32), ``G.sum(0)`` (float32).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if want[0] else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if want[1] else None
    grad_b = (
        torch.zeros(vocab, dtype=torch.float32, device=device)
        if want[2] and bias is not None
        else None
    )
    buffer = torch.empty(min(chunk, n), vocab, dtype=hidden.dtype, device=device)
    weight_t = weight.t()
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        h = hidden[lo:hi]
        logits = buffer[: hi - lo]
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        g = step(lo, hi, logits)
        if g is None:
            continue
        if grad_h is not None:
            torch.mm(g.to(weight.dtype), weight, out=grad_h[lo:hi])
        if grad_w is not None:
            add_product_f32(grad_w, g.t(), h)
        if grad_b is not None:
            grad_b.add_(g.sum(0, dtype=torch.float32))
    return HeadGrads(grad_h, grad_w, grad_b)


def add_product_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc``, the product rounded only into float32.

    float32 factors: one ``addmm_``. Lower precision on CUDA: the tensor-core product with
    a float32 result (``out_dtype``), where this torch build has it. Otherwise the factors
    are cast to float32 first (CPU has no mixed-precision product).
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_mm_out_dtype():
        acc.add_(torch.mm(a, b.to(a.dtype), out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


@functools.cache
def _cuda_mm_out_dtype() -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` runs on CUDA here."""
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        return bool(torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def take_scaled(ctx, op: str, grad_output: torch.Tensor, per_token: bool) -> HeadGrads:
    """The forward's gradients (``ctx.head_grads``), scaled in place by the upstream gradient.

    They are handed to autograd once and dropped from ``ctx`` (so the float32 weight
    gradient becomes ``weight.grad`` without a copy); a second backward through the same
    forward (``retain_graph=True``) raises. ``per_token``: ``grad_output`` holds one factor
    per token (``reduction="none"``), which only the hidden gradient may carry.
    """
    grads = ctx.head_grads
    if grads is None:
        raise RuntimeError(
            f"{op}: backward ran twice through one forward; its gradients are "
            "computed in the forward and handed over once. Call the op again "
            "instead of backpropagating with retain_graph=True"
        )
    ctx.head_grads = None
    gh, gw, gb = grads
    if per_token:
        if gw is not None or gb is not None:
            raise AssertionError("per-token scaling of the head's gradient")
        if gh is not None:
            gh.mul_(grad_output.reshape(-1, 1).float())
        return HeadGrads(gh, None, None)
    scale = grad_output.reshape(()).float()
    for g in (gh, gw, gb):
        if g is not None:
            g.mul_(scale)
    return HeadGrads(gh, gw, gb)
