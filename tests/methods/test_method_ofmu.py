"""OFMU: Hessian-vector products, the cosine-gradient formula, one step against a
hand-written float64 step, the two exact HVP modes against each other, and the first-order
default against the exact method (equal where the Hessians are the identity)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import VOCAB, make_batch, make_model
from unlearnopt.aggregate.combine import combine_gradients
from unlearnopt.methods.hvp import gradients, hvp_autograd, hvp_finite_difference
from unlearnopt.methods.ofmu import OFMU, FirstOrderWeights, OFMUEngine, cosine_directions
from unlearnopt.ops.grad_gram import grad_gram


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    # Everything here is float64 (reference path anyway); skip resolving the native build.
    monkeypatch.setenv("UNLEARNOPT_BACKEND", "reference")


def test_hvp_modes_on_a_known_hessian():
    """f(x, y) = sum(x^4)/4 + (w.y)^2 + sum(x) * sum(y): Hessian known in closed form."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, generator=g)
    vx, vy = (
        torch.randn(5, dtype=torch.float64, generator=g),
        torch.randn(3, dtype=torch.float64, generator=g),
    )

    def loss():
        return (x**4).sum() / 4 + (w @ y) ** 2 + x.sum() * y.sum()

    # H = [[diag(3x^2), 1 1^T], [1 1^T, 2 w w^T]]
    hx = 3 * x.detach() ** 2 * vx + vy.sum()
    hy = vx.sum() + 2 * w * (w @ vy)
    grads = gradients(loss(), [x, y], create_graph=True)
    exact = hvp_autograd(grads, [x, y], [vx, vy])
    fd = hvp_finite_difference(lambda: gradients(loss(), [x, y]), [x, y], [vx, vy], eps=1e-4)
    for got in (exact, fd):
        torch.testing.assert_close(got[0], hx, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(got[1], hy, rtol=1e-7, atol=1e-9)
    # The parameters are restored bit-exactly after the perturbations.
    x0 = x.detach().clone()
    hvp_finite_difference(lambda: gradients(loss(), [x, y]), [x, y], [vx, vy], eps=0.3)
    assert torch.equal(x.detach(), x0)


class TinyCausalLM(torch.nn.Module):
    """A float64-clean causal LM (embedding, causal prefix mean, tanh MLP, head).

    Hugging Face Llama upcasts RMSNorm and the eager attention softmax to float32 even for
    float64 inputs, so two equivalent autograd routes through it differ by ~1e-7 relative
    (and finite differences with h = 1e-4 would lose 3 digits): the precision tests use
    this model instead; the Hugging Face model gets its own end-to-end test below.
    """

    def __init__(self, vocab: int = VOCAB, hidden: int = 12):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        h = h + torch.tanh(self.mix(h.cumsum(1) / steps))
        return self.head(h)


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return TinyCausalLM().double()


def nll(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = getattr(logits, "logits", logits)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
    )


def batches():
    forget = make_batch("llama", batch=2, seq=8, seed=1)
    retain = make_batch("llama", batch=2, seq=8, seed=2)
    return forget, retain


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_cosine_gradient_formula(granularity):
    """∇cos = H_f a + H_r b equals autograd through F.cosine_similarity."""
    model = tiny()
    forget, retain = batches()
    params = list(model.parameters())
    gf = gradients(nll(model, forget), params, create_graph=True)
    gr = gradients(nll(model, retain), params, create_graph=True)
    if granularity == "global":
        cos = F.cosine_similarity(
            torch.cat([t.reshape(-1) for t in gf]), torch.cat([t.reshape(-1) for t in gr]), dim=0
        )
    else:
        cos = torch.stack(
            [F.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0) for a, b in zip(gf, gr)]
        ).mean()
    expected = torch.autograd.grad(cos, params, retain_graph=True)
    value, a, b = cosine_directions(gf, gr, granularity)
    ha, hb = hvp_autograd(gf, params, a), hvp_autograd(gr, params, b)
    torch.testing.assert_close(value, cos.detach(), rtol=1e-12, atol=1e-12)
    for e, x, y in zip(expected, ha, hb):
        torch.testing.assert_close(x + y, e, rtol=1e-8, atol=1e-12)


def hand_written_ofmu_update(model, forget, retain, *, beta, rho, inner_steps, inner_lr, lr):
    """Plain-PyTorch float64 OFMU step (global cosine via F.cosine_similarity): returns the
    parameters after it (SGD outer step: θ ← θ − lr·(∇L_r + 2ρ H_Φ ∇Φ))."""
    params = list(model.parameters())

    def flat(ts):
        return torch.cat([t.reshape(-1) for t in ts])

    def grad_phi(create_graph):
        lf, lr_ = nll(model, forget), nll(model, retain)
        gf = torch.autograd.grad(lf, params, create_graph=True)
        gr = torch.autograd.grad(lr_, params, create_graph=True)
        phi = lf - beta * F.cosine_similarity(flat(gf), flat(gr), dim=0)
        return torch.autograd.grad(phi, params, create_graph=create_graph), gr

    for _ in range(inner_steps):
        d, _ = grad_phi(False)
        with torch.no_grad():
            for p, t in zip(params, d):
                p.add_(inner_lr * t)
    d, gr = grad_phi(True)
    v = [t.detach() for t in d]
    hv = torch.autograd.grad(sum((t * x).sum() for t, x in zip(d, v)), params)
    with torch.no_grad():
        for p, g, h in zip(params, gr, hv):
            p.sub_(lr * (g + 2 * rho * h))
    return [p.detach().clone() for p in params]


OPTS = dict(beta=0.5, rho=0.1, inner_steps=2, inner_lr=0.05)


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_step_equals_hand_written_float64(hvp):
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    model = tiny()
    forget, retain = batches()
    lr = 0.1
    start = [p.detach().clone() for p in model.parameters()]
    expected = hand_written_ofmu_update(copy.deepcopy(model), forget, retain, lr=lr, **OPTS)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    unlearner = MultiObjectiveUnlearner(
        model, opt, method="ofmu", gamma=2.0, hvp=hvp, fd_eps=1e-4, **OPTS
    )
    stats = unlearner.step(forget=forget, retain=retain)
    scale = max((e - s).abs().max().item() for e, s in zip(expected, start))
    worst = (
        max((p.detach() - e).abs().max().item() for p, e in zip(model.parameters(), expected))
        / scale
    )
    # autograd: the same derivatives by another route (rounding only). Finite differences
    # with ‖hv‖ = 1e-4 in float64: truncation O(h²) ≈ 1e-8 relative, rounding of the nested
    # differences ≈ u/h² ≈ 1e-8; 1e-6 leaves margin.
    assert worst < (1e-10 if hvp == "autograd" else 1e-6), f"relative error {worst:.3e}"
    assert stats["skipped"] == 0.0 and stats["ofmu/rho"] == pytest.approx(0.2)
    assert stats["loss/forget_nll"] > stats["loss/forget_nll_before_inner"]  # inner ascent
    state = unlearner.state_dict()["method"]
    fresh = OFMU(gamma=2.0, hvp=hvp, fd_eps=1e-4, **OPTS)
    fresh.load_state_dict(state)
    assert fresh.rho == pytest.approx(0.2) and fresh.outer_steps == 1


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_hvp_modes_agree(granularity):
    """∇Φ and the outer direction ∇L_r + 2ρ H_Φ∇Φ: finite differences vs double backward."""
    model = tiny(seed=3)
    forget, retain = batches()
    params = list(model.parameters())

    def engine(hvp):
        return OFMUEngine(
            params,
            lambda: nll(model, forget),
            lambda: nll(model, retain),
            beta=0.7,
            granularity=granularity,
            hvp=hvp,
            fd_eps=1e-4,
        )

    exact, fd = engine("autograd"), engine("finite_difference")
    d_exact, _, info = exact.phi_gradient()
    d_fd, _, info_fd = fd.phi_gradient()
    torch.testing.assert_close(info_fd["cos"], info["cos"], rtol=1e-12, atol=1e-12)
    scale = max(t.abs().max().item() for t in d_exact)
    assert max((a - b).abs().max().item() for a, b in zip(d_exact, d_fd)) < 1e-7 * scale
    o_exact, _ = exact.outer_direction(rho=0.5)
    o_fd, _ = fd.outer_direction(rho=0.5)
    scale = max(t.abs().max().item() for t in o_exact)
    assert max((a - b).abs().max().item() for a, b in zip(o_exact, o_fd)) < 1e-6 * scale
    # rho = 0 (the default): the outer direction is the retain gradient, no Hessian product
    g_retain = torch.autograd.grad(nll(model, retain), params)
    for e in (exact, fd):
        o_zero, _ = e.outer_direction(rho=0.0)
        for a, b in zip(o_zero, g_retain):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_hugging_face_models_float32(kind, monkeypatch):
    """Finite differences and fused losses (the defaults) on tiny HF models in float32."""
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    monkeypatch.delenv("UNLEARNOPT_BACKEND")
    model = make_model(kind)
    forget = make_batch(kind, batch=2, seq=10, seed=1)
    retain = make_batch(kind, batch=2, seq=10, seed=2)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # rho > 0 and the inner steps tied to the optimizer's lr: the paths the defaults skip
    unlearner = MultiObjectiveUnlearner(
        model, opt, method="ofmu", inner_steps=1, rho=0.01, inner_lr=None, hvp="finite_difference"
    )
    stats = unlearner.step(forget=forget, retain=retain)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["loss/forget_nll"] > stats["loss/forget_nll_before_inner"]
    assert stats["ofmu/rho"] == pytest.approx(0.01 * 1.05)
    assert any(not torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start))


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_first_order_on_hugging_face_models_float32(kind, monkeypatch):
    """The default (first order, fused losses) on tiny HF models: finite, and it moves."""
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    monkeypatch.delenv("UNLEARNOPT_BACKEND")
    model = make_model(kind)
    forget = make_batch(kind, batch=2, seq=10, seed=1)
    retain = make_batch(kind, batch=2, seq=10, seed=2)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = MultiObjectiveUnlearner(model, opt, method="ofmu").step(forget, retain)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["grad_norm/phi"] > 0 and -1 <= stats["ofmu/cos"] <= 1
    assert any(not torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start))


def test_failed_step_restores_parameters():
    from unlearnopt.unlearner import MultiObjectiveUnlearner, UnlearningStepError

    model = tiny()
    forget, retain = batches()
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    unlearner = MultiObjectiveUnlearner(
        model,
        opt,
        method="ofmu",
        inner_steps=1,
        beta=0.0,
        rho=1e308,
        gamma=1.0,
        hvp="finite_difference",
    )
    with pytest.raises(UnlearningStepError, match="non-finite"):
        unlearner.step(forget=forget, retain=retain)
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start))
    assert unlearner.method.rho == 1e308


def test_options_validated():
    with pytest.raises(ValueError, match="hvp must be one of"):
        OFMU(hvp="exact")
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        OFMU(gamma=0.5)
    with pytest.raises(ValueError, match="inner_steps"):
        OFMU(inner_steps=-1)
    with pytest.raises(TypeError, match="unknown option"):
        OFMU(alpha=1.0)
    with pytest.raises(ValueError, match=r"rho=0\.1 needs hvp='finite_difference'"):
        OFMU(rho=0.1)
    with pytest.raises(ValueError, match="ascent must be one of"):
        OFMU(ascent="normalised")
    with pytest.raises(ValueError, match="ascent must be one of"):
        FirstOrderWeights(1.0, [1e-5], ascent="sign")
    assert OFMU().config["hvp"] == "first_order"
    assert OFMU().config["ascent"] == "bounded"


# -- first order (the default) ----------------------------------------------------------------


def quadratic_losses(seed: int):
    """L_f = ½‖θ − c_f‖², L_r = ½‖θ − c_r‖² over two tensors: both Hessians are the identity."""
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_(),
        torch.randn(5, dtype=torch.float64, generator=g).requires_grad_(),
    ]
    c_f = [torch.randn(p.shape, dtype=torch.float64, generator=g) for p in params]
    c_r = [torch.randn(p.shape, dtype=torch.float64, generator=g) for p in params]

    def half_sq(centres):
        return lambda: sum(0.5 * ((p - c) ** 2).sum() for p, c in zip(params, centres))

    return params, half_sq(c_f), half_sq(c_r)


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_first_order_is_exact_when_the_hessians_are_the_identity(granularity):
    """On quadratics with H_f = H_r = I the first-order ∇Φ equals the exact one (double
    backward), and the reused outer direction equals ∇L_r at θ' = θ + η∇Φ."""
    params, forget, retain = quadratic_losses(seed=4)
    beta, eta = 0.7, 0.3
    exact = OFMUEngine(
        params, forget, retain, beta=beta, granularity=granularity, hvp="autograd", fd_eps=1e-4
    )
    dphi, _, _ = exact.phi_gradient()
    grads = [gradients(forget(), params), gradients(retain(), params)]
    gram = grad_gram(grads)
    problems = gram.total.unsqueeze(0) if granularity == "global" else gram.per_tensor
    weights = FirstOrderWeights(beta, [eta])
    ascent, _ = weights.ascent(problems)
    for got, want in zip(combine_gradients(grads, ascent), dphi):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    outer = combine_gradients(grads, weights(problems).coefficients)
    with torch.no_grad():
        for p, d in zip(params, dphi):
            p.add_(eta * d)
    for got, want in zip(outer, gradients(retain(), params)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def hand_written_first_order_update(model, forget, retain, *, ascent, beta, inner_lr, lr):
    """float64; ``identity``: θ + η·u − lr·(g_r + η·u) with u = g_f − β(a + b); ``bounded``:
    θ + η·sign(u) − lr·g_r with u = (1 + β cos) g_f − β(‖g_f‖/‖g_r‖) g_r."""
    params = list(model.parameters())
    gf = torch.autograd.grad(nll(model, forget), params)
    gr = torch.autograd.grad(nll(model, retain), params)
    f, r = torch.cat([t.reshape(-1) for t in gf]), torch.cat([t.reshape(-1) for t in gr])
    nf, nr = f.norm(), r.norm()
    cos = (f @ r) / (nf * nr)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    if ascent == "identity":
        a_plus_b = r / (nf * nr) - cos * f / nf**2 + f / (nf * nr) - cos * r / nr**2
        u = f - beta * a_plus_b
        new = flat + inner_lr * u - lr * (r + inner_lr * u)
    else:
        u = (1 + beta * cos) * f - beta * (nf / nr) * r
        new = flat + inner_lr * u.sign() - lr * r
    return list(torch.split(new, [p.numel() for p in params]))


@pytest.mark.parametrize("ascent", ["bounded", "identity"])
def test_first_order_step_equals_hand_written_float64(ascent):
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    model = tiny()
    forget, retain = batches()
    expected = hand_written_first_order_update(
        copy.deepcopy(model), forget, retain, ascent=ascent, beta=0.5, inner_lr=0.05, lr=0.1
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    unlearner = MultiObjectiveUnlearner(
        model, opt, method="ofmu", beta=0.5, inner_lr=0.05, ascent=ascent
    )
    stats = unlearner.step(forget=forget, retain=retain)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().reshape(-1), e, rtol=1e-10, atol=1e-12)
    assert stats["skipped"] == 0.0 and unlearner.method.outer_steps == 1
    assert stats["ofmu/phi"] == pytest.approx(stats["loss/forget_nll"] - 0.5 * stats["ofmu/cos"])


@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_bounded_ascent_raises_the_forget_loss_and_stays_bounded(granularity):
    """The bounded inner direction u has ⟨u_p, g_f,p⟩ = ‖g_f,p‖² > 0 for every cosine and β,
    and ‖u_p‖ ≤ (1 + β)‖g_f,p‖ however small g_r is; its outer coefficients are (0, 1)."""
    g = torch.Generator().manual_seed(3)
    for beta in (0.0, 0.5, 1.0, 4.0):
        for retain_scale in (1.0, 1e-3, 1e-12):
            gf = [torch.randn(8, dtype=torch.float64, generator=g) for _ in range(5)]
            gr = [retain_scale * torch.randn(8, dtype=torch.float64, generator=g) for _ in gf]
            grads = [gf, gr]
            gram = grad_gram(grads)
            problems = gram.total.unsqueeze(0) if granularity == "global" else gram.per_tensor
            weights = FirstOrderWeights(beta, [1e-3], ascent="bounded")
            c, _ = weights.ascent(problems)
            u = combine_gradients(grads, c)
            if granularity == "global":
                u_parts, f_parts = [torch.cat(u)], [torch.cat(gf)]
            else:
                u_parts, f_parts = u, gf
            for up, fp in zip(u_parts, f_parts):
                torch.testing.assert_close(up @ fp, fp @ fp, rtol=1e-9, atol=0)
                assert up.norm() <= (1 + beta) * fp.norm() * (1 + 1e-9)
            outer = weights(problems).coefficients
            assert torch.equal(outer, torch.tensor([[0.0, 1.0]]).double().expand_as(c))


def test_bounded_step_moves_every_entry_by_the_inner_lr():
    """With an optimizer that does not move (lr 0), a bounded step moves each entry whose
    inner direction is nonzero by exactly ±η."""
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    model = tiny()
    forget, retain = batches()
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    MultiObjectiveUnlearner(model, opt, method="ofmu", inner_lr=1e-3).step(forget, retain)
    moved = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(model.parameters(), start)])
    nonzero = moved != 0
    assert nonzero.float().mean() > 0.5
    torch.testing.assert_close(moved[nonzero].abs(), torch.full_like(moved[nonzero], 1e-3))


def objective_changes(model, forget, retain, **options):
    from unlearnopt.unlearner import MultiObjectiveUnlearner

    with torch.no_grad():
        before = nll(model, forget).item(), nll(model, retain).item()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    MultiObjectiveUnlearner(model, opt, method="ofmu", **options).step(forget, retain)
    with torch.no_grad():
        after = nll(model, forget).item(), nll(model, retain).item()
    return after[0] - before[0], after[1] - before[1]


@pytest.mark.parametrize("ascent", ["bounded", "identity"])
@pytest.mark.parametrize("granularity", ["global", "per_tensor"])
def test_first_order_progresses_like_the_exact_step(granularity, ascent):
    """On a tiny float64 model both raise the forget loss and lower the retain loss."""
    forget, retain = batches()
    opts = {"beta": 0.5, "inner_lr": 0.5, "inner_steps": 1, "granularity": granularity}
    first = objective_changes(tiny(seed=1), forget, retain, ascent=ascent, **opts)
    exact = objective_changes(tiny(seed=1), forget, retain, hvp="autograd", **opts)
    assert first[0] > 0 and exact[0] > 0, (first, exact)
    assert first[1] < 0 and exact[1] < 0, (first, exact)


def test_first_order_failure_restores_parameters():
    """A non-finite loss after an inner step (a huge inner_lr): nothing moves."""
    from unlearnopt.unlearner import MultiObjectiveUnlearner, UnlearningStepError

    model = tiny()
    forget, retain = batches()
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    unlearner = MultiObjectiveUnlearner(model, opt, method="ofmu", inner_steps=2, inner_lr=1e300)
    with pytest.raises(UnlearningStepError, match="non-finite"):
        unlearner.step(forget=forget, retain=retain)
    assert all(torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start))
    assert unlearner.steps == 0 and not opt.state


@pytest.mark.parametrize("hvp", ["finite_difference", "autograd"])
def test_exact_variants_refuse_several_ranks(hvp):
    from types import SimpleNamespace

    tools = SimpleNamespace(world_size=2, scaler=None)
    recipe = OFMU(hvp=hvp).step_recipe()
    with pytest.raises(NotImplementedError, match=r"single process.*hvp='first_order'"):
        recipe(tools, {}, {})
