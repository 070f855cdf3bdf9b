"""Scoring of generations (Rouge-L, code parse rate, retention) and the run report.

Generation itself happens elsewhere (rollout workers); this package only scores text.
"""

from raykd.evaluate.metrics import (
    RougeTokenizer,
    code_validity,
    evaluate_predictions,
    extract_code,
    parse_rate,
    retention,
    rouge_l,
    rouge_l_scores,
)
from raykd.evaluate.report import summarize, write_report

__all__ = [
    "RougeTokenizer",
    "code_validity",
    "evaluate_predictions",
    "extract_code",
    "parse_rate",
    "retention",
    "rouge_l",
    "rouge_l_scores",
    "summarize",
    "write_report",
]
