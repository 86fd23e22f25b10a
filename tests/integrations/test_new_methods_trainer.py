"""The newer methods (simnpo, wga, satimp, ce_u, undial, rmu, idk_dpo) inside the Hugging Face
``Trainer`` integration: registry names work there as they are, idk_dpo's preferred answers
travel as ``aux_idk_*`` columns of the forget examples."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny_models import make_batch, make_model


def _examples(seed: int, aux_seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    batch = make_batch("llama", batch=2, seq=8, seed=seed)
    if aux_seed is not None:
        from unlearnopt.contract import attach_aux

        batch = attach_aux(batch, "idk", make_batch("llama", batch=2, seq=8, seed=aux_seed))
    return [{k: v[i] for k, v in batch.items()} for i in range(2)]


@pytest.mark.parametrize(
    "method, options",
    [
        ("simnpo", {}),
        ("wga", {}),
        ("satimp", {}),
        ("ce_u", {}),
        ("undial", {}),
        ("rmu", {"layer": 1, "depth": 1, "steering_coeff": 2.0}),
        ("idk_dpo", {}),
    ],
)
def test_trainer_runs_the_newer_methods(tmp_path, monkeypatch, method, options):
    from transformers import TrainingArguments

    from unlearnopt.integrations.hf_trainer import (
        ForgetRetainCollator,
        ForgetRetainDataset,
        UnlearningTrainer,
    )

    monkeypatch.setenv("UNLEARNOPT_BACKEND", "reference")
    model = make_model("llama")
    before = [p.detach().clone() for p in model.parameters()]
    forget = _examples(1, aux_seed=3 if method == "idk_dpo" else None)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = UnlearningTrainer(
        model=model,
        args=args,
        train_dataset=ForgetRetainDataset(forget, _examples(2)),
        data_collator=ForgetRetainCollator(),
        unlearning_method=method,
        ref_model=copy.deepcopy(model),
        unlearner_options=options,
    )
    trainer.train()
    assert trainer.unlearner.steps == 1
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
