"""Routers decide which pairs go to the judge: tensors in, boolean mask out."""

from lit_route.routing.audit import AuditTally
from lit_route.routing.budget import BudgetLedger
from lit_route.routing.controller import (
    BudgetTarget,
    Controller,
    PIController,
    QuantileTracker,
    target_fraction,
)
from lit_route.routing.decision import Assignment, JudgePlan, RoutingDecision
from lit_route.routing.risk import RiskController, risk_threshold
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
    "Assignment",
    "AuditTally",
    "BudgetLedger",
    "BudgetRouter",
    "BudgetTarget",
    "Controller",
    "JudgePlan",
    "MarginRouter",
    "OracleRouter",
    "PIController",
    "QuantileTracker",
    "RandomRouter",
    "RiskController",
    "Router",
    "RoutingDecision",
    "ThresholdRouter",
    "count_for_fraction",
    "risk_threshold",
    "target_fraction",
    "threshold_for_fraction",
]
