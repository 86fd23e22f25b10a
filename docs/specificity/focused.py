"""Focused unlearning requests on SmolLM2-135M: forget k facts of ONE relation, keep the rest.

One request per seed: ``k`` known facts of one relation (``--relation``, default capitals)
are forgotten; ``--neighbours`` other known facts of the same relation are held out (never
trained on, never a prompt of the training batches) and measure specificity; the retain
set is known facts of the other relations (``retain_acc``), and, with ``sameN``, also facts
of the forget relation disjoint from the neighbours (``retain_same_acc``). Each step's facts
become batches through the method's own ``fact_batches`` (as in ``unlearnopt run`` /
``pulse``): SIU's constructed batch (invented substitute answers for the forget facts, the
step's retain facts as its preservation rows), the plain encoding for the others.

Each variant runs AdamW (the method's measured lr of ``unlearnopt.training.tuned_settings``:
1e-5, SIU 3e-5; or ``lrX``), clipping at 1.0, and
stops at the first step where every forget fact is answered wrongly (greedy exact match,
teacher-forced) or after ``--max-steps``; then the metrics of ``unlearnopt.eval.metrics``
are measured. One JSON per (variant, seed) under ``--out`` (an existing one is skipped).

A variant is a method name followed by ``+``-separated modifiers, e.g.
``mollm+same4+cos0``:

- ``sameN``: N facts of each retain batch are facts of the forget relation (disjoint
  from the neighbours), the others (8 - N, at least 4) from other relations;
- ``tklN``: N retain-batch prompts use the forget prompts' template with the subject of
  a retain fact (never a forget or neighbour subject), labelled with the original model's
  greedy next token: the retain objectives (KL to the original for mollm, NLL otherwise)
  then hold the relation's prompts to what the original model said;
- ``cosT``: ``CosineMask(threshold=T)`` on the forget objective's contribution;
- ``salF`` / ``salrF`` / ``rowF`` / ``rowrF``: ``SaliencyMask(fraction=F)`` by |g_f|
  (``r``: by |g_f| / |g_r|), per entry or per row;
- ``pt``: ``granularity="per_tensor"`` (mollm);
- ``gate``: the forget loss only on tokens still predicted (argmax), per token;
- ``drop``: the forget batch holds only the facts still answered;
- ``lrX``: learning rate X (e.g. ``lr3e-5``);
- ``KEY=VALUE``: a method option (e.g. ``ofmu+inner_lr=2e-4``).

Usage (the commands of docs/specificity/README.md)::

    python docs/specificity/focused.py --seeds 0 1 2 --variants ga mollm mollm+same4 \
        --out docs/specificity/runs
    python docs/specificity/focused.py --report docs/specificity/runs
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unlearnopt.aggregate.masks import CosineMask, MaskedAggregator, SaliencyMask
from unlearnopt.answers import encode_qa
from unlearnopt.data import Fact, load_neutral_texts, load_real_facts
from unlearnopt.editing import key_second_moment, keyed_forget, whitening
from unlearnopt.eval.metrics import evaluate, score_answers
from unlearnopt.eval.pulse import known_facts
from unlearnopt.methods import Objective, make_method
from unlearnopt.training import DEFAULT_LR, model_vocab_size, tuned_settings
from unlearnopt.unlearner import MultiObjectiveUnlearner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RETAIN_BATCH = 8


# --------------------------------------------------------------------------- the split


def answer_key(f: Fact) -> str:
    return " ".join(f.answer.lower().split())


def focused_split(
    known: list[Fact], relation: str, k: int, n_neighbours: int, n_retain: int, seed: int
) -> dict[str, list[Fact]]:
    """forget: k facts of ``relation`` whose answer no other known fact shares; neighbour:
    ``n_neighbours`` other known facts of it; retain_same: the rest of it; retain: up to
    ``n_retain`` known facts of other relations (seeded)."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for f in known:
        counts[answer_key(f)] = counts.get(answer_key(f), 0) + 1
    same = [f for f in known if f.relation == relation]
    rng.shuffle(same)
    own = [f for f in same if counts[answer_key(f)] == 1]
    if len(own) < k or len(same) < k + n_neighbours + 1:
        raise SystemExit(
            f"relation {relation!r}: {len(same)} known facts, {len(own)} with an "
            f"answer of their own; need k={k} + {n_neighbours} neighbours + 1"
        )
    forget = own[:k]
    ids = {f.id for f in forget}
    rest = [f for f in same if f.id not in ids]
    neighbour, retain_same = rest[:n_neighbours], rest[n_neighbours:]
    other = [f for f in known if f.relation != relation]
    rng.shuffle(other)
    return {
        "forget": forget,
        "neighbour": neighbour,
        "retain_same": retain_same,
        "retain": other[:n_retain],
    }


def template_facts(model, tokenizer, forget: list[Fact], subjects: list[str]) -> list[Fact]:
    """The forget prompts' templates filled with ``subjects``, answered with the model's
    greedy next token (the labels mark the position whose distribution is kept)."""
    templates = sorted({f.prompt.replace(f.subject, "{}") for f in forget if f.subject in f.prompt})
    prompts = [t.format(s) for t in templates for s in subjects]
    out = []
    model.eval()
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt")["input_ids"]
            tok = int(model(input_ids=ids).logits[0, -1].argmax())
            ans = tokenizer.decode([tok]).strip()
            if ans:
                out.append(Fact(prompt=p, answer=ans, relation="template", id=f"template/{p}"))
    return out


# --------------------------------------------------------------------------- variants


def _number(text: str):
    """``"3"`` -> 3, ``"2e-4"`` -> 2e-4, anything else unchanged (a string option)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_variant(name: str) -> dict:
    parts = name.split("+")
    spec = {
        "name": name,
        "method": parts[0],
        "lr": None,  # the method's measured lr (tuned_settings) unless ``lrX``
        "options": {},
        "same": 0,
        "tkl": 0,
        "masks": [],
        "gate": False,
        "drop": False,
        "keyed": None,
        "ridge": 1e-2,
    }
    if parts[0].startswith("keyed"):
        spec["keyed"] = int(parts[0][5:])
    for tok in parts[1:]:
        if "=" in tok:  # a method option, e.g. ofmu+inner_lr=2e-4 (before the prefixes)
            key, value = tok.split("=", 1)
            spec["options"][key] = _number(value)
        elif tok.startswith("same"):
            spec["same"] = int(tok[4:])
        elif tok.startswith("tkl"):
            spec["tkl"] = int(tok[3:])
        elif tok.startswith("cos"):
            spec["masks"].append(CosineMask(threshold=float(tok[3:])))
        elif tok.startswith("salr"):
            spec["masks"].append(SaliencyMask(float(tok[4:]), score="ratio"))
        elif tok.startswith("sal"):
            spec["masks"].append(SaliencyMask(float(tok[3:])))
        elif tok.startswith("rowr"):
            spec["masks"].append(SaliencyMask(float(tok[4:]), score="ratio", unit="row"))
        elif tok.startswith("row"):
            spec["masks"].append(SaliencyMask(float(tok[3:]), unit="row"))
        elif tok == "pt":
            spec["options"]["granularity"] = "per_tensor"
        elif tok == "gate":
            spec["gate"] = True
        elif tok == "drop":
            spec["drop"] = True
        elif tok.startswith("ridge"):
            spec["ridge"] = float(tok[5:])
        elif tok.startswith("lr"):
            spec["lr"] = float(tok[2:])
        else:
            raise SystemExit(f"unknown modifier {tok!r} in variant {name!r}")
    return spec


def gated(objective: Objective) -> Objective:
    """The same forget loss on the tokens the model still predicts (argmax = label) only."""

    def loss(ctx):
        labels = ctx.labels.clone()
        pred = ctx.logits[:, :-1].detach().argmax(-1)
        tail = labels[:, 1:]
        tail[pred != tail] = -100
        return objective.loss(_Relabelled(ctx, labels))

    return Objective(objective.name, objective.batch, loss, objective.unit, objective.count)


class _Relabelled:
    def __init__(self, ctx, labels):
        self._ctx, self.labels = ctx, labels

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def build_method(spec: dict):
    method = make_method(spec["method"], **spec["options"])
    if spec["masks"]:
        inner = method.aggregator
        method.aggregator = lambda: MaskedAggregator(inner(), spec["masks"])
    if spec["gate"]:
        objs = method.objectives
        method.objectives = lambda: [gated(o) if o.batch == "forget" else o for o in objs()]
    return method


# --------------------------------------------------------------------------- one run


def measure(model, tok, split, neutral) -> dict:
    m = evaluate(
        model,
        tok,
        forget=split["forget"],
        retain=split["retain"],
        neighbour=split["neighbour"],
        neutral=neutral,
        progress=False,
    )
    if split["retain_same"]:
        s = score_answers(
            model,
            tok,
            [f.prompt for f in split["retain_same"]],
            [f.answer for f in split["retain_same"]],
        )
        m["retain_same_acc"] = float(s.exact.mean())
    return {k: v for k, v in m.items() if not math.isnan(v)}  # unused metrics


def run_variant(base, tok, split, templates, neutral, spec, seed, max_steps, log):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = copy.deepcopy(base).train().requires_grad_(True)
    ref = base
    method = build_method(spec)
    lr = spec["lr"] or tuned_settings(spec["method"], DEFAULT_LR)["lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    unl = MultiObjectiveUnlearner(model, opt, method=method, ref_model=ref, max_grad_norm=1.0)
    forget = split["forget"]
    nb = split["neighbour"]
    trace, reached, t0 = [], None, time.perf_counter()
    known = np.ones(len(forget), dtype=bool)
    vocab = model_vocab_size(model)
    for step in range(1, max_steps + 1):
        batch_facts = [f for f, k in zip(forget, known) if k] if spec["drop"] else forget
        n_same = min(spec["same"], len(split["retain_same"]))
        n_tkl = min(spec["tkl"], len(templates))
        retain = (
            rng.sample(split["retain_same"], n_same)
            + rng.sample(templates, n_tkl)
            + rng.sample(split["retain"], max(RETAIN_BATCH - n_same - n_tkl, RETAIN_BATCH // 2))
        )
        model.train()
        fb, rb = method.fact_batches(
            batch_facts,
            retain,
            encode=lambda prompts, answers: encode_qa(tok, prompts, answers),
            tokenizer=tok,
            vocab_size=vocab,
        )
        stats = unl.step(forget=fb, retain=rb)
        known = score_answers(
            model, tok, [f.prompt for f in forget], [f.answer for f in forget]
        ).exact
        s_nb = score_answers(model, tok, [f.prompt for f in nb], [f.answer for f in nb])
        trace.append(
            {
                "step": step,
                "forget_acc": float(known.mean()),
                "neighbour_acc": float(s_nb.exact.mean()),
                "neighbour_prob": float(s_nb.prob.mean()),
                **{k: v for k, v in stats.items() if k.startswith(("weight/", "cos/"))},
            }
        )
        log(
            f"  {spec['name']} seed {seed} step {step}: forget {known.mean():.2f} "
            f"neighbour {s_nb.exact.mean():.2f}"
        )
        if not known.any():
            reached = step
            break
    seconds = time.perf_counter() - t0
    metrics = measure(model, tok, split, neutral)
    del model, unl, opt
    return {
        "variant": spec["name"],
        "seed": seed,
        "lr": lr,
        "steps": reached or max_steps,
        "reached": reached is not None,
        "metrics": metrics,
        "trace": trace,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- keyed edits


def run_keyed(base, tok, split, neutral, spec, seed, max_steps, log):
    """Whitened subject-keyed edits (``keyedL``: ``unlearnopt.editing.keyed_forget`` on the
    down-projection of layer L), round after round until forgotten."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base).eval().requires_grad_(False)
    layer = spec["keyed"]
    # generic text for the key statistics: the shipped invented-people prompts and the
    # retain facts (never the neutral sentences of the perplexity, nor neighbours)
    from unlearnopt.data import load_fictitious_facts

    texts = [
        p for f in load_fictitious_facts() + split["retain"] for p in (f.prompt, *f.paraphrases)
    ]
    if spec["same"]:
        texts += [f.prompt for f in split["retain_same"]]
    module = model.model.layers[layer].mlp.down_proj
    c_inv = whitening(key_second_moment(model, tok, module, texts), spec["ridge"])
    forget, nb = split["forget"], split["neighbour"]
    trace, reached, t0 = [], None, time.perf_counter()
    for step in range(1, max_steps + 1):
        info = keyed_forget(model, tok, forget, module, c_inv)
        known = score_answers(
            model, tok, [f.prompt for f in forget], [f.answer for f in forget]
        ).exact
        s_nb = score_answers(model, tok, [f.prompt for f in nb], [f.answer for f in nb])
        trace.append(
            {
                "step": step,
                "forget_acc": float(known.mean()),
                "neighbour_acc": float(s_nb.exact.mean()),
                "neighbour_prob": float(s_nb.prob.mean()),
                **info,
            }
        )
        log(
            f"  {spec['name']} seed {seed} round {step}: forget {known.mean():.2f} "
            f"neighbour {s_nb.exact.mean():.2f} {info}"
        )
        if not known.any():
            reached = step
            break
    seconds = time.perf_counter() - t0
    metrics = measure(model, tok, split, neutral)
    return {
        "variant": spec["name"],
        "seed": seed,
        "steps": reached or max_steps,
        "reached": reached is not None,
        "metrics": metrics,
        "trace": trace,
        "seconds": seconds,
    }


def verdict(before: dict, m: dict, reached: bool) -> dict[str, bool]:
    """The bar: forget <= 0.1, retain and same-relation neighbours >= 90% of before,
    perplexity <= +10%."""
    return {
        "forgot": reached and m["forget_acc"] <= 0.1 + 1e-9,
        "kept_retain": m["retain_acc"] >= 0.9 * before["retain_acc"] - 1e-9,
        "kept_neighbours": m["neighbour_acc"] >= 0.9 * before["neighbour_acc"] - 1e-9,
        "fluent": m["ppl"] <= 1.1 * before["ppl"],
    }


# --------------------------------------------------------------------------- the report


def load_runs(run_dir: Path, relation: str | None = None) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(run_dir.glob("*-k*-s*-*.json")):
        rec = json.loads(path.read_text())
        if relation is None or rec["relation"] == relation:
            runs.setdefault(rec["variant"], []).append(rec)
    return runs


def held_out_acc(rec: dict) -> float:
    """Accuracy on every same-relation fact the run never trained on: the neighbours, plus
    the same-relation retain facts when the variant did not use them (no ``sameN``)."""
    n_nb, n_rs = len(rec["split"]["neighbour"]), len(rec["split"]["retain_same"])
    m = rec["metrics"]
    if "+same" in rec["variant"] or not n_rs:
        return m["neighbour_acc"]
    return (m["neighbour_acc"] * n_nb + m["retain_same_acc"] * n_rs) / (n_nb + n_rs)


def summarize(recs: list[dict]) -> dict:
    """Mean and worst seed of each measure (worst: highest forget accuracy and perplexity
    change, lowest retain and neighbour accuracy)."""

    def col(fn):
        return np.array([fn(r) for r in recs], dtype=float)

    ppl = col(lambda r: 100 * (r["metrics"]["ppl"] / r["before"]["ppl"] - 1))
    out = {
        "seeds": len(recs),
        "steps": col(lambda r: r["steps"]).mean(),
        "reached": int(sum(r["reached"] for r in recs)),
        "passed": int(sum(all(r["verdict"].values()) for r in recs)),
    }
    for key, worst in (
        ("forget_acc", max),
        ("retain_acc", min),
        ("neighbour_acc", min),
        ("retain_same_acc", min),
    ):
        v = col(lambda r, key=key: r["metrics"].get(key, float("nan")))
        out[key] = (float(v.mean()), float(worst(v)))
    out["ppl_change"] = (float(ppl.mean()), float(ppl.max()))
    out["held_out_acc"] = (float(col(held_out_acc).mean()), float(col(held_out_acc).min()))
    return out


def write_report(run_dir: Path, relation: str | None, order: list[str] | None) -> str:
    runs = load_runs(run_dir, relation)
    names = [n for n in (order or sorted(runs)) if n in runs]
    rows = {n: summarize(runs[n]) for n in names}
    lines = [
        (
            "| variant | seeds | steps | forget acc | retain acc | neighbour acc | "
            "same-rel. retain acc | all held-out same-rel. acc | ppl change % | "
            "meets the bar |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pair(v, fmt="{:.2f}"):
        return f"{fmt.format(v[0])} ({fmt.format(v[1])})" if v[0] == v[0] else "-"

    for n, s in rows.items():
        steps = f"{s['steps']:.1f}" + (
            "" if s["reached"] == s["seeds"] else f" ({s['seeds'] - s['reached']} not reached)"
        )
        lines.append(
            f"| {n} | {s['seeds']} | {steps} | {pair(s['forget_acc'])} | "
            f"{pair(s['retain_acc'])} | {pair(s['neighbour_acc'])} | "
            f"{pair(s['retain_same_acc'])} | {pair(s['held_out_acc'])} | "
            f"{pair(s['ppl_change'], '{:+.1f}')} | "
            f"{s['passed']}/{s['seeds']} |"
        )
    table = "\n".join(lines)
    tag = relation or "all"
    (run_dir / f"summary-{tag}.json").write_text(json.dumps(rows, indent=1))
    (run_dir / f"table-{tag}.md").write_text(table + "\n")
    _plot(rows, run_dir / f"specificity-{tag}.png", relation)
    return table


def _plot(rows: dict, path: Path, relation: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(names) + 1.5))
    y = np.arange(len(names))
    for off, key, label in (
        (-0.2, "neighbour_acc", "same-relation neighbours"),
        (0.2, "retain_acc", "retain (other relations)"),
    ):
        mean = [rows[n][key][0] for n in names]
        worst = [rows[n][key][1] for n in names]
        ax.barh(y + off, mean, height=0.38, label=f"{label}, mean")
        ax.plot(worst, y + off, "k|", markersize=9)
    ax.axvline(0.9, color="r", linestyle="--", linewidth=1, label="bar: 90% of before")
    # the bars alone would make a run that never forgot look ideal: name its forget accuracy
    labels = [
        f"{n}\nforget {rows[n]['forget_acc'][0]:.2f}, bar {rows[n]['passed']}/{rows[n]['seeds']}"
        for n in names
    ]
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("accuracy at the early stop (| = worst seed)")
    ax.set_title(f"SmolLM2-135M, forget 6 facts of one relation ({relation or 'all'})")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["ga", "mollm"])
    ap.add_argument("--relation", default="capital")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--neighbours", type=int, default=10)
    ap.add_argument("--retain", type=int, default=24)
    ap.add_argument("--template-subjects", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--model", default=None, help="model dir or .gguf (default: embedded)")
    ap.add_argument("--out", default="docs/specificity/runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", metavar="RUN_DIR", help="only write the table and plot")
    ap.add_argument("--order", nargs="*", help="variants of the report, in this order")
    args = ap.parse_args(argv)
    if args.report:
        print(write_report(Path(args.report), args.relation, args.order))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    from unlearnopt.models import load_model

    model, tok = load_model(args.model)
    neutral = load_neutral_texts()
    known_path = out / "known.json"
    facts = load_real_facts()
    if known_path.exists():
        ids = set(json.loads(known_path.read_text()))
        known = [f for f in facts if f.id in ids]
    else:
        known = known_facts(model, tok, facts)
        known_path.write_text(json.dumps([f.id for f in known]))
    log(f"the model knows {len(known)}/{len(facts)} facts")
    for seed in args.seeds:
        split = focused_split(known, args.relation, args.k, args.neighbours, args.retain, seed)
        tag = f"{args.relation}-k{args.k}-s{seed}"
        before_path = out / f"before-{tag}.json"
        excluded = {f.subject for f in split["forget"] + split["neighbour"]}
        subjects = []
        for f in split["retain"]:
            if f.subject and f.subject not in excluded and f.subject not in subjects:
                subjects.append(f.subject)
        templates = None
        for name in args.variants:
            path = out / f"{tag}-{name}.json"
            if path.exists():
                continue
            spec = parse_variant(name)
            if spec["tkl"] and templates is None:
                templates = template_facts(
                    model, tok, split["forget"], subjects[: args.template_subjects]
                )
            if not before_path.exists():
                before = measure(model, tok, split, neutral)
                before_path.write_text(
                    json.dumps(
                        {
                            "before": before,
                            "split": {k: [f.id for f in v] for k, v in split.items()},
                        },
                        indent=1,
                    )
                )
            before = json.loads(before_path.read_text())["before"]
            if spec["keyed"] is not None:
                rec = run_keyed(model, tok, split, neutral, spec, seed, args.max_steps, log)
            else:
                rec = run_variant(
                    model, tok, split, templates or [], neutral, spec, seed, args.max_steps, log
                )
            rec["before"] = before
            rec["verdict"] = verdict(before, rec["metrics"], rec["reached"])
            rec["relation"] = args.relation
            rec["split"] = {k: [f.id for f in v] for k, v in split.items()}
            if spec["tkl"]:
                rec["templates"] = [[f.prompt, f.answer] for f in templates]
            path.write_text(json.dumps(rec, indent=1))
            m = rec["metrics"]
            log(
                f"{tag} {name}: steps {rec['steps']}{'' if rec['reached'] else ' (not reached)'}"
                f" forget {m['forget_acc']:.2f} retain {m['retain_acc']:.2f} neighbour "
                f"{m['neighbour_acc']:.2f} same-rel retain "
                f"{m.get('retain_same_acc', float('nan')):.2f}"
                f" ppl {before['ppl']:.1f}->{m['ppl']:.1f} pass {all(rec['verdict'].values())}"
            )


if __name__ == "__main__":
    sys.exit(main())
