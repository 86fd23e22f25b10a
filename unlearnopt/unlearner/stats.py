"""A step's statistics and its finiteness check, read in ONE host synchronisation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from unlearnopt.aggregate.weighting import WeightingResult
from unlearnopt.errors import UnlearningStepError
from unlearnopt.ops.grad_gram import GradGram, gram_to_cosine

_UNCHANGED = "parameters and optimizer state are unchanged"


def read_stats(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors -> floats in one host sync. Raises :class:`UnlearningStepError`
    naming every non-finite entry."""
    names = list(values)
    floats = torch.stack([values[n].detach().float().reshape(()) for n in names]).tolist()
    stats = dict(zip(names, floats))
    bad = {n: v for n, v in stats.items() if not math.isfinite(v)}
    if bad:
        raise UnlearningStepError(f"non-finite {sorted(bad)} ({bad}); {_UNCHANGED}")
    return stats


def weighing_stats(
    names: Sequence[str],
    losses: Mapping[str, torch.Tensor],
    gram: GradGram,
    result: WeightingResult,
    direction_sq_norm: torch.Tensor,
    *,
    scaled: bool,
    extra: Mapping[str, torch.Tensor] | None = None,
    labelled: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float], bool]:
    """The stats of one weighing, and whether the gradients overflowed.

    Returns ``(stats, overflow)``: ``loss/<name>``, ``weight/<name>`` (the weighting's
    weights, mean over problems), ``grad_norm/<name>`` (from the Gram's diagonal),
    ``sat_out/<name>`` (fraction of problems where the objective sat out),
    ``grad_norm/direction``, ``cos/<a>/<b>`` for a < b, then the ``extra`` entries.

    Raises ``ValueError`` if a batch kind in ``labelled`` (its number of labelled tokens)
    has none; :class:`UnlearningStepError` on a non-finite loss; on a non-finite Gram,
    coefficient or direction norm unless ``scaled`` (GradScaler-scaled gradients: then
    ``overflow`` is True and the caller skips the step as GradScaler does); on a non-finite
    extra entry.
    """
    k = len(names)
    extra = dict(extra or {})
    labelled = dict(labelled or {})
    loss_vec = torch.stack([losses[n].float() for n in names])
    grads_ok = (
        torch.isfinite(gram.total).all()
        & torch.isfinite(result.coefficients).all()
        & torch.isfinite(direction_sq_norm)
    )
    cos = gram_to_cosine(gram.total)
    pieces = [
        loss_vec,
        result.weights.float().mean(0),
        torch.diagonal(gram.total).float().clamp(min=0).sqrt(),
        1.0 - result.active.float().mean(0),
        direction_sq_norm.float().clamp(min=0).sqrt().reshape(1),
        cos.float()[torch.triu_indices(k, k, 1).unbind(0)] if k > 1 else loss_vec.new_zeros(0),
        torch.stack([v.detach().float().reshape(()) for v in extra.values()])
        if extra
        else loss_vec.new_zeros(0),
        torch.stack([v.float().reshape(()) for v in labelled.values()])
        if labelled
        else loss_vec.new_zeros(0),
        torch.isfinite(loss_vec).all().float().reshape(1),
        grads_ok.float().reshape(1),
    ]
    values = torch.cat([p.reshape(-1).to(loss_vec.device) for p in pieces]).tolist()  # sync
    stats: dict[str, float] = {}
    for i, n in enumerate(names):
        stats[f"loss/{n}"] = values[i]
        stats[f"weight/{n}"] = values[k + i]
        stats[f"grad_norm/{n}"] = values[2 * k + i]
        stats[f"sat_out/{n}"] = values[3 * k + i]
    stats["grad_norm/direction"] = values[4 * k]
    pos = 4 * k + 1
    for a in range(k):
        for b in range(a + 1, k):
            stats[f"cos/{names[a]}/{names[b]}"] = values[pos]
            pos += 1
    for key in extra:
        stats[key] = values[pos]
        pos += 1
    empty = [kind for i, kind in enumerate(labelled) if values[pos + i] == 0]
    pos += len(labelled)
    if empty:
        raise ValueError(
            f"the {' and '.join(empty)} batch has no labelled token (every "
            "label is -100 after the next-token shift), so its losses average "
            f"over nothing; {_UNCHANGED}"
        )
    losses_ok, grads_ok = values[pos] == 1.0, values[pos + 1] == 1.0
    if not losses_ok:
        bad = [n for i, n in enumerate(names) if not math.isfinite(values[i])]
        raise UnlearningStepError(
            f"non-finite loss in objective(s) {bad} "
            f"({ {n: stats[f'loss/{n}'] for n in bad} }); {_UNCHANGED}"
        )
    if not grads_ok and not scaled:
        raise UnlearningStepError(
            "non-finite gradient or weights (Gram diagonal: "
            f"{ {n: stats[f'grad_norm/{n}'] for n in names} }); "
            f"{_UNCHANGED}"
        )
    bad_extra = [key for key in extra if not math.isfinite(stats[key])]
    if grads_ok and bad_extra:
        raise UnlearningStepError(
            f"non-finite {bad_extra} ({ {key: stats[key] for key in bad_extra} }); {_UNCHANGED}"
        )
    return stats, not grads_ok
