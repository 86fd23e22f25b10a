"""The frozen reference model's outputs, computed once per distinct batch and reused.

The forget batch of an unlearning request is usually the same at every step, and the
reference model never changes, so its outputs on that batch (NPO's per-sequence
log-probabilities, the head inputs a KL needs) are the same at every step too.
:class:`ReferenceCache` keeps them between steps.

Key (why content, not identity): a training loop often re-collates the same examples into
*new* tensors every step, which an identity key would miss. The key is a BLAKE2b digest of
every tensor of the batch (name, dtype, shape, bytes) plus everything else the result
depends on: what is cached (``"head_inputs"``, ``"log_prob"``, ...), the reference's
*fingerprint* (the identity of its parameters and buffers and their in-place version
counters, so ``load_state_dict`` or any in-place change invalidates it) and the autocast
state. A digest is remembered per tensor object and version, so a batch passed again as
the same tensors is not copied to the host a second time; a new tensor costs one copy of
its bytes to the host (``input_ids`` etc. are small; ``pixel_values`` are read once).

Memory: an entry holds what its computation returned, for as long as it is used: the
reference's head inputs cost ``B * T * H`` elements of the model's dtype per micro-batch
(one layer's activations; the weight is the reference's own, not a copy), the logits path's
reference logits ``B * T * V`` (much more), NPO's log-probabilities ``B`` floats. Entries
not read during a step are dropped when the next step ends (:meth:`end_step`), so at most
two steps' worth of distinct batches is held. ``enabled=False`` turns caching off.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import torch


def _tensors_nbytes(value: Any) -> int:
    if isinstance(value, torch.nn.Parameter):  # the reference's own weight: no copy
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_tensors_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensors_nbytes(v) for v in value)
    fields = getattr(value, "__dataclass_fields__", None)
    if fields:
        return sum(_tensors_nbytes(getattr(value, f)) for f in fields)
    return 0


def module_fingerprint(
    module: torch.nn.Module, skip: Iterable[torch.Tensor] = ()
) -> tuple[int, int]:
    """``(hash of the parameter/buffer identities, sum of their in-place versions)``; any
    in-place update or replacement of a tensor of ``module`` (except ``skip``) changes it."""
    skipped = {id(t) for t in skip}
    tensors = [
        t for t in itertools.chain(module.parameters(), module.buffers()) if id(t) not in skipped
    ]
    return hash(tuple(id(t) for t in tensors)), sum(t._version for t in tensors)


def _autocast_state() -> tuple:
    """The autocast dtype per device type where autocast is on (reference outputs differ)."""
    return tuple(
        (d, str(torch.get_autocast_dtype(d)))
        for d in ("cpu", "cuda")
        if torch.amp.is_autocast_available(d) and torch.is_autocast_enabled(d)
    )


class ReferenceCache:
    """Reference outputs per distinct (batch, what, reference state); see the module docstring.

    Args:
        enabled: False: every :meth:`get` computes (nothing is kept).

    Attributes:
        hits, misses: counters of :meth:`get` (for tests and logging).
    """

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self._entries: dict[Hashable, Any] = {}
        self._used: set[Hashable] = set()
        # id(tensor) -> (weakref to it, its version, digest of its content)
        self._digests: dict[int, tuple[weakref.ref, int, bytes]] = {}

    # -- keys -----------------------------------------------------------------------------------
    def _tensor_digest(self, t: torch.Tensor) -> bytes:
        memo = self._digests.get(id(t))
        if memo is not None and memo[0]() is t and memo[1] == t._version:
            return memo[2]
        data = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16).digest()
        self._digests[id(t)] = (weakref.ref(t), t._version, digest)
        return digest

    def batch_key(self, batch: Mapping[str, Any]) -> bytes:
        """A digest of ``batch``'s content: names, dtypes, shapes and bytes of its tensors,
        ``repr`` of its other values."""
        h = hashlib.blake2b(digest_size=16)
        for name in sorted(batch):
            value = batch[name]
            h.update(name.encode())
            if isinstance(value, torch.Tensor):
                h.update(f"{value.dtype}{tuple(value.shape)}{value.device}".encode())
                h.update(self._tensor_digest(value))
            else:
                h.update(repr(value).encode())
        return h.digest()

    # -- lookups --------------------------------------------------------------------------------
    def get(
        self,
        batch: Mapping[str, Any],
        what: str,
        reference_state: Hashable,
        compute: Callable[[], Any],
    ) -> Any:
        """The cached result for ``(batch, what, reference_state)``, else ``compute()``
        (stored). ``reference_state``: e.g. :func:`module_fingerprint` of the reference."""
        if not self.enabled:
            return compute()
        key = (what, self.batch_key(batch), reference_state, _autocast_state())
        if key in self._entries:
            self.hits += 1
        else:
            self.misses += 1
            self._entries[key] = compute()
        self._used.add(key)
        return self._entries[key]

    def end_step(self) -> None:
        """Drop the entries not read since the previous ``end_step()`` (call once per step)."""
        self._entries = {k: v for k, v in self._entries.items() if k in self._used}
        self._used = set()
        self._digests = {k: v for k, v in self._digests.items() if v[0]() is not None}

    def clear(self) -> None:
        self._entries.clear()
        self._used.clear()
        self._digests.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes of the tensors held by the entries (parameters of the reference, which
        entries only point to, not counted)."""
        return sum(_tensors_nbytes(v) for v in self._entries.values())
