"""The ``pulse`` and ``demo`` commands: the PULSE protocol over the shipped (or given) facts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearnopt.cli.checks import (
    CLIError,
    _check_common,
    _check_method_options,
    _check_subjects,
    _methods_list,
    _output_dir,
    _parse_options,
    _positive,
)
from unlearnopt.cli.loading import _load, _setup_torch


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
    from unlearnopt.eval.pulse import EDIT_METHODS, PHASES

    _check_common(args)
    methods = _methods_list(args.methods, "--methods", extra=EDIT_METHODS)
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
    edits = [m for m in methods if m in EDIT_METHODS]
    for key, flag in (("real_facts", "--facts"), ("fictitious", "--fictitious")):
        if edits and key in data:  # the shipped files are checked by the tests
            _check_subjects(data[key], flag, edits[0])
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
