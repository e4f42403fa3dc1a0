"""Evaluation of rerankings: metrics with bootstrap CIs, baselines, and the report writer.

``evaluate_rankings(rankings, valid, candidates, targets)`` scores one method;
``write_report(out_dir, methods, meta)`` writes report.{md,json} and PNG plots;
``save_rankings`` / ``load_rankings`` (:mod:`gr2.eval.rankings`) are a method's rankings file. The
`gr2 eval` stage (:mod:`gr2.pipeline.eval`) runs them over the run directory's candidate lists.
"""

from gr2.eval.baselines import popularity_order, random_order, score_order, upstream_order
from gr2.eval.metrics import (
    METRICS,
    bootstrap_ci,
    check_lists,
    evaluate_rankings,
    min_detectable_effect,
    paired_mde,
    per_list_metrics,
)
from gr2.eval.rankings import load_rankings, save_rankings
from gr2.eval.report import write_report


__all__ = [
    "METRICS",
    "bootstrap_ci",
    "check_lists",
    "evaluate_rankings",
    "min_detectable_effect",
    "paired_mde",
    "per_list_metrics",
    "popularity_order",
    "random_order",
    "score_order",
    "upstream_order",
    "write_report",
    "save_rankings",
    "load_rankings",
]
