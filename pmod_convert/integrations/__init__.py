"""Integrations with tools outside the toolkit, each imported only by the tool that uses it.

``lmms_eval``: the ``pmod`` model for lmms-eval (``pip install -e ".[lmms]"``, ``LMMS_EVAL_PLUGINS=pmod_convert``).
"""
