"""Routers decide which pairs go to the judge: tensors in, boolean mask out."""

from lit_route.routing.budget import BudgetLedger
from lit_route.routing.routers import (
    BudgetRouter,
    MarginRouter,
    OracleRouter,
    RandomRouter,
    Router,
    ThresholdRouter,
    count_for_fraction,
    threshold_for_fraction,
)

__all__ = [
    "BudgetLedger",
    "BudgetRouter",
    "MarginRouter",
    "OracleRouter",
    "RandomRouter",
    "Router",
    "ThresholdRouter",
    "count_for_fraction",
    "threshold_for_fraction",
]
