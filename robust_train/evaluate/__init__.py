"""Evaluation of a checkpoint under attack (`python -m robust_train evaluate`): the options (`EvaluateOptions`),
the per-example accuracy every number is made of (`accuracy`), and the report, one file per section (`sections/`).

    report = evaluate("checkpoints/pgd/<run>/last.ckpt", n=500)   # dict; write_report(report, folder) saves it
"""
from robust_train.evaluate.accuracy import correct_under, predictions, worst_case
from robust_train.evaluate.evaluation import Evaluation, datamodule_from_checkpoint, has_feature_map, main_eps
from robust_train.evaluate.options import EvaluateOptions, parse_eps
from robust_train.evaluate.report import format_console, format_markdown, json_safe, write_report
from robust_train.evaluate.run import evaluate, run
from robust_train.evaluate.sections import SECTIONS, Section, register_section
from robust_train.evaluate.sections.suite import DEFAULT_SUITE, suite_for

__all__ = ["DEFAULT_SUITE", "EvaluateOptions", "Evaluation", "SECTIONS", "Section", "correct_under",
           "datamodule_from_checkpoint", "evaluate", "format_console", "format_markdown", "has_feature_map",
           "json_safe", "main_eps", "parse_eps", "predictions", "register_section", "run", "suite_for",
           "worst_case", "write_report"]
