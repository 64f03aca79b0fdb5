"""The quickstart demo: a synthetic shapes VQA set, a tiny LLaVA trained from scratch, the whole pipeline.

``quickstart(out, fast=...)`` is the API behind ``pmod-convert quickstart``; ``synthetic`` writes the dataset,
``model`` builds and pretrains the dense model, ``plots`` draws accuracy against FLOPs.
"""

from .quickstart import QuickstartError, QuickstartReport, QuickstartSettings, quickstart, summary_lines, table

__all__ = ["QuickstartError", "QuickstartReport", "QuickstartSettings", "quickstart", "summary_lines", "table"]
