"""lmms-eval task folder of the ``pmod_convert`` plugin.

With ``LMMS_EVAL_PLUGINS=pmod_convert`` lmms-eval adds this folder to its task search path (it requires the
package to exist). It holds no task of its own: lmms-eval's built-in tasks (``gqa``, ``textvqa_val``, ...)
and your own task YAML files (``--include_path DIR``) run with ``--model pmod`` unchanged.
"""
