"""``--model pmod`` for lmms-eval (``LMMS_EVAL_PLUGINS=pmod_convert``): see :mod:`pmod_convert.integrations.lmms_eval`."""

from ..integrations.lmms_eval import PmodLMM

__all__ = ["PmodLMM"]
