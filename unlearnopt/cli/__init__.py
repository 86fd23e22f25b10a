"""The ``unlearnopt`` command line: make a language model forget facts, and measure what it
forgot and what it kept.

    unlearnopt demo                      # a first look: ga vs mollm on the embedded SmolLM2-135M
    unlearnopt run --model DIR_OR_GGUF --method mollm --forget f.jsonl --retain r.jsonl --out DIR
    unlearnopt pulse --methods ga,npo,mollm,siu,ofmu --phases pretrained,finetuned
    unlearnopt selfcheck                 # backends found, each op once against its reference

Every argument is checked before a model is loaded: a mistake (a bad number, a missing file, a
malformed JSONL line, an unknown method or option, a device that is not there, a model that
does not load) prints one ``unlearnopt: error: ...`` line and exits with status 2.

The package, by job: ``parser`` (the argument parser), ``checks`` (the argument checks),
``loading`` (model loading, seeding), ``pulse`` (the ``pulse`` and ``demo`` commands), ``run``
(the ``run`` command); ``main`` and ``selfcheck`` are here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from unlearnopt.cli.checks import EXIT_USAGE, CLIError, _err
from unlearnopt.cli.checks import _methods_list as _methods_list
from unlearnopt.cli.parser import (
    DEMO_METHODS,
    DEMO_SIZES,
    PULSE_IN_ONE_LINE,
    PULSE_SIZES,
    build_parser,
)
from unlearnopt.cli.pulse import _cmd_pulse
from unlearnopt.cli.run import _cmd_run


def _cmd_selfcheck(args) -> int:
    try:
        from unlearnopt import selfcheck
    except ImportError as e:
        raise CLIError(f"selfcheck is not available in this installation ({e})") from None
    return int(selfcheck.main() or 0)


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


__all__ = [
    "DEMO_METHODS",
    "DEMO_SIZES",
    "EXIT_USAGE",
    "PULSE_IN_ONE_LINE",
    "PULSE_SIZES",
    "CLIError",
    "build_parser",
    "main",
]
