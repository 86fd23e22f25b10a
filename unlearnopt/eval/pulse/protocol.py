"""The PULSE protocol (arXiv 2507.01271): unlearning requests served one after another, each
method measured after every request on the same model, data split and seed.

Phases (``PulseConfig.phases``):

- ``"pretrained"``: probe the shipped real-world facts with greedy exact match, keep the ones the
  model knows, and split them (seeded) into *forget* (``forget_size`` facts spread over the
  relations), *neighbour* (other known facts of the forget facts' relations, never trained on)
  and *retain* (the remaining known facts, up to ``retain_size``, used by the methods' retain
  objectives). Never-seen samples for membership inference: facts about invented people.
- ``"finetuned"``: first fine-tune the model on facts about invented people
  (``finetune_entities`` of them; AdamW, lr ``finetune_lr``, batches of 16, until 95% of those
  facts are answered exactly or ``finetune_epochs`` epochs), then forget the facts of some of
  them; the other fine-tuned facts are the retain set, known real facts are the neighbours, and
  invented people that were never fine-tuned are the never-seen samples. The fine-tuned model
  is the reference ("original") of this phase.

``PulseConfig.focus`` chooses how requests are drawn: ``"spread"`` (above), or concentrated as
real deletion requests are: ``"relation"`` (each request forgets facts of one relation) or
``"subject"`` (each request forgets every fact of one subject, e.g. an invented person's four
facts); then the neighbours are held-out facts of the forgotten relations, in both phases (see
:func:`~unlearnopt.eval.pulse.splits.split_focused`). ``compare_one_shot`` also serves the
same forget facts as one request and reports both side by side.

Sustainability: the forget set is split into ``requests`` consecutive requests. Each method
starts from the same model and serves them one after another, at most ``steps`` optimizer
steps per request; after every request all metrics are measured again, on all forget facts
requested so far. Each request is served the way a deployment would serve a new deletion
request (both defaults measured on SmolLM2-135M, docs/real_model_results.md):

- ``fresh_optimizer`` (default True): a new optimizer (and method state) per request, on the
  model the previous request delivered. Kept across requests, AdamW's second moments from the
  first request's large forget gradients shrink later steps: mollm then forgot none of
  requests 3-5 within 8 steps.
- ``replay`` (default True): the earlier requests' facts that the model answers again
  (relapsed) join the request's forget batch, re-checked after every step, and the request
  is done when its own facts and all earlier ones are forgotten (the deletion list is known).
  Without it the retain objectives pulled earlier facts back (mollm: half of requests 1-3
  relapsed); replaying every earlier fact instead kept pushing facts already forgotten, which
  unbounded losses (OFMU's inner ascent) turn into lost fluency.

Matched forget efficacy: after every step the forget accuracy of the request's facts (with
``replay``, and of every earlier request's) is checked (greedy, a few tokens) and, the first
time it is ``<= forget_target``, every metric is measured (``at_target``); with
``stop_at_target`` (default) the request ends there, so every method is compared at the point
where it has forgotten, beside gradient ascent stopped the same way (the baseline). The
summary reports each method at that point of the last request and at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearnopt.data import Fact, load_fictitious_facts, load_neutral_texts, load_real_facts
from unlearnopt.eval.metrics import evaluate, score_answers
from unlearnopt.eval.pulse.config import PulseConfig, method_settings
from unlearnopt.eval.pulse.splits import (
    Split,
    entity_of,
    entity_shuffled,
    known_facts,
    split_finetuned,
    split_focused,
    split_pretrained,
)
from unlearnopt.training import UnlearningRun, check_vocabulary, fact_texts, finetune

# --------------------------------------------------------------------------- the protocol


def _metrics(model, tokenizer, split: Split, upto: int, neutral, div_prompts, cfg, desc):
    forget = [f for r in split.requests[:upto] for f in r] if upto else split.forget
    return evaluate(
        model,
        tokenizer,
        forget=forget,
        retain=split.retain,
        neighbour=split.neighbour,
        neutral=neutral,
        nonmember=split.nonmember,
        diversity_prompts=div_prompts,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.eval_batch_size,
        progress=cfg.progress,
        desc=desc,
    )


def run_method_sequence(
    model,
    ref_model,
    tokenizer,
    method: str,
    split: Split,
    cfg: PulseConfig,
    neutral: Sequence[str],
    div_prompts: Sequence[str],
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run ``method`` over the split's requests on ``model`` (modified in place); returns one
    record per measurement: ``{"request", "step", "request_step", "point" ("at_target"|"end"),
    "metrics", "train_seconds"}`` (``"end"`` also has ``"steps_to_target"`` and
    ``"last_stats"``, the last step's statistics); with ``stop_at_target`` the two points of a
    request that reached the target share one measurement."""
    options = method_settings(cfg, method)
    run = UnlearningRun(
        model,
        tokenizer,
        method,
        ref_model,
        split.retain,
        lr=float(options.pop("lr")),
        retain_batch_size=cfg.retain_batch_size,
        seed=cfg.seed,
        max_grad_norm=cfg.max_grad_norm,
        options=options,
        retain_same_relation=cfg.retain_same_relation,
    )
    records: list[dict[str, Any]] = []
    train_seconds = 0.0
    for r, chunk in enumerate(split.requests, start=1):
        if r > 1 and cfg.fresh_optimizer:
            run.restart()
        earlier = [f for req in split.requests[: r - 1] for f in req] if cfg.replay else []
        watched = list(chunk) + earlier  # what must be forgotten when the request ends

        def answered(watched=watched) -> np.ndarray:
            return np.asarray(
                score_answers(
                    model, tokenizer, [f.prompt for f in watched], [f.answer for f in watched]
                ).exact,
                dtype=bool,
            )

        def forget_batch(known: np.ndarray, chunk=chunk, earlier=earlier) -> list[Fact]:
            # earlier facts join only while answered again (relapsed): unbounded losses (GA,
            # OFMU's inner ascent) would otherwise keep pushing facts already forgotten
            return list(chunk) + [f for f, k in zip(earlier, known[len(chunk) :]) if k]

        batch = forget_batch(answered()) if earlier else list(chunk)
        reached_at = None
        replayed = 0
        stats: dict[str, float] = {}
        for s in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            stats = run.step(batch)
            train_seconds += time.perf_counter() - t0
            replayed = max(replayed, len(batch) - len(chunk))
            known = answered()
            if known.mean() <= cfg.forget_target:
                reached_at = s
                break
            batch = forget_batch(known)
        m = _metrics(model, tokenizer, split, r, neutral, div_prompts, cfg, f"{method} r{r}")
        base = {
            "request": r,
            "step": run.steps,
            "request_step": s,
            "metrics": m,
            "train_seconds": train_seconds,
        }
        if reached_at is not None:
            records.append({**base, "point": "at_target"})
        if reached_at is not None and not cfg.stop_at_target and reached_at < cfg.steps:
            # run on to the budget from the target; the "end" point is measured there
            for _ in range(reached_at + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                stats = run.step(batch)
                train_seconds += time.perf_counter() - t0
            m = _metrics(
                model, tokenizer, split, r, neutral, div_prompts, cfg, f"{method} r{r} end"
            )
            base = {
                **base,
                "step": run.steps,
                "request_step": cfg.steps,
                "metrics": m,
                "train_seconds": train_seconds,
            }
        records.append(
            {
                **base,
                "point": "end",
                "steps_to_target": reached_at,
                "replayed_facts": replayed,
                "last_stats": {
                    k: float(v) for k, v in stats.items() if isinstance(v, (int, float))
                },
            }
        )
        log(
            f"  {method} request {r}/{len(split.requests)}: steps to target "
            f"{reached_at if reached_at is not None else '-'}; forget acc "
            f"{m['forget_acc']:.2f}, retain acc {m['retain_acc']:.2f}, neighbour acc "
            f"{m['neighbour_acc']:.2f}, ppl {m['ppl']:.1f}"
        )
    return records


def summarize(before: dict[str, float], records: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Rows of the comparison table: "before", then per method "@target" (the last request's
    first step at the forget target; absent if never reached or if the request stopped there)
    and "@end"."""
    rows = [{"name": "before", "method": None, "point": "before", "steps": 0, **before}]
    for method, recs in records.items():
        last_r = max(rec["request"] for rec in recs)
        at = [rec for rec in recs if rec["request"] == last_r and rec["point"] == "at_target"]
        end = next(rec for rec in recs if rec["request"] == last_r and rec["point"] == "end")
        if at and at[0]["step"] != end["step"]:  # stopped at the target: one point
            rows.append(
                {
                    "name": f"{method}@target",
                    "method": method,
                    "point": "at_target",
                    "steps": at[0]["step"],
                    **at[0]["metrics"],
                }
            )
        rows.append(
            {
                "name": f"{method}@end",
                "method": method,
                "point": "end",
                "steps": end["step"],
                **end["metrics"],
            }
        )
    return rows


# The quality bar: forget accuracy at most MAX_FORGET_ACC, retain and neighbour accuracy at
# least KEEP_FRACTION of before, perplexity at most MAX_PPL_RATIO times before.
MAX_FORGET_ACC = 0.1
KEEP_FRACTION = 0.9
MAX_PPL_RATIO = 1.1
QUALITY_BAR_TEXT = (
    f"forget accuracy <= {MAX_FORGET_ACC:.2f}, retain and neighbour accuracy "
    f">= {KEEP_FRACTION:.0%} of before, perplexity <= before "
    f"+{MAX_PPL_RATIO - 1:.0%}"
)


def _bar_checks(before: dict[str, float], row: dict[str, float]):
    """``(key, passed, words)`` per criterion of the quality bar."""
    keep_r = KEEP_FRACTION * before["retain_acc"]
    keep_n = KEEP_FRACTION * before["neighbour_acc"]
    max_ppl = MAX_PPL_RATIO * before["ppl"]
    return [
        (
            "forgot",
            row["forget_acc"] <= MAX_FORGET_ACC + 1e-9,
            f"forget accuracy {row['forget_acc']:.2f} (needs <= {MAX_FORGET_ACC:.2f})",
        ),
        (
            "kept_retain",
            row["retain_acc"] >= keep_r - 1e-9,
            (
                f"retain accuracy {row['retain_acc']:.2f} (needs >= {keep_r:.2f}, "
                f"{KEEP_FRACTION:.0%} of {before['retain_acc']:.2f} before)"
            ),
        ),
        (
            "kept_neighbours",
            row["neighbour_acc"] >= keep_n - 1e-9,
            (
                f"neighbour accuracy {row['neighbour_acc']:.2f} (needs >= {keep_n:.2f}, "
                f"{KEEP_FRACTION:.0%} of {before['neighbour_acc']:.2f} before)"
            ),
        ),
        (
            "fluent",
            row["ppl"] <= max_ppl,
            (
                f"perplexity {row['ppl']:.1f} (needs <= {max_ppl:.1f}, before "
                f"{before['ppl']:.1f} +{MAX_PPL_RATIO - 1:.0%})"
            ),
        ),
    ]


def quality_verdict(before: dict[str, float], row: dict[str, float]) -> dict[str, bool]:
    """The quality bar (``QUALITY_BAR_TEXT``), one bool per criterion: ``forgot``,
    ``kept_retain``, ``kept_neighbours``, ``fluent``."""
    return {key: bool(ok) for key, ok, _ in _bar_checks(before, row)}


def describe_verdict(before: dict[str, float], row: dict[str, float]) -> str:
    """The verdict in words: "meets the quality bar", or what misses it and by how much."""
    missed = [words for _, ok, words in _bar_checks(before, row) if not ok]
    return "meets the quality bar" if not missed else "misses: " + "; ".join(missed)


def run_pulse(
    model,
    tokenizer,
    cfg: PulseConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    real_facts: Sequence[Fact] | None = None,
    fictitious: Sequence[Fact] | None = None,
    neutral: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run PULSE for every method of ``cfg`` on copies of ``model`` (left unchanged).

    Data defaults to the shipped files (``unlearnopt.data``); tests pass their own. Returns the
    report (also written to ``out_dir/report.json`` with plots, when ``out_dir`` is given)::

        {"config": ..., "phases": {phase: {"split": ids, "before": metrics,
          "methods": {method: [records]}, "summary": [rows], "verdicts": {...},
          "one_shot": {"methods": ..., "summary": ..., "verdicts": ...}}}}

    (``"one_shot"`` only with ``compare_one_shot`` and more than one request.)
    """
    cfg = cfg or PulseConfig()
    cfg.validate()
    torch.manual_seed(cfg.seed)
    real_facts = list(real_facts) if real_facts is not None else load_real_facts()
    fictitious = list(fictitious) if fictitious is not None else load_fictitious_facts()
    neutral = list(neutral) if neutral is not None else load_neutral_texts()
    div_prompts = [" ".join(s.split()[:5]) for s in neutral[: cfg.diversity_prompts]]
    for what, facts in (("the facts", real_facts), ("the fictitious facts", fictitious)):
        check_vocabulary(model, tokenizer, fact_texts(facts), what)
    check_vocabulary(model, tokenizer, neutral, "the neutral sentences")
    model.eval()
    report: dict[str, Any] = {"config": _jsonable(asdict(cfg)), "phases": {}}
    t_start = time.perf_counter()
    for phase in cfg.phases:
        log(f"PULSE phase '{phase}'")
        if phase == "pretrained":
            base = model
            known = known_facts(model, tokenizer, real_facts, cfg.eval_batch_size)
            log(f"  the model answers {len(known)}/{len(real_facts)} real facts exactly")
            nonmember = entity_shuffled(fictitious, cfg.seed)
            split = (
                split_pretrained(known, nonmember, cfg)
                if cfg.focus == "spread"
                else split_focused(known, nonmember, cfg)
            )
            extra = {"known_facts": len(known), "probed_facts": len(real_facts)}
        else:
            base, split, extra = finetuned_setup(model, tokenizer, real_facts, fictitious, cfg, log)
        tofu = (
            retain_model_metrics(model, base, tokenizer, fictitious, split, cfg, log)
            if phase == "finetuned" and cfg.retain_model
            else None
        )
        if tofu is not None:
            extra = {**extra, "tofu_before": tofu(base), "tofu_metric_doc": TOFU_DOC}
        log(
            f"  forget {len(split.forget)} facts in {len(split.requests)} requests, retain "
            f"{len(split.retain)}, neighbours {len(split.neighbour)}, never-seen "
            f"{len(split.nonmember)}"
        )
        before = _metrics(base, tokenizer, split, 0, neutral, div_prompts, cfg, "before")
        log(
            f"  before: forget acc {before['forget_acc']:.2f}, retain acc "
            f"{before['retain_acc']:.2f}, neighbour acc {before['neighbour_acc']:.2f}, "
            f"ppl {before['ppl']:.1f}"
        )
        records = _run_methods(base, tokenizer, split, cfg, neutral, div_prompts, log, tofu)
        summary = summarize(before, records)
        verdicts = {row["name"]: quality_verdict(before, row) for row in summary[1:]}
        report["phases"][phase] = {
            "split": split.ids(),
            "before": before,
            "methods": records,
            "settings": {m: method_settings(cfg, m) for m in cfg.methods},
            "summary": summary,
            "verdicts": verdicts,
            **extra,
        }
        if cfg.compare_one_shot and len(split.requests) > 1:
            log(f"  the same {len(split.forget)} facts as one request")
            one_cfg = dataclasses.replace(
                cfg, requests=1, steps=cfg.steps * len(split.requests), compare_one_shot=False
            )
            one = Split(
                split.forget, split.retain, split.neighbour, split.nonmember, [list(split.forget)]
            )
            one_records = _run_methods(base, tokenizer, one, one_cfg, neutral, div_prompts, log)
            rows = one_shot_rows(before, records, one_records, len(split.requests))
            report["phases"][phase]["one_shot"] = {
                "methods": one_records,
                "summary": rows,
                "verdicts": {row["name"]: quality_verdict(before, row) for row in rows[1:]},
            }
        if base is not model:
            del base
    report["seconds"] = time.perf_counter() - t_start
    report = _jsonable(report)
    if out_dir is not None:
        from unlearnopt.eval.report import write_report

        write_report(report, out_dir)
    return report


def _run_methods(
    base,
    tokenizer,
    split: Split,
    cfg: PulseConfig,
    neutral,
    div_prompts,
    log,
    tofu: Callable[[Any], dict[str, float]] | None = None,
) -> dict[str, list[dict]]:
    """Every method of ``cfg`` over ``split``'s requests, each on its own copy of ``base``;
    with ``tofu``, the last record of each method gets ``"tofu": tofu(unlearned model)``."""
    records: dict[str, list[dict]] = {}
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    for method in cfg.methods:
        torch.manual_seed(cfg.seed)
        work = copy.deepcopy(base)
        work.requires_grad_(True)
        records[method] = run_method_sequence(
            work, ref, tokenizer, method, split, cfg, neutral, div_prompts, log
        )
        if tofu is not None:
            records[method][-1]["tofu"] = tofu(work)
            log(
                f"  {method}: "
                + ", ".join(f"{k} {v:.3g}" for k, v in records[method][-1]["tofu"].items())
            )
        del work
    del ref
    return records


def one_shot_rows(
    before: dict[str, float],
    sequential: dict[str, list[dict]],
    one_shot: dict[str, list[dict]],
    requests: int,
) -> list[dict[str, Any]]:
    """Rows of the one-shot vs split table: "before", then per method the end of the
    sequential run (``"<method> x<requests>"``) and of the one-request run (``"<method> x1"``),
    both measured on all the forget facts."""
    rows = [{"name": "before", "method": None, "point": "before", "steps": 0, **before}]
    for method, seq in sequential.items():
        for label, recs in ((f"x{requests}", seq), ("x1", one_shot[method])):
            end = [r for r in recs if r["point"] == "end"][-1]
            rows.append(
                {
                    "name": f"{method} {label}",
                    "method": method,
                    "point": "end",
                    "requests": max(r["request"] for r in recs),
                    "steps": end["step"],
                    "reached_target": all(
                        r["steps_to_target"] is not None for r in recs if r["point"] == "end"
                    ),
                    **end["metrics"],
                }
            )
    return rows


TOFU_DOC = {
    "forget_quality": "KS-test p-value, forget-set truth ratios vs the retain model (higher = "
    "closer to never having learned them)",
    "model_utility": "harmonic mean of answer probability, ROUGE-L recall and truth-ratio "
    "score on the retain and neighbour facts",
    "privleak": "(MIA AUC - retain model's MIA AUC) / retain model's (0 = ideal)",
    "extraction_strength": "1 - shortest answer prefix that lets greedy decoding finish the "
    "answer / answer length, mean over forget facts (lower = better)",
    "exact_memorization": "fraction of forget answer tokens predicted greedily under teacher "
    "forcing (lower = better)",
}


def _tuned_facts(fictitious: Sequence[Fact], cfg: PulseConfig) -> list[Fact]:
    """The facts of the first ``cfg.finetune_entities`` invented people (seeded order)."""
    facts = entity_shuffled(fictitious, cfg.seed)
    entities = list(dict.fromkeys(entity_of(f) for f in facts))
    tuned_names = set(entities[: cfg.finetune_entities])
    return [f for f in facts if entity_of(f) in tuned_names]


def retain_model_metrics(
    model,
    base,
    tokenizer,
    fictitious: Sequence[Fact],
    split: Split,
    cfg: PulseConfig,
    log: Callable[[str], None],
) -> Callable[[Any], dict[str, float]]:
    """Fine-tune a retain model (a copy of the original ``model``, same recipe as ``base``,
    without the forget facts) and return ``tofu(model) -> metrics`` against it."""
    from unlearnopt.eval.tofu_metrics import retain_reference, tofu_metrics

    forget_ids = {f.id for f in split.forget}
    kept = [f for f in _tuned_facts(fictitious, cfg) if f.id not in forget_ids]
    retain_model = copy.deepcopy(model)
    retain_model.requires_grad_(True)
    ft = finetune(
        retain_model,
        tokenizer,
        kept,
        lr=cfg.finetune_lr,
        epochs=cfg.finetune_epochs,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    retain_model.eval()
    log(
        f"  retain model: fine-tuned on {len(kept)} facts (the forget facts left out), "
        f"accuracy {ft['finetune_acc']:.2f}"
    )
    pool = [*split.forget, *split.retain, *split.neighbour, *split.nonmember]
    reference = retain_reference(
        retain_model, tokenizer, split.forget, split.nonmember, pool, batch_size=cfg.eval_batch_size
    )
    del retain_model

    def tofu(unlearned) -> dict[str, float]:
        return tofu_metrics(
            unlearned,
            tokenizer,
            reference,
            forget=split.forget,
            retain=split.retain,
            neighbour=split.neighbour,
            nonmember=split.nonmember,
            pool=pool,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
        )

    return tofu


def finetuned_setup(
    model,
    tokenizer,
    real_facts: Sequence[Fact],
    fictitious: Sequence[Fact],
    cfg: PulseConfig,
    log: Callable[[str], None],
):
    """Fine-tune a copy of ``model`` on the first ``cfg.finetune_entities`` invented people
    (seeded order) and split what it learned; returns ``(fine-tuned model, split, info)``."""
    facts = entity_shuffled(fictitious, cfg.seed)
    entities = list(dict.fromkeys(entity_of(f) for f in facts))
    tuned_names = set(entities[: cfg.finetune_entities])
    tuned = [f for f in facts if entity_of(f) in tuned_names]
    unseen = [f for f in facts if entity_of(f) not in tuned_names]
    known_real = known_facts(model, tokenizer, real_facts, cfg.eval_batch_size)
    base = copy.deepcopy(model)
    base.requires_grad_(True)
    t0 = time.perf_counter()
    ft = finetune(
        base,
        tokenizer,
        tuned,
        lr=cfg.finetune_lr,
        epochs=cfg.finetune_epochs,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    ft["finetune_seconds"] = time.perf_counter() - t0
    log(
        f"  fine-tuned on {len(tuned)} facts about {len(tuned_names)} invented people: "
        f"{ft['finetune_steps']} steps, accuracy {ft['finetune_acc']:.2f}"
    )
    learned = known_facts(base, tokenizer, tuned, cfg.eval_batch_size)
    split = (
        split_finetuned(learned, known_real, unseen, cfg)
        if cfg.focus == "spread"
        else split_focused(learned, unseen, cfg)
    )
    base.eval()
    return base, split, ft


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def dump_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1))


__all__ = [
    "QUALITY_BAR_TEXT",
    "describe_verdict",
    "dump_json",
    "finetuned_setup",
    "one_shot_rows",
    "quality_verdict",
    "run_method_sequence",
    "run_pulse",
    "summarize",
]
