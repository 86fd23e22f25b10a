"""The ``run`` command: unlearn the facts of a JSONL file from a model and save it."""

from __future__ import annotations

import json
import random

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


def _cmd_run(args) -> int:
    from unlearnopt.data import load_facts_file
    from unlearnopt.editing import EDIT_METHODS

    _check_common(args)
    method_name = _methods_list(args.method, "--method", extra=EDIT_METHODS)
    if len(method_name) != 1:
        raise CLIError("--method takes one method name")
    method_name = method_name[0]
    options = _parse_options(args.option, per_method=False)
    method_cls = _check_method_options(method_name, options, "--option")
    edit = method_name in EDIT_METHODS
    needs_retain = needs_ref = False
    if not edit:
        method = method_cls(**options)
        needs_retain, needs_ref = method.needs_retain, method.needs_ref
    for name in ("steps", "batch_size", "retain_batch_size"):
        _positive(args, name, integer=True)
    forget = load_facts_file(args.forget)
    retain = load_facts_file(args.retain) if args.retain else []
    if needs_retain and not retain:
        raise CLIError(f"method {method_name!r} needs a retain set: pass --retain FILE.jsonl")
    if edit:
        _check_subjects(forget, "--forget", method_name)
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
    ref = copy.deepcopy(model).eval().requires_grad_(False) if needs_ref else None
    if edit:
        from unlearnopt.data import load_fictitious_facts
        from unlearnopt.editing import KeyedEditRun, key_texts

        # key statistics: the retain facts and the shipped invented-people prompts
        texts = key_texts([*retain, *load_fictitious_facts()], exclude=forget)
        keyed = [f for f in retain if f.subject and f.subject in f.prompt]
        run = KeyedEditRun(model, tok, texts, protect=keyed, **options)
    else:
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
