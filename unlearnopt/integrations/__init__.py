"""Using the unlearner inside training frameworks: Hugging Face ``Trainer`` and ``accelerate``.

Both modules import their framework lazily (only when used):

- :mod:`unlearnopt.integrations.hf_trainer`: :class:`UnlearningTrainer` (a ``Trainer`` whose
  training step is an unlearning step on forget/retain batches), :class:`ForgetRetainCollator`
  and :class:`ForgetRetainDataset`.
- :mod:`unlearnopt.integrations.accelerate`: :func:`prepare_unlearner` (``Accelerator.prepare``
  the model and optimizer, then wrap the prepared optimizer).
"""

from __future__ import annotations

__all__ = ["ForgetRetainCollator", "ForgetRetainDataset", "UnlearningTrainer", "prepare_unlearner"]


def __getattr__(name: str):
    # Lazy: importing unlearnopt.integrations must not import transformers or accelerate.
    if name in ("ForgetRetainCollator", "ForgetRetainDataset", "UnlearningTrainer"):
        from unlearnopt.integrations import hf_trainer

        return getattr(hf_trainer, name)
    if name == "prepare_unlearner":
        from unlearnopt.integrations.accelerate import prepare_unlearner

        return prepare_unlearner
    raise AttributeError(f"module 'unlearnopt.integrations' has no attribute {name!r}")
