"""The command line's model loading and seeding."""

from __future__ import annotations

import random
import time


def _load(model: str | None, device: str):
    from unlearnopt.models import load_model

    t0 = time.perf_counter()
    where = "the embedded SmolLM2-135M-Instruct" if model in (None, "default") else model
    print(f"loading {where} ...", flush=True)
    m, tok = load_model(model, device=device)
    n = sum(p.numel() for p in m.parameters())
    print(f"loaded {n / 1e6:.0f}M parameters in {time.perf_counter() - t0:.0f} s", flush=True)
    return m, tok


def _setup_torch(args) -> None:
    import torch

    torch.manual_seed(args.seed)
    random.seed(args.seed)
