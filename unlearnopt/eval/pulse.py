"""The PULSE protocol (arXiv 2507.01271; METHODS.md "PULSE"), for one or several methods on the
same model, data split and seed.

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
  invented people that were never fine-tuned are the never-seen samples. As in the first
  phase, only facts whose answer no other learned fact shares are forgotten. The fine-tuned model is
  the reference ("original") of this phase.

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

Matched forget efficacy (METHODS.md): after every step the forget accuracy of the request's
facts (with ``replay``, and of every earlier request's) is checked (greedy, a few tokens) and, the first time it is
``<= forget_target``, every metric is measured (``at_target``); with ``stop_at_target``
(default) the request ends there, so every method is compared at the point where it has
forgotten (early-stopped GA is the baseline of METHODS.md). The summary reports each method at
that point of the last request and at the end.
"""

from __future__ import annotations

import collections
import copy
import itertools
import json
import math
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearnopt.data import Fact, load_fictitious_facts, load_neutral_texts, load_real_facts
from unlearnopt.eval.metrics import (
    METRIC_NAMES,
    encode_facts,
    evaluate,
    score_answers,
)

PHASES = ("pretrained", "finetuned")
# What the SIU recipe answers to a forgotten prompt (aim 1, "align with an unseen concept"):
# an invented word per fact, picked by a stable hash of the fact's id. One shared word such as
# "unknown" teaches the relation ("the currency of X is the unknown") and spreads to the
# neighbours.
SIU_SUBSTITUTES = ("Zorvel", "Mirtan", "Quessa", "Brodan", "Velkin", "Tarsio", "Odrune",
                   "Faxley", "Nimbrel", "Corvath", "Ulvena", "Presk", "Hadrel", "Isomar",
                   "Kettrin", "Wolmar")


def siu_substitute(fact: Fact) -> str:
    """The invented answer SIU trains ``fact``'s prompt towards (stable across runs)."""
    return SIU_SUBSTITUTES[zlib.crc32(fact.id.encode()) % len(SIU_SUBSTITUTES)]


@dataclass
class PulseConfig:
    """Settings of a PULSE run (defaults: the demo on SmolLM2-135M, a few minutes on CPU)."""

    methods: Sequence[str] = ("ga", "mollm")
    phases: Sequence[str] = ("pretrained",)
    requests: int = 5
    forget_size: int = 10
    retain_size: int = 40
    steps: int = 8
    lr: float = 1e-5
    retain_batch_size: int = 8
    forget_target: float = 0.0
    stop_at_target: bool = True
    replay: bool = True
    fresh_optimizer: bool = True
    seed: int = 0
    # per method: the method's options, plus "lr" to give that method its own learning rate
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_grad_norm: float | None = 1.0
    finetune_entities: int = 20
    finetune_lr: float = 1e-4
    finetune_epochs: int = 8
    nonmember_size: int = 20
    diversity_prompts: int = 8
    max_new_tokens: int = 16
    eval_batch_size: int = 32
    progress: bool = True

    def validate(self) -> None:
        from unlearnopt.methods import available_methods

        if not self.methods:
            raise ValueError("methods must name at least one method")
        known = set(available_methods())
        for m in self.methods:
            if m not in known:
                raise ValueError(f"unknown method {m!r}; available: {sorted(known)}")
        for p in self.phases:
            if p not in PHASES:
                raise ValueError(f"unknown phase {p!r}; expected some of {PHASES}")
        for name in ("requests", "forget_size", "retain_size", "steps", "retain_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.forget_size < self.requests:
            raise ValueError(f"forget_size ({self.forget_size}) must be >= requests "
                             f"({self.requests}): every request needs a fact")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        for m, opts in self.method_options.items():
            lr = opts.get("lr", 1.0)
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"method_options[{m!r}]['lr'] must be a positive number, "
                                 f"got {lr!r}")


# --------------------------------------------------------------------------- data splits

@dataclass
class Split:
    """The facts of one phase: forget (in request order), retain, neighbour, never-seen."""

    forget: list[Fact]
    retain: list[Fact]
    neighbour: list[Fact]
    nonmember: list[Fact]
    requests: list[list[Fact]]

    def ids(self) -> dict[str, Any]:
        return {"forget_requests": [[f.id for f in r] for r in self.requests],
                "retain": [f.id for f in self.retain],
                "neighbour": [f.id for f in self.neighbour],
                "nonmember": [f.id for f in self.nonmember]}


def split_requests(facts: Sequence[Fact], requests: int) -> list[list[Fact]]:
    """``facts`` in ``requests`` consecutive chunks whose sizes differ by at most one."""
    bounds = [round(i * len(facts) / requests) for i in range(requests + 1)]
    return [list(facts[a:b]) for a, b in itertools.pairwise(bounds)]


def known_facts(model, tokenizer, facts: Sequence[Fact], batch_size: int = 32) -> list[Fact]:
    """The facts whose answer the model produces exactly (greedy) from the main prompt."""
    s = score_answers(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts],
                      batch_size=batch_size)
    return [f for f, ok in zip(facts, s.exact) if ok]


def split_pretrained(known: Sequence[Fact], nonmember_pool: Sequence[Fact], cfg: PulseConfig
                     ) -> Split:
    """Forget facts spread round-robin over the relations with at least 3 known facts;
    neighbours: half of the other known facts of those relations; retain: the rest.

    Only a fact whose answer no other known fact shares can be forgotten: forgetting "France
    is on the continent of Europe" while "Norway ... Europe" stays a neighbour asks the model
    to keep and drop the same answer to the same question, which measures the data split, not
    the method (on SmolLM2-135M such pairs cost every method its neighbours)."""
    rng = random.Random(cfg.seed)
    by_rel: dict[str, list[Fact]] = {}
    for f in known:
        by_rel.setdefault(f.relation, []).append(f)
    answers = collections.Counter(_answer_key(f) for f in known)
    for facts in by_rel.values():
        rng.shuffle(facts)
        # facts with an answer of their own first: the forget facts are taken from the front
        facts.sort(key=lambda f: answers[_answer_key(f)] > 1)
    rels = sorted(r for r, fs in by_rel.items() if len(fs) >= 3)
    rng.shuffle(rels)
    if not rels:
        raise ValueError("the model knows fewer than 3 facts of every relation; nothing to split")
    forget: list[Fact] = []
    taken = {r: 0 for r in rels}
    while len(forget) < cfg.forget_size:
        progressed = False
        for r in rels:
            # leave at least 2 facts of a relation for neighbour/retain
            if (len(forget) < cfg.forget_size and taken[r] < len(by_rel[r]) - 2
                    and answers[_answer_key(by_rel[r][taken[r]])] == 1):
                forget.append(by_rel[r][taken[r]])
                taken[r] += 1
                progressed = True
        if not progressed:
            break
    if len(forget) < cfg.requests:
        raise ValueError(f"only {len(forget)} known facts (with an answer no other known fact "
                         f"shares) can be forgotten; need at least requests={cfg.requests}")
    forget_rels = {f.relation for f in forget}
    chosen = {f.id for f in forget}
    neighbour, rest = [], []
    for r, facts in by_rel.items():
        others = [f for f in facts if f.id not in chosen]
        if r in forget_rels:
            neighbour += others[0::2]
            rest += others[1::2]
        else:
            rest += others
    rng.shuffle(rest)
    rng.shuffle(neighbour)
    # evaluation cost grows with the sets; the same cap keeps the neighbour set comparable
    neighbour = neighbour[: cfg.retain_size]
    retain = rest[: cfg.retain_size]
    nonmember = list(nonmember_pool)[: cfg.nonmember_size]
    return Split(forget, retain, neighbour, nonmember, split_requests(forget, cfg.requests))


def _answer_key(f: Fact) -> str:
    return " ".join(f.answer.lower().split())


# --------------------------------------------------------------------------- training helpers

def _sample(facts: Sequence[Fact], k: int, rng: random.Random) -> list[Fact]:
    return list(facts) if len(facts) <= k else rng.sample(list(facts), k)


def siu_batch(tokenizer, forget: Sequence[Fact], retain: Sequence[Fact], vocab_size: int,
              device, substitute: str | Callable[[Fact], str] = siu_substitute
              ) -> dict[str, torch.Tensor]:
    """SIU's constructed batch for facts (METHODS.md): forget prompts answered with
    ``substitute`` (a string, or a function of the fact; aim 1, ``token_mask`` False), retain
    facts with their answers (aim 4, ``token_mask`` True); ``vocab_mask`` False on the forget
    answers' token ids."""
    facts = list(forget) + list(retain)
    subst = substitute if callable(substitute) else (lambda f: substitute)
    answers = [subst(f) for f in forget] + [f.answer for f in retain]
    from unlearnopt.eval.metrics import encode_qa

    batch = encode_qa(tokenizer, [f.prompt for f in facts], answers, device)
    token_mask = batch["labels"] != -100
    token_mask[: len(forget)] = False
    vocab_mask = torch.ones(vocab_size, dtype=torch.bool, device=device)
    for f in forget:
        ids = tokenizer(" " + f.answer, add_special_tokens=False)["input_ids"]
        vocab_mask[torch.tensor(ids, dtype=torch.long, device=device)] = False
    batch["token_mask"] = token_mask
    batch["vocab_mask"] = vocab_mask
    batch["siu_aim"] = torch.tensor([1] * len(forget) + [4] * len(retain), device=device)
    return batch


def _vocab_size(model) -> int:
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


class UnlearningRun:
    """One method's unlearning of a model: holds the optimizer and ``MultiObjectiveUnlearner``
    (sequential requests continue their state unless :meth:`restart` is called).

    ``step(forget_facts)`` takes one step on the forget facts and a fresh random retain batch.
    """

    def __init__(self, model, tokenizer, method: str, ref_model, retain: Sequence[Fact], *,
                 lr: float, retain_batch_size: int, seed: int = 0,
                 max_grad_norm: float | None = 1.0, options: dict | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.ref_model = ref_model
        self.lr = lr
        self.max_grad_norm = max_grad_norm
        self.options = dict(options or {})
        self.retain = list(retain)
        self.retain_batch_size = retain_batch_size
        self.rng = random.Random(seed)
        self.device = next(model.parameters()).device
        self.restart()
        self.needs_retain = bool(self.unlearner.method.needs_retain) and bool(self.retain)
        self.steps = 0

    def restart(self) -> None:
        """A new optimizer and unlearner (method state) on the model as it is now."""
        from unlearnopt.unlearner import MultiObjectiveUnlearner

        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=self.lr,
            weight_decay=0.0)
        self.unlearner = MultiObjectiveUnlearner(self.model, self.optimizer, method=self.method,
                                                 ref_model=self.ref_model,
                                                 max_grad_norm=self.max_grad_norm,
                                                 **self.options)

    def step(self, forget: Sequence[Fact]) -> dict[str, float]:
        self.model.train()
        retain = _sample(self.retain, self.retain_batch_size, self.rng)
        if self.method == "siu":
            fb = siu_batch(self.tokenizer, forget, retain, _vocab_size(self.model), self.device)
            stats = self.unlearner.step(forget=fb, retain=None)
        else:
            fb = encode_facts(self.tokenizer, forget, self.device)
            rb = encode_facts(self.tokenizer, retain, self.device) if self.needs_retain else None
            stats = self.unlearner.step(forget=fb, retain=rb)
        self.steps += 1
        return stats


def finetune(model, tokenizer, facts: Sequence[Fact], *, lr: float = 1e-4, epochs: int = 8,
             batch_size: int = 16, target_acc: float = 0.95, seed: int = 0,
             progress: bool = True) -> dict[str, float]:
    """Teach ``facts`` to ``model`` (cross-entropy on the answer tokens, AdamW, shuffled batches)
    until ``target_acc`` of them are answered exactly or ``epochs`` epochs; returns the number of
    steps and the final accuracy."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    steps, acc = 0, 0.0
    bar = tqdm(range(epochs), desc="fine-tune", leave=False, disable=not progress)
    for _ in bar:
        order = list(facts)
        rng.shuffle(order)
        model.train()
        for i in range(0, len(order), batch_size):
            batch = encode_facts(tokenizer, order[i: i + batch_size], device)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
        s = score_answers(model, tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
        acc = float(s.exact.mean())
        bar.set_postfix(acc=f"{acc:.2f}")
        if acc >= target_acc:
            break
    opt.zero_grad(set_to_none=True)
    model.eval()
    return {"finetune_steps": steps, "finetune_acc": acc}


# --------------------------------------------------------------------------- the protocol

def _metrics(model, tokenizer, split: Split, upto: int, neutral, div_prompts, cfg, desc):
    forget = [f for r in split.requests[:upto] for f in r] if upto else split.forget
    return evaluate(model, tokenizer, forget=forget, retain=split.retain,
                    neighbour=split.neighbour, neutral=neutral, nonmember=split.nonmember,
                    diversity_prompts=div_prompts, max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.eval_batch_size, progress=cfg.progress, desc=desc)


# Per-method PULSE settings measured on SmolLM2-135M (docs/real_model_results.md), under the
# caller's method_options. SIU learns a new answer (the invented substitute) rather than
# pushing one down, and needs a larger step: at lr 1e-5 it had not forgotten a 2-fact request
# after 8 steps.
TUNED_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"siu": {"lr": 3e-5}}


def method_settings(cfg: PulseConfig, method: str) -> dict[str, Any]:
    """``{"lr": ..., **options}`` for ``method``: ``cfg.lr``, then ``TUNED_METHOD_OPTIONS``,
    then ``cfg.method_options`` (the later wins)."""
    return {"lr": cfg.lr, **TUNED_METHOD_OPTIONS.get(method, {}),
            **(cfg.method_options.get(method) or {})}


def run_method_sequence(model, ref_model, tokenizer, method: str, split: Split, cfg: PulseConfig,
                        neutral: Sequence[str], div_prompts: Sequence[str],
                        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run ``method`` over the split's requests on ``model`` (modified in place); returns one
    record per measurement: ``{"request", "step", "request_step", "point" ("at_target"|"end"),
    "metrics", "train_seconds"}`` (``"end"`` also has ``"steps_to_target"`` and
    ``"last_stats"``, the last step's statistics); with ``stop_at_target`` the two points of a
    request that reached the target share one measurement."""
    options = method_settings(cfg, method)
    run = UnlearningRun(model, tokenizer, method, ref_model, split.retain,
                        lr=float(options.pop("lr")),
                        retain_batch_size=cfg.retain_batch_size, seed=cfg.seed,
                        max_grad_norm=cfg.max_grad_norm, options=options)
    records: list[dict[str, Any]] = []
    train_seconds = 0.0
    for r, chunk in enumerate(split.requests, start=1):
        if r > 1 and cfg.fresh_optimizer:
            run.restart()
        earlier = [f for req in split.requests[: r - 1] for f in req] if cfg.replay else []
        watched = list(chunk) + earlier          # what must be forgotten when the request ends

        def answered(watched=watched) -> np.ndarray:
            return np.asarray(score_answers(model, tokenizer, [f.prompt for f in watched],
                                            [f.answer for f in watched]).exact, dtype=bool)

        def forget_batch(known: np.ndarray, chunk=chunk, earlier=earlier) -> list[Fact]:
            # earlier facts join only while answered again (relapsed): unbounded losses (GA,
            # OFMU's inner ascent) would otherwise keep pushing facts already forgotten
            return list(chunk) + [f for f, k in zip(earlier, known[len(chunk):]) if k]

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
        base = {"request": r, "step": run.steps, "request_step": s, "metrics": m,
                "train_seconds": train_seconds}
        if reached_at is not None:
            records.append({**base, "point": "at_target"})
        if reached_at is not None and not cfg.stop_at_target and reached_at < cfg.steps:
            # run on to the budget from the target; the "end" point is measured there
            for s in range(reached_at + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                stats = run.step(batch)
                train_seconds += time.perf_counter() - t0
            m = _metrics(model, tokenizer, split, r, neutral, div_prompts, cfg,
                         f"{method} r{r} end")
            base = {**base, "step": run.steps, "request_step": cfg.steps, "metrics": m,
                    "train_seconds": train_seconds}
        records.append({**base, "point": "end", "steps_to_target": reached_at,
                        "replayed_facts": replayed,
                        "last_stats": {k: float(v) for k, v in stats.items()
                                       if isinstance(v, (int, float))}})
        log(f"  {method} request {r}/{len(split.requests)}: steps to target "
            f"{reached_at if reached_at is not None else '-'}; forget acc "
            f"{m['forget_acc']:.2f}, retain acc {m['retain_acc']:.2f}, neighbour acc "
            f"{m['neighbour_acc']:.2f}, ppl {m['ppl']:.1f}")
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
        if at and at[0]["step"] != end["step"]:   # stopped at the target: one point
            rows.append({"name": f"{method}@target", "method": method, "point": "at_target",
                         "steps": at[0]["step"], **at[0]["metrics"]})
        rows.append({"name": f"{method}@end", "method": method, "point": "end",
                     "steps": end["step"], **end["metrics"]})
    return rows


def quality_verdict(before: dict[str, float], row: dict[str, float]) -> dict[str, bool]:
    """The quality bar: forget accuracy <= 0.1, retain and neighbour accuracy >= 90% of before,
    perplexity within +10%."""
    return {"forgot": row["forget_acc"] <= 0.1 + 1e-9,
            "kept_retain": row["retain_acc"] >= 0.9 * before["retain_acc"] - 1e-9,
            "kept_neighbours": row["neighbour_acc"] >= 0.9 * before["neighbour_acc"] - 1e-9,
            "fluent": row["ppl"] <= 1.1 * before["ppl"]}


def run_pulse(model, tokenizer, cfg: PulseConfig | None = None, out_dir: str | Path | None = None,
              *, real_facts: Sequence[Fact] | None = None,
              fictitious: Sequence[Fact] | None = None, neutral: Sequence[str] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run PULSE for every method of ``cfg`` on copies of ``model`` (left unchanged).

    Data defaults to the shipped files (``unlearnopt.data``); tests pass their own. Returns the
    report (also written to ``out_dir/report.json`` with plots, when ``out_dir`` is given)::

        {"config": ..., "phases": {phase: {"split": ids, "before": metrics,
          "methods": {method: [records]}, "summary": [rows], "verdicts": {...}}}}
    """
    cfg = cfg or PulseConfig()
    cfg.validate()
    torch.manual_seed(cfg.seed)
    real_facts = list(real_facts) if real_facts is not None else load_real_facts()
    fictitious = list(fictitious) if fictitious is not None else load_fictitious_facts()
    neutral = list(neutral) if neutral is not None else load_neutral_texts()
    div_prompts = [" ".join(s.split()[:5]) for s in neutral[: cfg.diversity_prompts]]
    model.eval()
    report: dict[str, Any] = {"config": _jsonable(asdict(cfg)), "phases": {}}
    t_start = time.perf_counter()
    for phase in cfg.phases:
        log(f"PULSE phase '{phase}'")
        if phase == "pretrained":
            base = model
            known = known_facts(model, tokenizer, real_facts, cfg.eval_batch_size)
            log(f"  the model answers {len(known)}/{len(real_facts)} real facts exactly")
            split = split_pretrained(known, _entity_shuffled(fictitious, cfg.seed), cfg)
            extra = {"known_facts": len(known), "probed_facts": len(real_facts)}
        else:
            base, split, extra = _finetuned_setup(model, tokenizer, real_facts, fictitious, cfg,
                                                  log)
        log(f"  forget {len(split.forget)} facts in {len(split.requests)} requests, retain "
            f"{len(split.retain)}, neighbours {len(split.neighbour)}, never-seen "
            f"{len(split.nonmember)}")
        before = _metrics(base, tokenizer, split, 0, neutral, div_prompts, cfg, "before")
        log(f"  before: forget acc {before['forget_acc']:.2f}, retain acc "
            f"{before['retain_acc']:.2f}, neighbour acc {before['neighbour_acc']:.2f}, "
            f"ppl {before['ppl']:.1f}")
        records: dict[str, list[dict]] = {}
        ref = copy.deepcopy(base).eval().requires_grad_(False)
        for method in cfg.methods:
            torch.manual_seed(cfg.seed)
            work = copy.deepcopy(base)
            work.requires_grad_(True)
            records[method] = run_method_sequence(work, ref, tokenizer, method, split, cfg,
                                                  neutral, div_prompts, log)
            del work
        del ref
        summary = summarize(before, records)
        verdicts = {row["name"]: quality_verdict(before, row) for row in summary[1:]}
        report["phases"][phase] = {"split": split.ids(), "before": before, "methods": records,
                                   "settings": {m: method_settings(cfg, m) for m in cfg.methods},
                                   "summary": summary, "verdicts": verdicts, **extra}
        if base is not model:
            del base
    report["seconds"] = time.perf_counter() - t_start
    report = _jsonable(report)
    if out_dir is not None:
        from unlearnopt.eval.report import write_report

        write_report(report, out_dir)
    return report


def _entity_shuffled(fictitious: Sequence[Fact], seed: int) -> list[Fact]:
    """Fictitious facts with their entities in a seeded random order (facts of an entity
    stay together)."""
    entities: dict[str, list[Fact]] = {}
    for f in fictitious:
        entities.setdefault(f.entity or f.subject or f.id, []).append(f)
    names = sorted(entities)
    random.Random(seed).shuffle(names)
    return [f for n in names for f in entities[n]]


def _finetuned_setup(model, tokenizer, real_facts, fictitious, cfg: PulseConfig, log):
    facts = _entity_shuffled(fictitious, cfg.seed)
    entities: list[str] = []
    for f in facts:
        key = f.entity or f.subject or f.id
        if key not in entities:
            entities.append(key)
    tuned_names = set(entities[: cfg.finetune_entities])
    tuned = [f for f in facts if (f.entity or f.subject or f.id) in tuned_names]
    unseen = [f for f in facts if (f.entity or f.subject or f.id) not in tuned_names]
    known_real = known_facts(model, tokenizer, real_facts, cfg.eval_batch_size)
    base = copy.deepcopy(model)
    base.requires_grad_(True)
    t0 = time.perf_counter()
    ft = finetune(base, tokenizer, tuned, lr=cfg.finetune_lr, epochs=cfg.finetune_epochs,
                  seed=cfg.seed, progress=cfg.progress)
    ft["finetune_seconds"] = time.perf_counter() - t0
    log(f"  fine-tuned on {len(tuned)} facts about {len(tuned_names)} invented people: "
        f"{ft['finetune_steps']} steps, accuracy {ft['finetune_acc']:.2f}")
    learned = known_facts(base, tokenizer, tuned, cfg.eval_batch_size)
    if len(learned) < cfg.requests + 1:
        raise ValueError(f"fine-tuning taught only {len(learned)} facts; increase "
                         "finetune_epochs or finetune_lr")
    # as in split_pretrained: only facts with an answer no other learned fact shares
    answers = collections.Counter(_answer_key(f) for f in learned)
    own = [f for f in learned if answers[_answer_key(f)] == 1]
    forget = own[: min(cfg.forget_size, len(learned) - 1)]
    if len(forget) < cfg.requests:
        raise ValueError(f"only {len(forget)} fine-tuned facts have an answer no other learned "
                         f"fact shares; need at least requests={cfg.requests} (fine-tune more "
                         "entities: finetune_entities)")
    forget_ids = {f.id for f in forget}
    retain = [f for f in learned if f.id not in forget_ids][: cfg.retain_size]
    rng = random.Random(cfg.seed)
    neighbour = _sample(known_real, max(cfg.retain_size // 2, 1), rng)
    split = Split(forget, retain, neighbour, unseen[: cfg.nonmember_size],
                  split_requests(forget, cfg.requests))
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


__all__ = ["METRIC_NAMES", "PHASES", "TUNED_METHOD_OPTIONS", "PulseConfig", "Split",
           "UnlearningRun", "finetune", "known_facts", "method_settings", "quality_verdict",
           "run_method_sequence", "run_pulse", "siu_batch", "siu_substitute", "split_pretrained",
           "split_requests", "summarize"]
