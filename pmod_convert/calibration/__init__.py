"""Calibration: fit the PRD schedule to a compute budget, choose MoD layers from data, warm-start routers.

``calibrate`` (the API behind ``pmod-convert calibrate``) ties together the budget solver (``budget``),
the per-layer redundancy observers (``observers``), the router warm start (``warm_start``) and the
report (``report``).
"""

from .budget import BudgetError, BudgetSolution, Workload, solve_budget
from .calibrate import CalibrationResult, calibrate
from .observers import LayerMetrics, LayerObserver, numerical_rank
from .warm_start import RouterFitter, set_routers

__all__ = [
    "BudgetError", "BudgetSolution", "CalibrationResult", "LayerMetrics", "LayerObserver", "RouterFitter",
    "Workload", "calibrate", "numerical_rank", "set_routers", "solve_budget",
]
