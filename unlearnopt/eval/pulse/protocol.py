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

This module runs the requests (``run_method_sequence``) and the phases (``run_pulse``); the
fine-tuned phase's setup and TOFU metrics are in :mod:`.finetuned`, the report's tables and
quality verdicts in :mod:`.summary` (their names are importable from here too).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearnopt import editing
from unlearnopt.data import Fact, load_fictitious_facts, load_neutral_texts, load_real_facts
from unlearnopt.eval.metrics import evaluate, score_answers
from unlearnopt.eval.pulse.config import EDIT_METHODS, PulseConfig, method_settings
from unlearnopt.eval.pulse.finetuned import TOFU_DOC, finetuned_setup, retain_model_metrics
from unlearnopt.eval.pulse.splits import (
    Split,
    entity_shuffled,
    known_facts,
    split_focused,
    split_pretrained,
)
from unlearnopt.eval.pulse.summary import (
    QUALITY_BAR_TEXT,
    describe_verdict,
    dump_json,
    jsonable,
    one_shot_rows,
    quality_verdict,
    summarize,
)
from unlearnopt.training import UnlearningRun, check_vocabulary, fact_texts

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
    key_texts: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Run ``method`` over the split's requests on ``model`` (modified in place); returns one
    record per measurement: ``{"request", "step", "request_step", "point" ("at_target"|"end"),
    "metrics", "train_seconds"}`` (``"end"`` also has ``"steps_to_target"`` and
    ``"last_stats"``, the last step's statistics); with ``stop_at_target`` the two points of a
    request that reached the target share one measurement.

    ``method`` is a gradient method (an optimizer step each) or one of :data:`EDIT_METHODS`
    (``"keyed"``: a step is one round of :class:`~unlearnopt.editing.KeyedEditRun`, whose key
    statistics come from ``key_texts``, by default :func:`key_texts_for` the split)."""
    options = method_settings(cfg, method)
    lr = float(options.pop("lr"))
    if method in EDIT_METHODS:  # an edit has no optimizer: lr is not used
        texts = key_texts or key_texts_for(split, ())
        run = editing.KeyedEditRun(model, tokenizer, texts, protect=split.retain, **options)
    else:
        run = UnlearningRun(
            model,
            tokenizer,
            method,
            ref_model,
            split.retain,
            lr=lr,
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


def key_texts_for(split: Split, fictitious: Sequence[Fact]) -> list[str]:
    """Generic prompts for a keyed edit's key statistics: the prompts and paraphrases of the
    retain facts and of ``fictitious`` facts, never of a forget or neighbour fact (a prompt
    in the statistics is protected by the edit, so a neighbour there would flatter it)."""
    return editing.key_texts(
        [*split.retain, *fictitious], exclude=[*split.forget, *split.neighbour]
    )


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
    report: dict[str, Any] = {"config": jsonable(asdict(cfg)), "phases": {}}
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
        key_texts = key_texts_for(split, fictitious) if set(cfg.methods) & set(EDIT_METHODS) else ()
        records = _run_methods(
            base, tokenizer, split, cfg, neutral, div_prompts, log, tofu, key_texts
        )
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
            one_records = _run_methods(
                base, tokenizer, one, one_cfg, neutral, div_prompts, log, key_texts=key_texts
            )
            rows = one_shot_rows(before, records, one_records, len(split.requests))
            report["phases"][phase]["one_shot"] = {
                "methods": one_records,
                "summary": rows,
                "verdicts": {row["name"]: quality_verdict(before, row) for row in rows[1:]},
            }
        if base is not model:
            del base
    report["seconds"] = time.perf_counter() - t_start
    report = jsonable(report)
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
    key_texts: Sequence[str] = (),
) -> dict[str, list[dict]]:
    """Every method of ``cfg`` over ``split``'s requests, each on its own copy of ``base``;
    with ``tofu``, the last record of each method gets ``"tofu": tofu(unlearned model)``;
    ``key_texts``: the key statistics' texts of the edit methods."""
    records: dict[str, list[dict]] = {}
    ref = copy.deepcopy(base).eval().requires_grad_(False)
    for method in cfg.methods:
        torch.manual_seed(cfg.seed)
        work = copy.deepcopy(base)
        work.requires_grad_(True)
        records[method] = run_method_sequence(
            work, ref, tokenizer, method, split, cfg, neutral, div_prompts, log, key_texts
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


__all__ = [
    "QUALITY_BAR_TEXT",
    "describe_verdict",
    "dump_json",
    "finetuned_setup",
    "key_texts_for",
    "one_shot_rows",
    "quality_verdict",
    "run_method_sequence",
    "run_pulse",
    "summarize",
]
