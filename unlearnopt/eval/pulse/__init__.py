"""The PULSE evaluation: settings (:mod:`.config`), data splits (:mod:`.splits`), the
protocol that runs methods over sequential requests (:mod:`.protocol`), the fine-tuned
phase's setup and TOFU metrics (:mod:`.finetuned`), and the report's tables and quality
verdicts (:mod:`.summary`)."""

from unlearnopt.eval.metrics import METRIC_NAMES
from unlearnopt.eval.pulse.config import EDIT_METHODS, FOCUS, PHASES, PulseConfig, method_settings
from unlearnopt.eval.pulse.protocol import (
    dump_json,
    key_texts_for,
    one_shot_rows,
    quality_verdict,
    run_method_sequence,
    run_pulse,
    summarize,
)
from unlearnopt.eval.pulse.splits import (
    Split,
    known_facts,
    split_focused,
    split_pretrained,
    split_requests,
)
from unlearnopt.training import TUNED_METHOD_OPTIONS, UnlearningRun, finetune

__all__ = [
    "EDIT_METHODS",
    "FOCUS",
    "METRIC_NAMES",
    "PHASES",
    "TUNED_METHOD_OPTIONS",
    "PulseConfig",
    "Split",
    "UnlearningRun",
    "dump_json",
    "finetune",
    "key_texts_for",
    "known_facts",
    "method_settings",
    "one_shot_rows",
    "quality_verdict",
    "run_method_sequence",
    "run_pulse",
    "split_focused",
    "split_pretrained",
    "split_requests",
    "summarize",
]
