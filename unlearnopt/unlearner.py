"""``MultiObjectiveUnlearner``: unlearning methods behind an optimizer-style API.

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    unlearner = MultiObjectiveUnlearner(model, opt, method="mollm", ref_model=ref)
    stats = unlearner.step(forget=forget_batch, retain=retain_batch)   # dict of floats

One ``step()`` of a method with K objectives (see ``unlearnopt.methods.base``):

1. one forward pass per batch (forget, retain) and micro-batch, shared by the objectives
   that read it; the reference's logits (frozen copy, or the PEFT model with its adapters
   disabled) under ``torch.no_grad()``;
2. K backward passes, each objective's gradient kept for the trainable parameters of the
   wrapped optimizer only. **Memory: K gradient copies** (plus the one in ``p.grad``);
3. ``grad_gram`` once over the K gradients (``[P, K, K]`` and ``[K, K]``, fp32), the
   method's aggregator turns it into coefficients (min-norm batched over tensors for
   ``granularity="per_tensor"``), the combined direction is written into ``p.grad``;
4. one host synchronisation to check that every loss and the Gram are finite, then
   gradient clipping (``max_grad_norm``) and the wrapped optimizer's ``step()``.

A failed step raises (``UnlearningStepError`` for non-finite values, ``ValueError`` /
``TypeError`` for malformed batches or models) BEFORE the wrapped optimizer's step: the
parameters, the optimizer state and every ``p.grad`` are as they were.

Distributed (DDP): the per-objective backward passes run under ``no_sync()`` (DDP's
reducer allows one backward per forward; several backward passes of one forward would
trip it) and each objective's gradient is then all-reduced by the unlearner (SUM of
gradients already weighted by each rank's share of the global token/sequence count), so
before the Gram every rank holds exactly the gradient of the global-batch mean, as one
process on the concatenated batch would. That is K all-reduces of the gradient size per
step, what DDP itself would spend on K synchronised backward passes; the Gram, the weights
and the direction are then computed redundantly (and identically) on every rank, so no
statistic is gathered.

FSDP2 (``fully_shard``): parameters and gradients are sharded DTensors. Each objective's
backward runs with gradient sync on, so FSDP2's post-backward reduce-scatter hands back the
objective's gradient already reduced and sharded (no separate all-reduce, nothing gathered);
FSDP2 averages over ranks, so the loss is multiplied by the world size before its backward
(each rank's part is weighted by its global share, as under DDP, and the SUM is wanted).
Several backward passes run through one forward, so the unsharded parameters must outlive
the first: ``reshard_after_backward`` is switched off during the step's backward passes and
the model resharded after them. The Gram runs on the local shards (``grad_gram`` all-reduces
only ``[P, K, K]``), the weighted combination is DTensor arithmetic, the optimizer steps the
sharded parameters. Other trainable parameters of the model that the optimizer does not hold
also receive (unused) gradients under FSDP2, since backward cannot be restricted to the
sharded parameters. A ``ref_model`` may be a plain local copy on every rank.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.methods.base import BATCH_KINDS, Method, Objective, ObjectiveContext, make_method
from unlearnopt.ops.grad_gram import grad_gram, gram_to_cosine

Grads = list[list[torch.Tensor | None]]
Batch = Mapping[str, Any]


class UnlearningStepError(RuntimeError):
    """A step that could not be taken (non-finite loss or gradient). Nothing was changed."""


def _is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 (``fully_shard``) modules of ``model``, outermost first; [] without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                                    # torch built without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if _is_ddp(model) else model


def _extract_logits(output: Any, who: str) -> torch.Tensor:
    logits = None
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif getattr(output, "logits", None) is not None:
        logits = output.logits
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{who}'s forward returned {type(output).__name__} without logits; "
                        "expected a tensor [B, T, V] or an output with a .logits tensor")
    if logits.dim() != 3:
        raise ValueError(f"{who}'s logits must be [B, T, V], got shape {tuple(logits.shape)}")
    return logits


def _split(batch: Batch, parts: int, name: str) -> list[Batch]:
    """Split every tensor of ``batch`` along dim 0 into ``parts`` micro-batches."""
    size = batch["labels"].shape[0]
    if size < parts:
        raise ValueError(f"{name} has batch size {size}, fewer than accumulate={parts}")
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    out = []
    for a, b in itertools.pairwise(bounds):
        out.append({k: (v[a:b] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
    return out


def _check_batch(batch: Any, name: str) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{name} must be a dict of tensors (a Hugging Face batch), "
                        f"got {type(batch).__name__}")
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} needs a 'labels' tensor [B, T] (-100 = ignored); "
                         f"keys present: {sorted(batch)}")
    if labels.dim() != 2 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}['labels'] must be an integer tensor [B, T], got shape "
                         f"{tuple(labels.shape)} dtype {labels.dtype}")
    if labels.shape[0] == 0 or labels.shape[1] < 2:
        raise ValueError(f"{name}['labels'] has shape {tuple(labels.shape)}; expected B >= 1 "
                         "and T >= 2 (a next-token loss needs two positions)")
    for key in ("input_ids", "attention_mask"):
        t = batch.get(key)
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != labels.shape):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}[{key!r}] has shape {shape} but labels has "
                             f"{tuple(labels.shape)}; expected the same [B, T]")
    for key, t in batch.items():
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] != labels.shape[0] \
                and key != "image_sizes" and key != "pixel_values":
            raise ValueError(f"{name}[{key!r}] has leading size {t.shape[0]} but the batch has "
                             f"{labels.shape[0]} sequences")


class MultiObjectiveUnlearner:
    """Wraps a torch optimizer and runs an unlearning method's step.

    Args:
        model: any module whose forward, called as ``model(**batch_without_labels)``, returns
            logits ``[B, T, V]`` (a tensor or an output with ``.logits``): Hugging Face causal
            LMs and LLaVA-style VLMs, PEFT models, DDP-wrapped models.
        optimizer: the user's optimizer (shared: its ``param_groups``, LR schedulers and
            ``zero_grad`` keep working). Only its parameters with ``requires_grad`` are
            updated and get per-objective gradients (so PEFT/LoRA only the adapters).
        method: a registered name (``"ga"``, ``"grad_diff"``, ``"ga_kl"``, ``"npo"``,
            ``"mollm"``, ``"siu"``, ``"ofmu"`` or one of yours), a ``Method`` subclass or
            instance.
        ref_model: the frozen original model for methods that need one (it is set to
            ``eval()`` and ``requires_grad_(False)``). ``None`` with a PEFT model: the
            reference is the same model with its adapters disabled (no second copy).
        max_grad_norm: clip the combined direction to this norm before the optimizer step.
        accumulate: split each batch into this many micro-batches (gradient accumulation;
            the result equals the big batch). A *list* of batch dicts is also accepted as
            ``forget`` / ``retain``.
        scaler: a ``torch.amp.GradScaler`` for fp16 autocast. The Gram is unscaled before
            the weights are chosen; an overflowing step is skipped as GradScaler does.
        **method_options: the method's options (e.g. ``normalize="unit"``, ``beta=0.1``).

    Mixed precision: run ``step()`` inside ``torch.autocast(...)``; the forward passes
    inherit it. Stats are returned as floats (one host synchronisation per step).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 method: str | Method | type[Method] = "mollm",
                 ref_model: torch.nn.Module | None = None, *, max_grad_norm: float | None = None,
                 accumulate: int = 1, scaler: torch.amp.GradScaler | None = None,
                 **method_options: Any) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, "
                            f"got {type(optimizer).__name__}")
        if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float))
                                          or not max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, "
                             f"got {max_grad_norm!r}")
        if not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be a positive int, got {accumulate!r}")
        if scaler is not None and not hasattr(scaler, "unscale_"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.method = make_method(method, **method_options)
        self.max_grad_norm = max_grad_norm
        self.accumulate = accumulate
        self.scaler = scaler
        self.params: list[torch.nn.Parameter] = self._trainable_params()
        self.ref_model = ref_model
        self._check_model()
        self._check_reference()
        self._pending: dict[str, list[torch.Tensor | None]] | None = None
        self._pending_losses: dict[str, torch.Tensor] = {}
        self.steps = 0
        # use_cache=False: no KV cache is built during training forwards. Passed only where
        # the forward names it, or forwards **kwargs of a model whose config has use_cache
        # (PEFT wrappers), so plain modules never receive an unexpected keyword.
        base = _unwrap(self.model)
        try:
            params = inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            params = {}
        forwards_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        has_flag = hasattr(getattr(base, "config", None), "use_cache")
        self._use_cache_kw = "use_cache" in params or (forwards_kwargs and has_flag)

    # -- set-up ---------------------------------------------------------------------------------
    def _trainable_params(self) -> list[torch.nn.Parameter]:
        seen: set[int] = set()
        params = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise ValueError("the optimizer holds no parameter with requires_grad=True")
        return params

    def _check_model(self) -> None:
        ids = {id(p) for p in self.model.parameters()}
        missing = [i for i, p in enumerate(self.params) if id(p) not in ids]
        if missing:
            raise ValueError(f"the optimizer's trainable parameters {missing[:5]} are not "
                             "parameters of model")
        self._fsdp = _fsdp_modules(self.model)
        if not self._fsdp and any(type(p).__name__ == "DTensor" or hasattr(p, "device_mesh")
                                  for p in self.params):
            raise NotImplementedError("DTensor parameters outside FSDP2 (fully_shard), e.g. "
                                      "tensor parallelism, are not supported by "
                                      "MultiObjectiveUnlearner; use DDP or fully_shard")

    def _check_reference(self) -> None:
        if self.ref_model is not None:
            if not isinstance(self.ref_model, torch.nn.Module):
                raise TypeError(f"ref_model must be a torch.nn.Module, "
                                f"got {type(self.ref_model).__name__}")
            trained = {id(p) for p in self.params}
            if any(id(p) in trained for p in self.ref_model.parameters()):
                raise ValueError("ref_model shares parameters with the trained model; pass a "
                                 "frozen copy (copy.deepcopy(model)) or, for PEFT, no ref_model")
            self.ref_model.requires_grad_(False)
            self.ref_model.eval()
        elif self.method.needs_ref and not hasattr(_unwrap(self.model), "disable_adapter"):
            raise ValueError(f"method {self.method.name!r} needs a reference model: pass "
                             "ref_model= (a frozen copy of the original model), or use a PEFT "
                             "model, whose adapters are disabled for the reference")

    # -- the optimizer-like surface -------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending = None
        self._pending_losses = {}

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's, the method's (and the scaler's) state, and the step count."""
        state = {"optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                 "steps": self.steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("optimizer", "method"):
            if key not in state:
                raise ValueError(f"state_dict lacks {key!r}; expected one from "
                                 "MultiObjectiveUnlearner.state_dict()")
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.steps = int(state.get("steps", 0))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """DDP's ``no_sync()`` for a DDP model, else nothing. Run your own forward passes
        inside it when you use :meth:`backward` under DDP (the unlearner all-reduces)."""
        if _is_ddp(self.model):
            with self.model.no_sync():
                yield
        else:
            yield

    # -- forward passes -------------------------------------------------------------------------
    def _inputs(self, batch: Batch) -> dict[str, Any]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self._use_cache_kw:
            inputs.setdefault("use_cache", False)
        return inputs

    def forward(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        """The trained model's logits ``[B, T, V]`` on ``batch`` (labels are not passed, so
        the model computes no loss of its own)."""
        return _extract_logits(self.model(**self._inputs(batch)), "model")

    @torch.no_grad()
    def ref_forward(self, batch: Batch, kind: str = "batch") -> torch.Tensor:
        """The reference logits ``[B, T, V]`` (no grad): ``ref_model``, or the PEFT model
        with adapters disabled and every module in eval mode (no dropout)."""
        inputs = self._inputs(batch)
        if self.ref_model is not None:
            return _extract_logits(self.ref_model(**inputs), "ref_model").detach()
        model = _unwrap(self.model)
        if not hasattr(model, "disable_adapter"):
            raise ValueError("no reference: pass ref_model= or use a PEFT model")
        training = [m for m in model.modules() if m.training]
        for m in training:
            m.training = False
        try:
            with model.disable_adapter():
                return _extract_logits(model(**inputs), "model (adapters disabled)").detach()
        finally:
            for m in training:
                m.training = True

    # -- batches --------------------------------------------------------------------------------
    def micro_batches(self, batch: Any, name: str) -> list[Batch]:
        """Validate ``batch`` (a dict, or a list of dicts) and split it into the micro-batches
        of one step (``accumulate=`` splits a dict along dim 0); methods with their own
        ``step()`` call this so that they see the same micro-batches as every other method."""
        if isinstance(batch, (list, tuple)):
            if not batch:
                raise ValueError(f"{name} is an empty list of micro-batches")
            for i, b in enumerate(batch):
                _check_batch(b, f"{name}[{i}]")
            return list(batch)
        _check_batch(batch, name)
        return _split(batch, self.accumulate, name) if self.accumulate > 1 else [batch]

    # -- gradients ------------------------------------------------------------------------------
    def _world(self) -> int:
        if (_is_ddp(self.model) or self._fsdp) and dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

    @contextlib.contextmanager
    def _fsdp_backwards(self) -> Iterator[None]:
        """FSDP2: keep the unsharded parameters across the several backward passes of one
        forward (each pass needs them), reshard once at the end. Nothing without FSDP2."""
        if not self._fsdp:
            yield
            return
        groups = [g for m in self._fsdp for g in m._get_fsdp_state()._fsdp_param_groups]
        before = [g.reshard_after_backward for g in groups]
        for m in self._fsdp:
            m.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            for g, flag in zip(groups, before):
                g.reshard_after_backward = flag
            for m in self._fsdp:
                m.reshard()

    def _backward(self, loss: torch.Tensor, retain_graph: bool) -> list[torch.Tensor | None]:
        """Backward of ``loss`` into the trainable parameters; returns and clears their grads."""
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        if self._fsdp:
            # The sharded parameters are not leaves of the forward's graph (FSDP2 all-gathers
            # them into unsharded ones and reduce-scatters into their .grad), so no inputs=.
            loss.backward(retain_graph=retain_graph)
        else:
            loss.backward(retain_graph=retain_graph, inputs=self.params)
        grads = []
        for p in self.params:
            grads.append(p.grad)
            p.grad = None
        return grads

    def objective_gradients(self, objectives: Sequence[Objective], forget: Any,
                            retain: Any) -> tuple[dict[str, torch.Tensor], Grads]:
        """Losses and gradients of ``objectives`` over the (micro-)batches, global means.

        Returns ``(losses, grads)``: ``losses[name]`` 0-dim float32 (the mean over the whole
        batch, all ranks), ``grads[i]`` the P gradients of objective i (``None`` where the
        objective does not reach a parameter), reduced across DDP ranks, multiplied by the
        GradScaler's scale when there is one. Every ``p.grad`` is left as it was.
        """
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique, got {names}")
        batches: dict[str, list[Batch]] = {}
        for kind, batch in (("forget", forget), ("retain", retain)):
            if any(o.batch == kind for o in objectives):
                if batch is None:
                    raise ValueError(f"method {self.method.name!r} needs a {kind} batch "
                                     f"(objectives {[o.name for o in objectives if o.batch == kind]})")
                batches[kind] = self.micro_batches(batch, kind)

        # Each micro-batch's loss is weighted by its share of the units (tokens/sequences) of
        # the whole batch over all ranks, so the summed gradient is the global-batch mean's.
        counts = {o.name: [o.units(mb).float() for mb in batches[o.batch]] for o in objectives}
        totals = torch.stack([torch.stack(counts[n]).sum() for n in names])
        world = self._world()
        if world > 1:
            dist.all_reduce(totals)
        totals = totals.clamp(min=1)
        # FSDP2's reduce-scatter averages over ranks; the weighted parts must be SUMmed.
        rank_factor = float(world) if self._fsdp else 1.0

        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        losses = {n: torch.zeros((), dtype=torch.float32, device=totals.device) for n in names}
        grads: Grads = [[None] * len(self.params) for _ in objectives]
        index = {n: i for i, n in enumerate(names)}
        try:
            with self.no_sync(), self._fsdp_backwards():
                for kind in BATCH_KINDS:
                    objs = [o for o in objectives if o.batch == kind]
                    for m, mb in enumerate(batches.get(kind, [])):
                        ctx = ObjectiveContext(self, mb, kind)
                        for j, obj in enumerate(objs):
                            i = index[obj.name]
                            loss = obj.loss(ctx)
                            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                                raise TypeError(f"objective {obj.name!r} must return a 0-dim "
                                                f"tensor, got {loss!r:.80}")
                            share = counts[obj.name][m].to(loss.device) / totals[i]
                            weighted = loss * share.to(loss.dtype)
                            losses[obj.name] = losses[obj.name] + weighted.detach().float()
                            if rank_factor != 1.0:
                                weighted = weighted * rank_factor
                            new = self._backward(weighted, retain_graph=j < len(objs) - 1)
                            acc = grads[i]
                            for q, g in enumerate(new):
                                if g is None:
                                    continue
                                if acc[q] is None:
                                    acc[q] = g
                                else:
                                    acc[q].add_(g)
                        del ctx
            if world > 1:
                if self._fsdp:
                    self._all_reduce_losses(losses)
                else:
                    self._all_reduce(grads, losses)
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g
        return losses, grads

    def _all_reduce(self, grads: Grads, losses: dict[str, torch.Tensor]) -> None:
        """SUM across ranks (each rank's part is already weighted by its global share).

        A parameter some rank did not reach is zeros there: every rank must call the same
        collectives, so a None gradient is materialised as zeros where any rank has one.
        """
        presence = torch.tensor([[g is not None for g in per] for per in grads],
                                dtype=torch.int32, device=self.params[0].device)
        dist.all_reduce(presence, op=dist.ReduceOp.MAX)
        flags = presence.tolist()
        works = []
        for i, per in enumerate(grads):
            for q, p in enumerate(self.params):
                if flags[i][q]:
                    if per[q] is None:
                        per[q] = torch.zeros_like(p)
                    works.append(dist.all_reduce(per[q], async_op=True))
        names = list(losses)
        packed = torch.stack([losses[n] for n in names])
        works.append(dist.all_reduce(packed, async_op=True))
        for w in works:
            w.wait()
        for n, v in zip(names, packed.unbind(0)):
            losses[n] = v

    @staticmethod
    def _all_reduce_losses(losses: dict[str, torch.Tensor]) -> None:
        """SUM of the losses across ranks (FSDP2: the gradients are reduced by FSDP2)."""
        names = list(losses)
        packed = torch.stack([losses[n] for n in names])
        dist.all_reduce(packed)
        for n, v in zip(names, packed.unbind(0)):
            losses[n] = v

    def backward(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Per-objective gradients of your own losses (a dict name -> 0-dim tensor).

        One backward pass per loss (the graph is retained between them); the gradients add
        up over calls (accumulation) until :meth:`step` (with no batches) uses them. The
        names must be the method's objective names, or any names for an aggregator that does
        not depend on K (min-norm). Under DDP, run your forward passes inside
        :meth:`no_sync`; the gradients are averaged over ranks in :meth:`step` (under FSDP2
        by FSDP2's own reduce-scatter in each backward pass).
        """
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError("losses must be a non-empty dict of name -> 0-dim tensor")
        for name, loss in losses.items():
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError(f"losses[{name!r}] must be a 0-dim tensor, got {loss!r:.80}")
        if self._pending is not None and list(self._pending) != list(losses):
            raise ValueError(f"backward() got losses {list(losses)} but earlier calls since the "
                             f"last step had {list(self._pending)}")
        pending = self._pending if self._pending is not None else {}
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            items = list(losses.items())
            new_grads = {}
            with self._fsdp_backwards():
                for j, (name, loss) in enumerate(items):
                    new_grads[name] = self._backward(loss, retain_graph=j < len(items) - 1)
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g
        for name, new in new_grads.items():
            acc = pending.setdefault(name, [None] * len(self.params))
            for q, g in enumerate(new):
                if g is not None:
                    acc[q] = g if acc[q] is None else acc[q].add_(g)
            prev = self._pending_losses.get(name)
            value = losses[name].detach().float()
            self._pending_losses[name] = value if prev is None else prev + value
        self._pending = pending

    # -- the step -------------------------------------------------------------------------------
    def step(self, forget: Any = None, retain: Any = None) -> dict[str, float]:
        """One unlearning step; returns ``{"loss/<name>": .., "weight/<name>": ..,
        "grad_norm/<name>": .., "cos/<a>/<b>": .., "sat_out/<name>": .., ...}`` (floats).

        With no batches, uses the gradients accumulated by :meth:`backward`.
        """
        if forget is None and retain is None:
            if self._pending is None:
                raise ValueError("step() needs forget=/retain= batches, or backward(losses) "
                                 "called before it")
            return self._step_pending()
        stats = self.method.step(self, forget, retain)
        return stats

    def _step_pending(self) -> dict[str, float]:
        assert self._pending is not None
        names = list(self._pending)
        own = [o.name for o in self.method.objectives()]
        aggregator = self.method.aggregator()
        if set(names) == set(own):
            names = own
        elif isinstance(aggregator.weighting, FixedWeights):
            raise ValueError(f"backward() got losses {names} but method {self.method.name!r} "
                             f"weights the objectives {own}; use those names")
        grads = [self._pending[n] for n in names]
        losses = {n: self._pending_losses[n] for n in names}
        world = self._world()
        if world > 1 and self._fsdp:
            # FSDP2's reduce-scatter already averaged the gradients over ranks.
            self._all_reduce_losses(losses)
            losses = {n: v / world for n, v in losses.items()}
        elif world > 1:
            self._all_reduce(grads, losses)
            for per in grads:
                for g in per:
                    if g is not None:
                        g.div_(world)
            losses = {n: v / world for n, v in losses.items()}
        self._pending, self._pending_losses = None, {}
        return self.aggregate_and_step(aggregator, names, losses, grads)

    def standard_step(self, method: Method, forget: Any, retain: Any) -> dict[str, float]:
        """The generic step: K gradients -> Gram -> aggregator -> optimizer step."""
        objectives = method.objectives()
        losses, grads = self.objective_gradients(objectives, forget, retain)
        return self.aggregate_and_step(method.aggregator(), [o.name for o in objectives],
                                       losses, grads)

    def gram(self, grads: Sequence[Sequence[torch.Tensor | None]]):
        """``GradGram(per_tensor [P, K, K], total [K, K])`` fp32 of the K gradients, divided
        by the GradScaler's scale squared when there is one (the scale is a power of two, so
        this unscaling is exact)."""
        gram = grad_gram(grads)
        if self.scaler is not None and self.scaler.is_enabled():
            inv = 1.0 / self._scale_tensor(gram.total.device)
            gram = type(gram)(gram.per_tensor * inv * inv, gram.total * inv * inv)
        return gram

    def _scale_tensor(self, device: torch.device) -> torch.Tensor:
        # The public way to read the scale without a host sync: scale a one.
        return self.scaler.scale(torch.ones((), device=device, dtype=torch.float32))

    def aggregate_and_step(self, aggregator: Aggregator, names: Sequence[str],
                           losses: Mapping[str, torch.Tensor], grads: Grads) -> dict[str, float]:
        """Gram -> coefficients -> checks -> combined direction -> optimizer step; stats."""
        gram = self.gram(grads)
        result = aggregator.coefficients(gram.per_tensor, gram.total)
        dsq = aggregator.direction_sq_norm(gram.per_tensor, result.coefficients)
        cos = gram_to_cosine(gram.total)
        k = len(names)
        loss_vec = torch.stack([losses[n].float() for n in names])
        gram_ok = torch.isfinite(gram.total).all() & torch.isfinite(result.coefficients).all() \
            & torch.isfinite(dsq)
        pieces = [loss_vec,
                  result.weights.float().mean(0),
                  torch.diagonal(gram.total).float().clamp(min=0).sqrt(),
                  1.0 - result.active.float().mean(0),
                  dsq.float().clamp(min=0).sqrt().reshape(1),
                  cos.float()[torch.triu_indices(k, k, 1).unbind(0)] if k > 1
                  else loss_vec.new_zeros(0),
                  torch.isfinite(loss_vec).all().float().reshape(1),
                  gram_ok.float().reshape(1)]
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
        losses_ok, grads_ok = values[pos] == 1.0, values[pos + 1] == 1.0
        if not losses_ok:
            bad = [n for i, n in enumerate(names) if not math.isfinite(values[i])]
            raise UnlearningStepError(f"non-finite loss in objective(s) {bad} "
                                      f"({ {n: stats[f'loss/{n}'] for n in bad} }); "
                                      "parameters and optimizer state are unchanged")
        if not grads_ok and self.scaler is None:
            raise UnlearningStepError("non-finite gradient or weights (Gram diagonal: "
                                      f"{ {n: stats[f'grad_norm/{n}'] for n in names} }); "
                                      "parameters and optimizer state are unchanged")
        direction = aggregator.combine(grads, result.coefficients, inplace=True)
        if not grads_ok:
            # Scaled gradients out of range (their Gram overflowed, or an element is inf):
            # make sure the GradScaler sees an overflow, so it skips the step and backs off.
            first = next(d for d in direction if d is not None)
            first.fill_(float("inf"))
        stepped = self.apply_direction(direction)
        stats["skipped"] = 0.0 if stepped else 1.0
        stats["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return stats

    def apply_direction(self, direction: Sequence[torch.Tensor | None]) -> bool:
        """Write ``direction`` (P tensors, scaled by the GradScaler's scale if any) into
        ``p.grad``, clip, and take the wrapped optimizer's step. Returns False if the
        GradScaler skipped the step (overflow); then every ``p.grad`` is restored."""
        if len(direction) != len(self.params):
            raise ValueError(f"direction has {len(direction)} tensors, expected "
                             f"{len(self.params)} (one per trainable parameter)")
        saved = [p.grad for p in self.params]
        stepped = True
        try:
            for p, d in zip(self.params, direction):
                if d is not None and d.shape != p.shape:
                    raise ValueError(f"direction tensor of shape {tuple(d.shape)} for a "
                                     f"parameter of shape {tuple(p.shape)}")
                p.grad = None if d is None else d.to(p.dtype)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            if self.scaler is not None:
                before = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = self.scaler.get_scale() >= before
            else:
                self.optimizer.step()
        except BaseException:
            for p, g in zip(self.params, saved):
                p.grad = g
            raise
        if not stepped:
            for p, g in zip(self.params, saved):
                p.grad = g
        else:
            self.steps += 1
        return stepped
