"""A loss of each sequence's log-probability under a linear head, in one pass over the logits.

For hidden states ``h [B, T, H]``, a head ``logits = h @ weight.T + bias`` (``[V, H]``, ``[V]``)
and labels ``y [B, T]`` (not shifted; ``ignore_index`` = not scored), each sequence's
log-probability is

    lp_b = sum_t log softmax(logits[b, t])[y[b, t]]        (over the kept tokens)

and the op returns ``loss = sum_b f_b(lp_b)`` for a caller's ``sequence_loss`` that gives each
sequence's term from its own ``lp_b`` (NPO: ``f_b = (2 / beta) softplus(beta (lp_b - lp_ref_b))
/ B``; SimNPO: ``(2 / beta) softplus(beta lp_b / |y_b| + gamma) / B``). By the chain rule,
with p the softmax of token (b, t)'s logits,

    d loss / d logits[b, t] = f_b'(lp_b) (e_y - p)

i.e. the ``nll`` row gradient ``p - e_y`` scaled by ``-f_b'(lp_b)``: one factor per sequence.

Why its own op: ``fused_linear_unlearning_cross_entropy(..., reduction="none")`` gives the
per-token log-probabilities, but the factor ``f_b'`` is unknown until the whole sequence has
been scored, so its backward recomputes every chunk of logits (one extra ``[N, H] x [H, V]``
product: a third more matrix work than the eager loss). Here the chunks hold whole
sequences: each chunk's logits are scored (``lse`` per token), its sequences' ``f_b'`` is
computed on the spot (autograd of ``sequence_loss`` on the ``[k]`` log-probabilities only),
and the same logits buffer is turned into the gradient and contracted: three products, as
eager. A sequence longer than one chunk's budget (``T x V`` above ``MAX_CHUNK_ELEMENTS``)
takes two passes instead, both in the forward (score every chunk, then recompute each
chunk's logits with the known factors).

Gradients are computed in the forward and scaled by the upstream scalar in the backward (see
``unlearnopt.ops._fused_linear``); nothing is kept but the ``[N, H]``/``[V, H]`` gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from unlearnopt.ops._backend import choose_backend, float64_gap, kernel
from unlearnopt.ops._checks import check_labels, check_linear_head, check_same_device
from unlearnopt.ops._fused_linear import (
    CHUNK_ELEMENTS,
    HeadGrads,
    chunk_loop,
    default_chunk_size,
    take_scaled,
)
from unlearnopt.ops.unlearning_cross_entropy import MODE_ID, OP, STATS_WIDTH
from unlearnopt.reference import unlearning_cross_entropy as ref

NAME = "fused_linear_sequence_loss"
#: Largest chunk (in logits) that whole sequences may take for the single pass: 4x the
#: token chunks of the other fused-linear ops (256 MiB in float32). A longer sequence
#: takes two passes.
MAX_CHUNK_ELEMENTS = 4 * CHUNK_ELEMENTS
_NLL = MODE_ID["nll"]

#: ``sequence_loss(log_prob, rows) -> [k]``: the terms ``f_b(lp_b)`` of the sequences
#: ``rows`` (a slice of the batch) from their log-probabilities ``log_prob`` (``[k]``
#: float32, the only input gradients are taken with respect to).
SequenceLoss = Callable[[torch.Tensor, slice], torch.Tensor]


def sequences_per_chunk(batch: int, seq_len: int, vocab: int) -> int:
    """Whole sequences per chunk for the single pass (about the other ops' chunk of logits,
    at least one sequence), or 0 when one sequence exceeds ``MAX_CHUNK_ELEMENTS`` logits."""
    if seq_len * vocab > MAX_CHUNK_ELEMENTS:
        return 0
    return max(1, min(batch, default_chunk_size(batch * seq_len, vocab) // max(seq_len, 1)))


def _terms(sequence_loss: SequenceLoss, log_prob: torch.Tensor, rows: slice):
    """``(f_b(lp_b) [k], f_b'(lp_b) [k])``, float32, from autograd on the ``[k]`` vector."""
    lp = log_prob.detach().float().requires_grad_(True)
    with torch.enable_grad():
        terms = sequence_loss(lp, rows)
        if not isinstance(terms, torch.Tensor) or tuple(terms.shape) != tuple(lp.shape):
            got = tuple(terms.shape) if isinstance(terms, torch.Tensor) else type(terms).__name__
            raise ValueError(
                f"sequence_loss must return one term per sequence, shape {tuple(lp.shape)}; "
                f"got {got}"
            )
        if not terms.requires_grad:
            return terms.detach().float(), torch.zeros_like(lp)
        (slope,) = torch.autograd.grad(terms.sum(), lp, allow_unused=True)
    slope = torch.zeros_like(lp) if slope is None else slope
    return terms.detach().float(), slope.float()


def _log_prob(nll: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[k]`` per-sequence log-probabilities from ``[k * T]`` per-token nll (float64 sum)."""
    return -nll.view(-1, seq_len).sum(dim=1, dtype=torch.float64).float()


def _factor(slope: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Per-token scale of the ``nll`` gradient ``p - e_y``: ``-f_b'`` repeated over T."""
    return (-slope).repeat_interleave(seq_len).contiguous()


def _one_pass(h2d, weight, bias, labels1d, cfg, sequence_loss, terms, want) -> HeadGrads:
    """Chunks of whole sequences: score, factor, gradient on one logits buffer."""
    ignore_index, backend, seq_len, per_chunk = cfg
    rows = kernel(OP, backend)

    def step(lo, hi, logits):
        labels = labels1d[lo:hi]
        nll, stats = rows(logits, labels, _NLL, 0.5, ignore_index, None, None, None)
        seqs = slice(lo // seq_len, hi // seq_len)
        terms[seqs], slope = _terms(sequence_loss, _log_prob(nll, seq_len), seqs)
        if not any(want):
            return None
        rows(logits, labels, _NLL, 0.5, ignore_index, stats, _factor(slope, seq_len), logits)
        return logits

    return chunk_loop(h2d, weight, bias, per_chunk * seq_len, step, want)


def _two_passes(h2d, weight, bias, labels1d, cfg, sequence_loss, terms, want) -> HeadGrads:
    """Sequences longer than a chunk: score every token chunk, then recompute with factors."""
    ignore_index, backend, seq_len, _ = cfg
    rows = kernel(OP, backend)
    n, vocab = h2d.shape[0], weight.shape[0]
    chunk = default_chunk_size(n, vocab)
    nll = torch.empty(n, dtype=torch.float32, device=h2d.device)
    stats = torch.empty(n, STATS_WIDTH, dtype=torch.float64, device=h2d.device)

    def score(lo, hi, logits):
        nll[lo:hi], stats[lo:hi] = rows(
            logits, labels1d[lo:hi], _NLL, 0.5, ignore_index, None, None, None
        )

    chunk_loop(h2d, weight, bias, chunk, score, (False, False, False))
    every = slice(0, n // seq_len)
    terms[every], slope = _terms(sequence_loss, _log_prob(nll, seq_len), every)
    if not any(want):
        return HeadGrads(None, None, None)
    factor = _factor(slope, seq_len)

    def gradient(lo, hi, logits):
        labels = labels1d[lo:hi]
        rows(logits, labels, _NLL, 0.5, ignore_index, stats[lo:hi], factor[lo:hi], logits)
        return logits

    return chunk_loop(h2d, weight, bias, chunk, gradient, want)


class FusedLinearSequenceLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, sequence_loss, ignore_index, backend, want):
        batch, seq_len = labels.shape
        h2d = hidden.reshape(-1, hidden.shape[-1])
        labels1d = labels.reshape(-1).long()
        per_chunk = sequences_per_chunk(batch, seq_len, weight.shape[0])
        cfg = (ignore_index, backend, seq_len, per_chunk)
        terms = torch.zeros(batch, dtype=torch.float32, device=hidden.device)
        run = _one_pass if per_chunk else _two_passes
        ctx.head_grads = run(h2d, weight, bias, labels1d, cfg, sequence_loss, terms, want)
        ctx.config = (hidden.shape, weight.dtype, None if bias is None else bias.dtype)
        return terms.sum()

    @staticmethod
    def backward(ctx, grad_output):
        hidden_shape, w_dtype, b_dtype = ctx.config
        gh, gw, gb = take_scaled(ctx, NAME, grad_output, per_token=False)
        return (
            None if gh is None else gh.view(hidden_shape),
            None if gw is None else gw.to(w_dtype),
            None,
            None if gb is None else gb.to(b_dtype),
            None,
            None,
            None,
            None,
        )


@torch.compiler.disable
def fused_linear_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    sequence_loss: SequenceLoss,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``sum_b f_b(lp_b)`` over the per-sequence log-probabilities ``lp_b`` of a linear head.

    Args:
        hidden: ``[B, T, H]`` float (the last hidden states).
        weight: ``[V, H]`` (the lm_head weight), same dtype as ``hidden``; bias ``[V]`` or None.
        labels: ``[B, T]`` integer in ``[0, V)`` or ``ignore_index``, NOT shifted: position t
            is scored against ``labels[b, t]``.
        sequence_loss: ``(log_prob [k] float32, rows: slice) -> [k]`` the terms of the
            sequences ``rows`` of the batch. It is called on chunks of whole sequences, so
            each term must depend on its own sequence's log-probability only (anything it
            reads per sequence, e.g. a reference's log-probabilities, is indexed by
            ``rows``). No gradient flows into tensors it closes over.
        backend: as in :func:`unlearning_cross_entropy` (float64 runs on the reference).

    Returns:
        0-dim float32 loss (float64 for float64 inputs on the reference), equal to
        ``sequence_loss(lp, slice(0, B)).sum()`` with
        ``lp = -unlearning_cross_entropy(F.linear(hidden, weight, bias), labels,
        reduction="none").sum(1)``. Gradients flow to ``hidden``, ``weight`` and ``bias``;
        they are computed in the forward and handed to autograd once (backpropagating twice
        through one call raises ``RuntimeError``).

    Example:
        >>> h = torch.randn(2, 5, 8, requires_grad=True)
        >>> w = torch.randn(40, 8, requires_grad=True)
        >>> labels = torch.randint(0, 40, (2, 5))
        >>> ref_lp = torch.tensor([-30.0, -25.0])
        >>> def npo(lp, rows):  # (2 / beta) softplus(beta (lp - ref)) / B, beta = 0.1
        ...     return 20.0 * torch.nn.functional.softplus(0.1 * (lp - ref_lp[rows])) / 2
        >>> fused_linear_sequence_loss(h, w, labels, npo).backward()
    """
    check_linear_head(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if not callable(sequence_loss):
        raise TypeError(
            f"sequence_loss must be a callable (log_prob, rows) -> [k], got "
            f"{type(sequence_loss).__name__}"
        )
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    check_labels(labels, hidden.shape[:-1], weight.shape[0], ignore_index, "hidden")
    chosen = choose_backend(NAME, backend, hidden.device, float64_gap(hidden, weight, bias))
    if chosen == "reference" or math.prod(labels.shape) == 0:
        return ref.fused_linear_sequence_loss(
            hidden, weight, labels, sequence_loss, bias, ignore_index
        )
    grad_on = torch.is_grad_enabled()
    want = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return FusedLinearSequenceLossFunction.apply(
        hidden, weight, labels, bias, sequence_loss, ignore_index, chosen, want
    )
