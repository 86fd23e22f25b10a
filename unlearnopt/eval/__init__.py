"""Evaluation of unlearning: metrics (``unlearnopt.eval.metrics``) and the PULSE protocol
(``unlearnopt.eval.pulse``), with JSON/PNG reports (``unlearnopt.eval.report``)."""

from unlearnopt.eval.metrics import (
    METRIC_DOC,
    METRIC_NAMES,
    encode_facts,
    encode_qa,
    evaluate,
    fact_accuracy,
    membership_auc,
    perplexity,
    score_answers,
    unique_token_ratio,
)
from unlearnopt.eval.pulse import PulseConfig, run_pulse

__all__ = [
    "METRIC_DOC",
    "METRIC_NAMES",
    "PulseConfig",
    "encode_facts",
    "encode_qa",
    "evaluate",
    "fact_accuracy",
    "membership_auc",
    "perplexity",
    "run_pulse",
    "score_answers",
    "unique_token_ratio",
]
