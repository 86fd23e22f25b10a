"""The contract between methods and the unlearner: one-way imports, the forward callables of
``ObjectiveContext``, a method's own step recipe, and the atomic update's rollback."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from tests.tiny_models import make_batch, make_model
from unlearnopt.aggregate import Aggregator, FixedWeights
from unlearnopt.contract import Objective, ObjectiveContext
from unlearnopt.methods import Method
from unlearnopt.objectives import token_loss
from unlearnopt.unlearner import MultiObjectiveUnlearner

PACKAGE = Path(__file__).parents[1] / "unlearnopt"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize(
    "path",
    [*sorted((PACKAGE / "methods").glob("*.py")), PACKAGE / "contract.py", PACKAGE / "errors.py"],
    ids=lambda p: p.name,
)
def test_methods_and_contract_never_import_the_unlearner(path):
    above = ("unlearnopt.unlearner", "unlearnopt.eval", "unlearnopt.integrations")
    upward = {m for m in imported_modules(path) if m.startswith(above)}
    assert not upward, f"{path.name} imports {sorted(upward)}"


def test_error_is_one_class_on_every_public_path():
    import unlearnopt
    from unlearnopt import UnlearningStepError
    from unlearnopt.contract import UnlearningStepError as from_contract
    from unlearnopt.unlearner import UnlearningStepError as from_unlearner

    assert UnlearningStepError is from_contract is from_unlearner
    assert unlearnopt.MultiObjectiveUnlearner is MultiObjectiveUnlearner


def test_objective_context_shares_one_forward_and_needs_a_reference():
    calls = []

    def forward(batch, kind):
        calls.append(kind)
        return torch.zeros(1, 2, 3)

    ctx = ObjectiveContext({"labels": torch.zeros(1, 2, dtype=torch.long)}, "retain", forward)
    assert ctx.logits is ctx.logits and calls == ["retain"]
    with pytest.raises(ValueError, match="no reference model"):
        _ = ctx.ref_logits


class MovesThenFails(Method):
    """A step recipe that moves the parameters directly, then fails before stepping."""

    name = "test_moves_then_fails"
    defaults: ClassVar[dict] = {}

    def objectives(self):
        return [
            Objective("forget_ga", "forget", lambda ctx: token_loss(ctx.logits, ctx.labels, "ga"))
        ]

    def aggregator(self):
        return Aggregator(FixedWeights([1.0]))

    def step_recipe(self):
        def recipe(tools, forget, retain):
            _, grads = tools.objective_gradients(self.objectives(), forget, retain)
            with tools.atomic() as update:
                update.move(grads[0], alpha=[0.5] * len(tools.params))
                assert any(not torch.equal(p, s) for p, s in zip(tools.params, self.start))
                raise RuntimeError("stop after the move")

        return recipe


def test_custom_step_recipe_is_rolled_back_atomically():
    model = make_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    start = [p.detach().clone() for p in model.parameters()]
    method = MovesThenFails()
    method.start = start
    unlearner = MultiObjectiveUnlearner(model, opt, method)
    with pytest.raises(RuntimeError, match="stop after the move"):
        unlearner.step(forget=make_batch("llama", batch=2, seq=8, seed=1))
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p.detach(), s)
        assert torch.equal(p.grad, torch.full_like(p, 0.25))
    assert unlearner.steps == 0 and not opt.state
