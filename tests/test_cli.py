"""The ``unlearnopt`` command line, in-process: commands on a tiny saved model, and the one-line
messages (exit status 2, no traceback) for the mistakes a user can make."""

from __future__ import annotations

import json

import pytest
import torch

from tests.pulse_fixtures import (
    NEUTRAL,
    all_texts,
    tiny_facts,
    tiny_llama,
    tiny_tokenizer,
)
from unlearnopt.cli import main


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("UNLEARNOPT_BACKEND", "reference")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama that learned the tiny facts, saved as a Hugging Face directory."""
    from unlearnopt.eval.pulse import finetune

    tok = tiny_tokenizer(all_texts())
    model = tiny_llama(len(tok))
    finetune(model, tok, tiny_facts(), lr=3e-2, epochs=60, target_acc=1.0, progress=False)
    d = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    facts = tiny_facts()
    for name, part in (("forget", facts[:2]), ("retain", facts[4:10])):
        (d / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": f.prompt, "answer": f.answer}) + "\n" for f in part)
        )
    return d


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_run_unlearns_and_saves_the_model(model_dir, data_files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "run",
            "--model",
            str(model_dir),
            "--method",
            "ga",
            "--forget",
            str(data_files / "forget.jsonl"),
            "--retain",
            str(data_files / "retain.jsonl"),
            "--out",
            str(out),
            "--steps",
            "4",
            "--lr",
            "5e-2",
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "before: forget_acc" in text and "after:  forget_acc" in text
    log = json.loads((out / "run.json").read_text())
    assert log["method"] == "ga" and log["steps"] == 4 and len(log["history"]) == 4
    assert log["after"]["forget_acc"] < log["before"]["forget_acc"]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert (
        reloaded.config.vocab_size
        == json.loads((model_dir / "config.json").read_text())["vocab_size"]
    )


def test_pulse_command_with_user_data(model_dir, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f.to_dict()) + "\n" for f in tiny_facts()))
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("\n".join(NEUTRAL))
    out = tmp_path / "pulse"
    rc = main(
        [
            "pulse",
            "--model",
            str(model_dir),
            "--methods",
            "ga,mollm",
            "--requests",
            "2",
            "--forget-size",
            "4",
            "--retain-size",
            "6",
            "--steps",
            "2",
            "--lr",
            "1e-2",
            "--retain-batch-size",
            "4",
            "--facts",
            str(facts),
            "--neutral",
            str(neutral),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "mollm@end" in text and "ga@end" in text and "report:" in text
    # verdicts in words with the thresholds; the table says which direction is better
    assert "Quality bar: forget accuracy <= 0.10, retain and neighbour accuracy >= 90%" in text
    assert "kept_retain" not in text and "forget acc ↓" in text and "MIA AUC →0.5" in text
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["methods"] == ["ga", "mollm"]
    assert (out / "pretrained_metrics.png").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["run", "--forget", "MISSING.jsonl", "--out", "x", "--method", "ga"],
            "data file not found: MISSING.jsonl",
        ),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--method", "nonsense"],
            "unknown method 'nonsense'; available: ",
        ),
        (
            ["run", "--forget", "{bad}", "--retain", "{forget}", "--out", "x"],
            "bad.jsonl, line 2: invalid JSON",
        ),
        (
            ["run", "--forget", "{noanswer}", "--out", "x", "--method", "ga"],
            "noanswer.jsonl, line 1: missing required field 'answer'",
        ),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--method", "keyed"],
            "--forget: --method(s) keyed needs every fact to have a 'subject'",
        ),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--method", "grad_diff"],
            "needs a retain set",
        ),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--method", "ga", "--option", "beta=1"],
            "unknown option",
        ),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--method", "ga", "--model", "{empty}"],
            "could not load a causal language model from",
        ),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--method", "ga", "--model", "NOPE/"],
            "model path not found: NOPE",
        ),
        (["pulse", "--methods", "ga,bogus"], "unknown method 'bogus'"),
        (["pulse", "--phases", "later"], "unknown phase 'later'"),
        (["pulse", "--methods", "keyed", "--option", "keyed.layer=-1"], "layer must be"),
        (
            ["pulse", "--methods", "ga,keyed", "--facts", "{forget}"],
            "--facts: --method(s) keyed needs every fact to have a 'subject'",
        ),
        (["pulse", "--methods", "keyed", "--option", "keyed.beta=1"], "unknown option(s)"),
        (["pulse", "--forget-size", "2", "--requests", "5"], "forget_size (2) must be >= requests"),
        (["demo", "--option", "mollm.alpha"], "expected METHOD.KEY=VALUE"),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--lr", "-1"],
            "--lr must be a positive finite number, got -1.0",
        ),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--lr", "nan"],
            "--lr must be a positive finite number, got nan",
        ),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--lr", "0"],
            "--lr must be a positive finite number, got 0.0",
        ),
        (["pulse", "--lr", "0"], "--lr must be a positive finite number, got 0.0"),
        (["demo", "--lr", "inf"], "--lr must be a positive finite number, got inf"),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--max-grad-norm", "-1"],
            "--max-grad-norm must be a positive finite number, got -1.0",
        ),
        (["pulse", "--max-grad-norm", "0"], "--max-grad-norm must be a positive finite number"),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--device", "nosuch"],
            "--device 'nosuch' is not a torch device",
        ),
        (["pulse", "--device", "cuda"], "--device cuda: CUDA is not available"),
        (
            ["run", "--forget", "{forget}", "--out", "{file}", "--method", "ga"],
            "exists and is not a directory",
        ),
        (["pulse", "--out", "{file}"], "exists and is not a directory"),
        (
            ["pulse", "--methods", "ga", "--option", "ga.bar=1"],
            "--option: method 'ga' got unknown option(s) ['bar']",
        ),
        (["pulse", "--methods", "npo", "--option", "npo.beta=-1"], "--option: "),
        (
            ["run", "--forget", "{forget}", "--out", "x", "--method", "ga", "--steps", "0"],
            "--steps must be >= 1, got 0",
        ),
        (["pulse", "--forget-target", "2"], "--forget-target must be in [0, 1], got 2.0"),
        (["pulse", "--nonmember-size", "0"], "--nonmember-size must be >= 1"),
        (["pulse", "--seed", "-3"], "--seed must be >= 0"),
        (["pulse", "--model", "{empty}"], "the directory is empty; expected a Hugging Face"),
    ],
)
def test_user_errors_give_one_line_and_status_2(
    argv, message, data_files, tmp_path, capsys, monkeypatch
):
    import torch

    import unlearnopt.models

    def never(*a, **k):
        raise AssertionError("the model must not be loaded for a user error")

    monkeypatch.setattr(unlearnopt.models, "load_model", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # nothing lands in the source tree
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", answer: b}\n')
    noanswer = tmp_path / "noanswer.jsonl"
    noanswer.write_text('{"prompt": "a"}\n')
    empty = tmp_path / "empty_model"
    empty.mkdir()
    subs = {
        "{forget}": str(data_files / "forget.jsonl"),
        "{bad}": str(bad),
        "{noanswer}": str(noanswer),
        "{empty}": str(empty),
        "{file}": str(a_file),
    }
    argv = [subs.get(a, a) for a in argv]
    assert main(argv) == 2
    err = _error(capsys)
    assert err.startswith("unlearnopt: error: ") and message in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "unlearnopt-pulse").exists() and not (tmp_path / "x").exists()


def test_token_ids_outside_the_vocabulary(tmp_path, data_files, capsys):
    """A tokenizer that does not belong to the model: one clear line, not an IndexError."""
    tok = tiny_tokenizer(all_texts())
    model = tiny_llama(8)  # far fewer rows than the tokenizer
    d = tmp_path / "mismatched"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    rc = main(
        [
            "run",
            "--model",
            str(d),
            "--method",
            "ga",
            "--forget",
            str(data_files / "forget.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 2
    err = _error(capsys)
    assert "outside the model's vocabulary of 8 tokens" in err and "forget.jsonl" in err


def test_help_names_every_default_and_the_methods(capsys):
    for argv in (
        ["--help"],
        ["demo", "--help"],
        ["pulse", "--help"],
        ["run", "--help"],
        ["selfcheck", "--help"],
    ):
        assert main(argv) == 0
        text = capsys.readouterr().out
        assert "usage: unlearnopt" in text, argv
        body = text.split("options:")[0]
        assert len(body.split("\n\n", 1)[1].strip()) > 40, argv  # a description
    main(["pulse", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "PULSE measures unlearning" in text
    for flag_default in (
        "--steps STEPS step budget per request (default: 8)",
        "(default: 1e-05)",
        "--retain-batch-size",
        "(default: ./unlearnopt-pulse)",
        "--max-grad-norm MAX_GRAD_NORM clip",
    ):
        assert flag_default in text, flag_default
    main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    from unlearnopt.methods import available_methods

    assert ", ".join(available_methods()) in text
    assert "simnpo" in text and "idk_dpo" in text and "rmu" in text
    assert "optimizer steps (default: 20)" in text


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "usage: unlearnopt" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_selfcheck_subcommand_exists(monkeypatch, capsys):
    import unlearnopt.selfcheck as sc

    monkeypatch.setattr(sc, "main", lambda: print("backends: stub") or 0)
    assert main(["selfcheck"]) == 0
    assert "backends: stub" in capsys.readouterr().out


def test_pulse_focus_and_one_shot_flags(model_dir, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f.to_dict()) + "\n" for f in tiny_facts()))
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("\n".join(NEUTRAL))
    out = tmp_path / "pulse"
    rc = main(
        [
            "pulse",
            "--model",
            str(model_dir),
            "--methods",
            "ga",
            "--requests",
            "2",
            "--forget-size",
            "4",
            "--retain-size",
            "6",
            "--steps",
            "1",
            "--lr",
            "1e-2",
            "--retain-batch-size",
            "4",
            "--facts",
            str(facts),
            "--neutral",
            str(neutral),
            "--focus",
            "relation",
            "--retain-same-relation",
            "--compare-one-shot",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "ga x2" in text and "ga x1" in text
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["focus"] == "relation" and report["config"]["retain_same_relation"]
    requests = report["phases"]["pretrained"]["split"]["forget_requests"]
    assert all(len({i.split("/")[0] for i in r}) == 1 for r in requests)


def test_demo_is_sized_for_a_first_look():
    from unlearnopt.cli import build_parser

    demo = build_parser().parse_args(["demo"])
    pulse = build_parser().parse_args(["pulse"])
    assert demo.methods == "ga,mollm" and demo.requests == 1 and demo.forget_size == 4
    assert pulse.requests == 5 and pulse.forget_size == 10 and pulse.retain_size == 24


@pytest.mark.parametrize(
    "method, options",
    [
        ("simnpo", []),
        ("wga", []),
        ("satimp", []),
        ("ce_u", []),
        ("undial", []),
        ("idk_dpo", []),
        ("rmu", ["--option", "layer=1", "--option", "depth=2", "--option", "steering_coeff=4"]),
    ],
)
def test_run_with_the_newer_methods(model_dir, data_files, tmp_path, capsys, method, options):
    out = tmp_path / "out"
    rc = main(
        [
            "run",
            "--model",
            str(model_dir),
            "--method",
            method,
            "--forget",
            str(data_files / "forget.jsonl"),
            "--retain",
            str(data_files / "retain.jsonl"),
            "--out",
            str(out),
            "--steps",
            "2",
            "--lr",
            "5e-2",
            "--no-progress",
            *options,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    log = json.loads((out / "run.json").read_text())
    assert log["method"] == method and len(log["history"]) == 2


def test_run_with_the_keyed_edit_changes_one_layer(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps(f.to_dict()) + "\n" for f in tiny_facts()[:2]))
    out = tmp_path / "out"
    argv = ["run", "--model", str(model_dir), "--method", "keyed", "--forget", str(forget)]
    options = ["--option", "layer=0", "--option", "inner_steps=200", "--option", "inner_lr=2.0"]
    rc = main([*argv, "--out", str(out), "--steps", "2", "--no-progress", *options])
    assert rc == 0, capsys.readouterr().err
    log = json.loads((out / "run.json").read_text())
    assert log["method"] == "keyed" and log["history"][0]["update_norm"] > 0
    before = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]


def test_methods_all_names_every_method():
    from unlearnopt.cli import _methods_list
    from unlearnopt.methods import available_methods

    assert _methods_list("all", "--methods") == available_methods()
    assert {"simnpo", "rmu", "idk_dpo", "wga", "satimp", "ce_u", "undial"} <= set(
        _methods_list("all", "--methods")
    )


@pytest.mark.parametrize("command", ["pulse", "run"])
def test_retain_same_relation_takes_an_optional_share(command, capsys):
    from unlearnopt.cli import build_parser

    base = [command] + (["--forget", "f.jsonl", "--out", "o"] if command == "run" else [])
    parse = build_parser().parse_args
    assert parse(base).retain_same_relation == 0.0
    assert parse([*base, "--retain-same-relation"]).retain_same_relation == 0.5
    assert parse([*base, "--retain-same-relation", "0.8"]).retain_same_relation == 0.8
    with pytest.raises(SystemExit):
        parse([*base, "--retain-same-relation", "1.5"])
    assert "expected a number in [0, 1], got '1.5'" in capsys.readouterr().err
