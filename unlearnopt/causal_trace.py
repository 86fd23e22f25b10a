"""Where a model recalls its facts: causal tracing of the MLP outputs at the subject.

A subject-keyed edit (``unlearnopt.editing``) works on a layer where the model reads the
subject to recall the answer, and fails elsewhere (on SmolLM2-135M, forgetting six capitals
through layer 6 kept the held-out capitals, through layer 12 it did not). Causal tracing
(Meng et al., 2022, "Locating and Editing Factual Associations in GPT", arXiv 2202.05262)
measures, per layer, how much of the answer one activation carries:

1. *clean* run: the fact's prompt and answer; record each candidate layer's output at the
   subject's last token, and the answer's probability ``p_clean``;
2. *corrupted* run: Gaussian noise (``noise`` times the standard deviation of the
   embedding matrix) added to the input embeddings of the subject's tokens, so the model no
   longer knows whose fact it is: ``p_corrupt``;
3. for each candidate layer L, the corrupted run again with L's output at the subject's
   last token put back to its clean value: ``p_L``.

The *indirect effect* of L is ``mean over facts and noise samples of (p_L - p_corrupt)``.
Here "the answer's probability" is the mean, over the answer's tokens (teacher-forced), of
the probability of each token; the same noise is used for the corrupted run and every
restored run.

Measured on SmolLM2-135M (``docs/specificity/trace.py``, six capitals per seed, 3 seeds):
the first layer's MLP restores most of the answer (0.40-0.49 of p_clean ~0.55: with
one-token subjects its output at the subject is a function of the token alone), every other
layer at most 0.035, and the largest of those moves between seeds (layers 7, 8, 13). So on
this model the trace does not pick the edit layer by itself; it is a diagnostic, and the
layer of an edit stays the caller's choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from unlearnopt.data import Fact
from unlearnopt.editing import subject_last_token


class LayerTrace(NamedTuple):
    """The result of :func:`trace_layers`.

    Attributes:
        effects: ``[L]`` float64, the indirect effect of each candidate layer.
        clean: mean answer probability of the clean runs.
        corrupted: mean answer probability with the subject's embeddings noised.
    """

    effects: torch.Tensor
    clean: float
    corrupted: float

    @property
    def best(self) -> int:
        """Index of the candidate with the largest indirect effect."""
        return int(self.effects.argmax())


def subject_span(tokenizer, prompt: str, subject: str) -> tuple[int, int]:
    """``(first, last)`` token indices of ``subject`` in ``tokenizer(prompt)["input_ids"]``
    (inclusive). The subject's first token is the one after the tokens of the text before it
    (trailing spaces stripped: most tokenizers attach a space to the word that follows)."""
    last = subject_last_token(tokenizer, prompt, subject)
    # A subject at the start has only the special tokens (if any) before it.
    first = len(tokenizer(prompt[: prompt.find(subject)].rstrip())["input_ids"])
    return min(first, last), last


def mlp_down_projections(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The MLP output projections (``*.mlp.down_proj``, Llama / Qwen2 / Mistral / Gemma
    naming) of ``model``, in layer order: the candidates of a keyed edit."""
    found = [
        m
        for name, m in model.named_modules()
        if name.endswith("mlp.down_proj") and isinstance(m, torch.nn.Linear)
    ]
    if not found:
        raise ValueError(
            "the model has no '*.mlp.down_proj' linear layers; pass the candidate layers "
            "to trace_layers explicitly"
        )
    return found


def _answer_probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean over each row's answer tokens of p(y_t) (teacher-forced)."""
    from unlearnopt.answers import IGNORE_INDEX

    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    p = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1).exp()
    return (p * valid).sum(1) / valid.sum(1).clamp(min=1)


class _Noise:
    """Forward hook on the input embeddings: adds ``noise`` ``[B, T, H]`` where ``mask``."""

    def __init__(self, noise: torch.Tensor, mask: torch.Tensor):
        self.noise, self.mask = noise, mask

    def __call__(self, module, inputs, output):
        return output + (self.noise * self.mask.unsqueeze(-1)).to(output.dtype)


class _Restore:
    """Forward hook: records the output at ``positions`` ``[B]``, or puts ``clean`` back."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions
        self.clean: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        rows = torch.arange(output.shape[0], device=output.device)
        if self.clean is None:
            self.seen = output[rows, self.positions].detach().clone()
            return output
        output = output.clone()
        output[rows, self.positions] = self.clean.to(output.dtype)
        return output


@torch.no_grad()
def trace_layers(
    model: torch.nn.Module,
    tokenizer,
    facts: Sequence[Fact],
    candidates: Sequence[torch.nn.Module] | None = None,
    *,
    noise: float = 3.0,
    samples: int = 4,
    seed: int = 0,
) -> LayerTrace:
    """The indirect effect of each candidate layer's output at the subject's last token.

    Args:
        model: a Hugging Face causal LM (``get_input_embeddings()``), left in its mode.
        tokenizer: its tokenizer (right padding).
        facts: facts with a ``subject`` that occurs in the ``prompt``.
        candidates: modules whose output ``[B, T, H]`` is traced (default:
            :func:`mlp_down_projections`).
        noise: the noise's standard deviation, in units of the embedding matrix's (ROME: 3).
        samples: noise draws per fact (>= 1).
        seed: the noise's seed.

    Returns:
        :class:`LayerTrace`; ``.best`` indexes ``candidates``.
    """
    from unlearnopt.answers import encode_facts

    if not facts:
        raise ValueError("facts must hold at least one fact")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    candidates = list(mlp_down_projections(model) if candidates is None else candidates)
    if not candidates:
        raise ValueError("candidates must hold at least one module")
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    batch = encode_facts(tokenizer, facts, device)
    spans = [subject_span(tokenizer, f.prompt, f.subject) for f in facts]
    last = torch.tensor([s[1] for s in spans], device=device)
    positions = torch.arange(batch["input_ids"].shape[1], device=device)
    subject = torch.stack([(positions >= a) & (positions <= b) for a, b in spans])

    def run(b: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return _answer_probability(out.logits, b["labels"])

    hooks = [_Restore(last) for _ in candidates]
    handles = [m.register_forward_hook(h) for m, h in zip(candidates, hooks)]
    try:
        clean = run(batch)
    finally:
        for handle in handles:
            handle.remove()

    # Every fact `samples` times, each with its own noise draw, shared by all runs below.
    many = {k: v.repeat_interleave(samples, dim=0) for k, v in batch.items()}
    mask = subject.repeat_interleave(samples, dim=0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scale = noise * float(embeddings.weight.float().std())
    shape = (*many["input_ids"].shape, embeddings.weight.shape[1])
    draws = (torch.randn(shape, generator=gen) * scale).to(device)
    noise_handle = embeddings.register_forward_hook(_Noise(draws, mask))
    try:
        corrupted = run(many)
        effects = []
        for module, hook in zip(candidates, hooks):
            restore = _Restore(last.repeat_interleave(samples))
            restore.clean = hook.seen.repeat_interleave(samples, dim=0)
            handle = module.register_forward_hook(restore)
            try:
                effects.append(float((run(many) - corrupted).double().mean()))
            finally:
                handle.remove()
    finally:
        noise_handle.remove()
    return LayerTrace(
        torch.tensor(effects, dtype=torch.float64),
        float(clean.double().mean()),
        float(corrupted.double().mean()),
    )


__all__ = ["LayerTrace", "mlp_down_projections", "subject_span", "trace_layers"]
