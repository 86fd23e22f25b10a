"""Causal tracing on SmolLM2-135M: which layer's MLP recalls the forget facts of each seed.

For every seed's focused split (``focused.py``'s ``focused_split``, the known facts listed in
``runs/known.json``), ``unlearnopt.causal_trace.trace_layers`` over the 30 MLP
down-projections: the indirect effect of each layer's output at the subject's last token.
Writes ``runs/trace-<relation>.json`` and ``runs/trace-<relation>.png`` (effect per layer,
one line per seed) and prints the best layer of each seed.

    python docs/specificity/trace.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from focused import focused_split

from unlearnopt.causal_trace import mlp_down_projections, trace_layers
from unlearnopt.data import load_real_facts
from unlearnopt.models import load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--relation", default="capital")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--runs", default=str(Path(__file__).resolve().parent / "runs"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = Path(args.runs)
    ids = set(json.loads((runs / "known.json").read_text()))
    known = [f for f in load_real_facts() if f.id in ids]
    model, tok = load_model(None)
    model.eval()
    layers = mlp_down_projections(model)
    result = {}
    for seed in args.seeds:
        split = focused_split(known, args.relation, args.k, 10, 24, seed)
        for group in ("forget", "neighbour"):
            trace = trace_layers(model, tok, split[group], layers, samples=args.samples)
            result[f"s{seed}-{group}"] = {
                "facts": [f.id for f in split[group]],
                "effects": [round(float(e), 5) for e in trace.effects],
                "best": trace.best,
                "clean": trace.clean,
                "corrupted": trace.corrupted,
            }
            print(f"seed {seed} {group}: best layer {trace.best}, effects", flush=True)
            print("  " + " ".join(f"{e:.3f}" for e in trace.effects.tolist()), flush=True)
    (runs / f"trace-{args.relation}.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, r in result.items():
        ax.plot(r["effects"], label=name, linestyle="-" if "forget" in name else ":")
    ax.set_xlabel("layer (MLP down-projection)")
    ax.set_ylabel("indirect effect on p(answer)")
    ax.set_title(f"causal trace at the subject's last token ({args.relation})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(runs / f"trace-{args.relation}.png", dpi=120)


if __name__ == "__main__":
    main()
