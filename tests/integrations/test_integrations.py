"""The unlearner inside Hugging Face ``Trainer`` and with ``accelerate`` (CPU, tiny model):
both give the same parameters as the plain ``MultiObjectiveUnlearner`` loop."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny_models import make_batch, make_model


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    # The integration is under test, not the kernels: keep the loss path fixed and cheap.
    monkeypatch.setenv("UNLEARNOPT_BACKEND", "reference")


def examples(seed: int) -> list[dict[str, torch.Tensor]]:
    batch = make_batch("llama", batch=2, seq=8, seed=seed)
    return [{k: v[i] for k, v in batch.items()} for i in range(2)]


def manual_run(model, forget, retain, lrs):
    """The plain loop: AdamW as the Trainer builds it, the LR set per step."""
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    opt = torch.optim.AdamW(model.parameters(), lr=lrs[0], weight_decay=0.0)
    unlearner = MultiObjectiveUnlearner(model, opt, method="grad_diff")
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        unlearner.step(forget=forget, retain=retain)
    return [p.detach() for p in model.parameters()]


def test_trainer_equals_plain_loop(tmp_path):
    from transformers import TrainingArguments

    from unlearnopt.integrations.hf_trainer import (
        ForgetRetainCollator,
        ForgetRetainDataset,
        UnlearningTrainer,
    )

    model = make_model("llama")
    expected_model = copy.deepcopy(model)
    forget, retain = examples(1), examples(2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        optim="adamw_torch",
        disable_tqdm=True,
    )
    trainer = UnlearningTrainer(
        model=model,
        args=args,
        train_dataset=ForgetRetainDataset(forget, retain),
        data_collator=ForgetRetainCollator(),
        unlearning_method="grad_diff",
    )
    trainer.train()
    assert trainer.unlearner is not None and trainer.unlearner.steps == 2
    logged = [log for log in trainer.state.log_history if "unlearn/skipped" in log]
    assert len(logged) == 2 and all(log["unlearn/skipped"] == 0.0 for log in logged)
    # Each step sees the whole (2-example) forget and retain sets; a batch's mean loss does
    # not depend on the order the sampler shuffled them into (rounding only).
    batch_f = make_batch("llama", batch=2, seq=8, seed=1)
    batch_r = make_batch("llama", batch=2, seq=8, seed=2)
    expected = manual_run(expected_model, batch_f, batch_r, [1e-3, 1e-3])
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_trainer_rejects_gradient_accumulation(tmp_path):
    from transformers import TrainingArguments

    from unlearnopt.integrations.hf_trainer import UnlearningTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[], use_cpu=True
    )
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        UnlearningTrainer(model=make_model("llama"), args=args, unlearning_method="ga")


def test_collator_and_dataset():
    from unlearnopt.integrations.hf_trainer import ForgetRetainCollator, ForgetRetainDataset

    data = ForgetRetainDataset(examples(1), examples(2)[:1])
    assert len(data) == 2 and data[1]["retain"] is data[0]["retain"]
    batch = ForgetRetainCollator()([data[0], data[1]])
    assert set(batch) == {"forget", "retain"}
    assert batch["forget"]["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="'forget' part"):
        ForgetRetainCollator()([{"retain": examples(1)[0]}])


def test_accelerate_equals_plain_loop():
    from accelerate import Accelerator

    from unlearnopt.integrations.accelerate import prepare_unlearner

    model = make_model("llama")
    expected = manual_run(
        copy.deepcopy(model), make_batch("llama", seed=1), make_batch("llama", seed=2), [1e-3, 1e-3]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    unlearner, prepared, prepared_opt = prepare_unlearner(
        Accelerator(cpu=True), model, opt, method="grad_diff"
    )
    assert prepared_opt.optimizer is opt
    for _ in range(2):
        unlearner.step(forget=make_batch("llama", seed=1), retain=make_batch("llama", seed=2))
    for p, e in zip(prepared.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
