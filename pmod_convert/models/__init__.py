"""lmms-eval's plugin entry: with ``LMMS_EVAL_PLUGINS=pmod_convert`` lmms-eval reads ``AVAILABLE_MODELS`` here
and imports ``pmod_convert.models.<name>.<class>``; the model itself is
:class:`pmod_convert.integrations.lmms_eval.PmodLMM`. Importing ``pmod_convert.models.pmod`` needs lmms-eval
(``pip install -e ".[lmms]"``); this package alone does not.
"""

AVAILABLE_MODELS = {"pmod": "PmodLMM"}


def lmms_eval_manifest():
    """lmms-eval's entry point (group ``lmms_eval.models``, declared in pyproject.toml): registers ``pmod``
    without ``LMMS_EVAL_PLUGINS`` once the package is installed. Imports lmms-eval only when lmms-eval calls it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="pmod", simple_class_path="pmod_convert.models.pmod.PmodLMM")
