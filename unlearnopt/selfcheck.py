"""``unlearnopt selfcheck``: which backends work here, and each op once against its reference."""

from __future__ import annotations

import os
import time

import torch


def _backends(device: torch.device) -> dict[str, str | None]:
    from unlearnopt.kernels import triton_usable
    from unlearnopt.native import native_error

    ok, why = triton_usable(device)
    return {
        "native": native_error() if device.type == "cpu" else "CPU only",
        "triton": None if ok else why,
        "reference": None,
    }


def _cases(device: torch.device):
    """(op name, function(backend) -> tensors, function() -> reference tensors)."""
    from unlearnopt import ops
    from unlearnopt.reference import grad_gram as ref_gram
    from unlearnopt.reference import masked_kl as ref_kl
    from unlearnopt.reference import min_norm as ref_mn
    from unlearnopt.reference import unlearning_cross_entropy as ref_ce

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 1001, generator=g).to(device)
    ref_logits = torch.randn(7, 1001, generator=g).to(device)
    labels = torch.tensor([3, -100, 0, 1000, 5, 6, 7], device=device)
    hidden = torch.randn(7, 16, generator=g).to(device)
    weight = torch.randn(1001, 16, generator=g).to(device)
    grads = [[torch.randn(s, generator=g).to(device) for s in (5, 300, 17)] for _ in range(3)]
    gram = ref_gram.grad_gram(grads).per_tensor

    def with_grad(fn, *inputs):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out.backward()
        return [out.detach()] + [t.grad for t in leaves]

    return [
        (
            "unlearning_cross_entropy",
            lambda b: with_grad(
                lambda x: ops.unlearning_cross_entropy(x, labels, "uce", backend=b), logits
            ),
            lambda: with_grad(lambda x: ref_ce.unlearning_cross_entropy(x, labels, "uce"), logits),
        ),
        (
            "fused_linear_unlearning_cross_entropy",
            lambda b: with_grad(
                lambda h, w: ops.fused_linear_unlearning_cross_entropy(
                    h, w, labels, mode="ga", backend=b
                ),
                hidden,
                weight,
            ),
            lambda: with_grad(
                lambda h, w: ref_ce.fused_linear_unlearning_cross_entropy(h, w, labels, mode="ga"),
                hidden,
                weight,
            ),
        ),
        (
            "masked_kl",
            lambda b: with_grad(lambda x: ops.masked_kl(x, ref_logits, backend=b), logits),
            lambda: with_grad(lambda x: ref_kl.masked_kl(x, ref_logits), logits),
        ),
        ("grad_gram", lambda b: [ops.grad_gram(grads, backend=b).per_tensor], lambda: [gram]),
        (
            "min_norm",
            lambda b: [ops.min_norm(gram, backend=b).weights],
            lambda: [ref_mn.min_norm(gram).weights],
        ),
    ]


def main() -> int:
    """Print the backends and check every op on every available backend; 0 if all agree."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"unlearnopt selfcheck on {device} (torch {torch.__version__}, "
        f"UNLEARNOPT_BACKEND={os.environ.get('UNLEARNOPT_BACKEND', 'auto')})"
    )
    backends = _backends(device)
    for name, why in backends.items():
        print(f"  backend {name:9s} {'available' if why is None else 'unavailable: ' + why}")
    failures = 0
    for op, run, expected in _cases(device):
        want = expected()
        for backend, why in backends.items():
            if why is not None or backend == "reference":
                continue
            start = time.perf_counter()
            try:
                got = run(backend)
                worst = max(float((a.double() - e.double()).abs().max()) for a, e in zip(got, want))
                ok = worst <= 1e-4
            except Exception as exc:  # noqa: BLE001 - report every op, then fail
                ok, worst = False, float("nan")
                print(f"    {type(exc).__name__}: {exc}")
            failures += not ok
            print(
                f"  {op:38s} {backend:9s} max |diff| vs reference {worst:.2e} "
                f"{'ok' if ok else 'MISMATCH'} ({(time.perf_counter() - start) * 1e3:.0f} ms)"
            )
    print("selfcheck passed" if not failures else f"selfcheck FAILED ({failures} mismatches)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
