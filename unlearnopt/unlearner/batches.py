"""Batch validation and micro-batch splitting (``accumulate=``).

A batch is a Hugging Face batch dict: ``labels`` ``[B, T]`` integer (-100 = ignored,
unshifted), ``input_ids`` / ``attention_mask`` ``[B, T]`` when present, and any other model
input with the batch on dim 0 (``pixel_values`` / ``image_sizes`` may count images instead).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch

from unlearnopt.contract import Batch

# Inputs whose leading dimension counts images, not sequences (LLaVA-style models).
_PER_IMAGE_KEYS = ("image_sizes", "pixel_values")


def check_batch(batch: Any, name: str) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming ``name`` unless ``batch`` is a valid batch."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{name} must be a dict of tensors (a Hugging Face batch), got {type(batch).__name__}"
        )
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"{name} needs a 'labels' tensor [B, T] (-100 = ignored); keys present: {sorted(batch)}"
        )
    if labels.dim() != 2 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"{name}['labels'] must be an integer tensor [B, T], got shape "
            f"{tuple(labels.shape)} dtype {labels.dtype}"
        )
    if labels.shape[0] == 0 or labels.shape[1] < 2:
        raise ValueError(
            f"{name}['labels'] has shape {tuple(labels.shape)}; expected B >= 1 "
            "and T >= 2 (a next-token loss needs two positions)"
        )
    for key in ("input_ids", "attention_mask"):
        t = batch.get(key)
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != labels.shape):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name}[{key!r}] has shape {shape} but labels has "
                f"{tuple(labels.shape)}; expected the same [B, T]"
            )
    for key, t in batch.items():
        if (
            isinstance(t, torch.Tensor)
            and t.dim() > 0
            and t.shape[0] != labels.shape[0]
            and key not in _PER_IMAGE_KEYS
        ):
            raise ValueError(
                f"{name}[{key!r}] has leading size {t.shape[0]} but the batch has "
                f"{labels.shape[0]} sequences"
            )


def split(batch: Batch, parts: int, name: str) -> list[Batch]:
    """Split every tensor of ``batch`` along dim 0 into ``parts`` micro-batches of sizes as
    even as possible (``round(i * B / parts)`` boundaries)."""
    size = batch["labels"].shape[0]
    if size < parts:
        raise ValueError(f"{name} has batch size {size}, fewer than accumulate={parts}")
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    out = []
    for a, b in itertools.pairwise(bounds):
        out.append({k: (v[a:b] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
    return out


def micro_batches(batch: Any, name: str, accumulate: int) -> list[Batch]:
    """Validate ``batch`` (a dict, or a list of dicts used as given) and split a dict into
    ``accumulate`` micro-batches."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError(f"{name} is an empty list of micro-batches")
        for i, b in enumerate(batch):
            check_batch(b, f"{name}[{i}]")
        return list(batch)
    check_batch(batch, name)
    return split(batch, accumulate, name) if accumulate > 1 else [batch]


def labelled_tokens(batches: list[Batch]) -> torch.Tensor:
    """The number of labelled next-token targets (``labels[:, 1:] != -100``) in ``batches``,
    a 0-dim tensor on the labels' device (no host sync)."""
    return torch.stack([(b["labels"][:, 1:] != -100).sum() for b in batches]).sum()
