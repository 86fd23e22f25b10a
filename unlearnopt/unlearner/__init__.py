"""``MultiObjectiveUnlearner``: unlearning methods behind an optimizer-style API.

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    unlearner = MultiObjectiveUnlearner(model, opt, method="mollm", ref_model=ref)
    stats = unlearner.step(forget=forget_batch, retain=retain_batch)   # dict of floats

The package, by job: ``multi_objective`` (the class), ``engine`` (per-objective gradients,
Gram, weighing, the standard step), ``batches`` (validation, micro-batches), ``forward``
(the model's and the reference's forward passes), ``head_forward`` (the same passes up to
the output head's input, for the fused-linear objectives), ``reference_cache`` (the
reference's outputs per distinct forget batch), ``distributed`` (DDP / FSDP2),
``stats`` (the one host sync and the finiteness checks), ``atomic`` (all-or-nothing
updates: rollback, clipping, GradScaler), ``checks`` (the constructor's and ``backward()``'s
argument checks), ``pending`` (the gradients accumulated by ``backward()``, averaged over
ranks for the step).
"""

from unlearnopt.errors import UnlearningStepError
from unlearnopt.unlearner.multi_objective import MultiObjectiveUnlearner

__all__ = ["MultiObjectiveUnlearner", "UnlearningStepError"]
