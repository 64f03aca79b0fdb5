"""lmms-eval's plugin entry: with ``LMMS_EVAL_PLUGINS=pmod_convert`` lmms-eval reads ``AVAILABLE_MODELS`` here
and imports ``pmod_convert.models.<name>.<class>``; the model itself is
:class:`pmod_convert.integrations.lmms_eval.PmodLMM`. Importing ``pmod_convert.models.pmod`` needs lmms-eval
(``pip install -e ".[lmms]"``); this package alone does not.
"""

AVAILABLE_MODELS = {"pmod": "PmodLMM"}
