"""Evaluation: accuracy against judge budget for each router, metrics, plots and reports."""

from lit_route.eval.curves import (
    area_under_curve,
    curve_for_order,
    random_expected_curve,
    routed_accuracy,
)

__all__ = ["area_under_curve", "curve_for_order", "random_expected_curve", "routed_accuracy"]
