"""Forget facts with whitened, subject-keyed edits of one linear layer (ROME/MEMIT's update).

Language models recall a fact "subject -> answer" through mid-layer MLPs read at the
subject's last token (Meng et al., 2022, arXiv 2202.05262; 2210.07229). An edit of such a
layer ``W`` (``[out, in]``) keyed on the subject changes what that subject recalls and little
else, provided the key is *whitened*: subjects of one kind (countries) share most of their
activation, and an update along the raw key would move every one of them.

For facts f with key ``k_f`` (the layer's input at the subject's last token) and value
change ``r_f`` (what must be added to the layer's output there so that the answer is no
longer produced), the edit of least ``C``-norm that realises every value change is::

    dW = R (K^T C^-1 K)^-1 K^T C^-1        so that  dW k_f = r_f  for every f,

with ``K = [k_f]`` ``[in, n]``, ``R = [r_f]`` ``[out, n]``, and ``C = E[k k^T]`` the second
moment of the layer's inputs over generic text (plus ``ridge * mean(diag C) * I``). On any
other key ``k``, ``dW k = R (K^T C^-1 K)^-1 K^T C^-1 k``: small when ``k`` is
``C^-1``-orthogonal to the forget keys, i.e. for subjects that differ in the directions in
which subjects usually differ.

Each ``r_f`` is found by Adam on ``r`` (added to the layer's output at the subject's last
token by a forward hook) minimising the mean over answer tokens of ``-log(1 - p(y_t))``,
stopping as soon as no answer is the model's greedy continuation any more.

Measured on SmolLM2-135M (docs/specificity/README.md): forgetting six capitals with the
down-projection of layer 6, one round, kept the held-out capitals (0.90) where gradient
methods lost them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unlearnopt.data import Fact


def subject_last_token(tokenizer, prompt: str, subject: str) -> int:
    """Index of the subject's last token in ``tokenizer(prompt)["input_ids"]``.

    Raises ``ValueError`` when ``subject`` is empty or not in ``prompt``."""
    start = prompt.find(subject) if subject else -1
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    return len(tokenizer(prompt[: start + len(subject)])["input_ids"]) - 1


class _KeyHook:
    """Forward hook on ``module``: records its input (every token, or at ``positions``
    ``[B]``) and adds ``delta`` ``[B, out]`` to its output at ``positions``."""

    def __init__(self, module: torch.nn.Module, positions: torch.Tensor | None = None):
        self.positions = positions
        self.delta: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        x = inputs[0]
        if self.positions is None:
            self.keys = x.detach()
            return output
        rows = torch.arange(x.shape[0], device=x.device)
        self.keys = x[rows, self.positions].detach()
        if self.delta is None:
            return output
        output = output.clone()
        output[rows, self.positions] = output[rows, self.positions] + self.delta.to(output.dtype)
        return output


@torch.no_grad()
def key_second_moment(
    model, tokenizer, module: torch.nn.Module, texts: Sequence[str], *, batch_size: int = 16
) -> torch.Tensor:
    """``C = mean_t k_t k_t^T`` ``[in, in]`` float64 over every (non-padding) token of
    ``texts``, ``k_t`` the input of ``module`` (a linear layer of ``model``)."""
    if not texts:
        raise ValueError("texts must hold at least one text")
    hook = _KeyHook(module)
    total, count = None, 0
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True)
            device = next(model.parameters()).device
            model(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
            )
            k = hook.keys[enc["attention_mask"].to(device).bool()].double()
            total = k.T @ k if total is None else total + k.T @ k
            count += k.shape[0]
    finally:
        hook.handle.remove()
    return total / count


def whitening(second_moment: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """``(C + ridge * mean(diag C) * I)^-1`` ``[in, in]``, float64."""
    if second_moment.dim() != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"second_moment must be square [in, in], got {tuple(second_moment.shape)}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    c = second_moment.double()
    c = c + ridge * torch.diagonal(c).mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.inv(c)


def keyed_update(keys: torch.Tensor, values: torch.Tensor, c_inv: torch.Tensor) -> torch.Tensor:
    """``dW = R (K^T C^-1 K)^-1 K^T C^-1`` ``[out, in]`` float64, the change of least
    ``C``-norm with ``dW k_f = r_f``.

    Args:
        keys: ``[n, in]`` (one key per row).
        values: ``[n, out]`` (the value change of each key).
        c_inv: ``[in, in]``, the inverse key second moment (:func:`whitening`).
    """
    if keys.dim() != 2 or values.dim() != 2 or keys.shape[0] != values.shape[0]:
        raise ValueError(
            f"keys [n, in] and values [n, out] must have the same n, got "
            f"{tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if c_inv.shape != (keys.shape[1], keys.shape[1]):
        raise ValueError(
            f"c_inv must be [{keys.shape[1]}, {keys.shape[1]}], got {tuple(c_inv.shape)}"
        )
    k, r = keys.double(), values.double()
    ck = c_inv.double() @ k.T  # [in, n]
    return r.T @ torch.linalg.solve(k @ ck, ck.T)  # [out, n] [n, in]


def keyed_forget(
    model,
    tokenizer,
    facts: Sequence[Fact],
    module: torch.nn.Linear,
    c_inv: torch.Tensor,
    *,
    inner_steps: int = 40,
    inner_lr: float = 0.5,
) -> dict[str, float]:
    """One edit of ``module.weight`` (in place) that makes ``model`` stop answering
    ``facts`` (each needs a ``subject`` that occurs in its prompt); see the module docstring.

    Returns ``{"value_norm": mean ||r_f||, "update_norm": ||dW||, "inner_steps": steps}``.
    Call it again (a new round) while some fact is still answered.
    """
    from unlearnopt.answers import IGNORE_INDEX, encode_facts

    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"module must be a torch.nn.Linear, got {type(module).__name__}")
    if not facts:
        raise ValueError("facts must hold at least one fact")
    device = module.weight.device
    batch = encode_facts(tokenizer, facts, device)
    positions = torch.tensor(
        [subject_last_token(tokenizer, f.prompt, f.subject) for f in facts], device=device
    )
    hook = _KeyHook(module, positions)
    delta = torch.zeros(len(facts), module.out_features, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=inner_lr)
    was_training = model.training
    model.eval()
    steps = 0
    try:
        target = batch["labels"][:, 1:]
        valid = target != IGNORE_INDEX
        for steps in range(1, inner_steps + 1):  # noqa: B007 - the count is read after the loop
            hook.delta = delta
            logits = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .logits[:, :-1]
                .float()
            )
            answered = ((logits.argmax(-1) == target) | ~valid).all(1)
            if not bool(answered.any()):
                break
            logp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0)[..., None])
            p = logp[..., 0].exp().clamp(max=1 - 1e-6)
            loss = (-torch.log1p(-p) * valid).sum() / valid.sum()
            # only the value changes are optimised: no gradient reaches the model's weights
            (delta.grad,) = torch.autograd.grad(loss, [delta])
            opt.step()
        keys = hook.keys
    finally:
        hook.handle.remove()
        model.train(was_training)
    values = delta.detach()
    dw = keyed_update(keys, values, c_inv.to(device))
    with torch.no_grad():
        module.weight.add_(dw.to(module.weight.dtype))
    return {
        "value_norm": float(values.norm(dim=1).mean()),
        "update_norm": float(dw.norm()),
        "inner_steps": float(steps),
    }


__all__ = ["key_second_moment", "keyed_forget", "keyed_update", "subject_last_token", "whitening"]
