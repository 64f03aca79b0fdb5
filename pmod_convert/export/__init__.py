"""Export: merge the finetune sidecar, quantize with bitsandbytes, write a checked HF folder; generate from it.

Layout of an exported folder::

    OUT/config.json               transformers config + quantization_config (bitsandbytes) + pmod section
    OUT/model*.safetensors        packed bnb tensors for the language model's linears, the rest as saved
    OUT/recipe.yaml               the MoD recipe; export_settings.yaml: how it was exported
    OUT/export_report.json|png    bytes on disk and logit deviation vs the unquantized MoD model
    OUT/pmod_manifest.json        name, size, sha256 of every file (checked by load_pretrained)
    OUT/<processor/tokenizer files>

``export --dense`` (:func:`export_dense`) writes a plain dense transformers folder instead: LoRA merged, routers
and the ``pmod`` config section removed, nothing else of the toolkit's (for serving engines).
"""

from .dense import DenseExport, export_dense, load_plain, strip_routers
from .generate import Generation, generate_answer
from .manifest import MANIFEST_NAME, verify_manifest, write_manifest
from .pipeline import SETTINGS_FILE, export, merge_lora
from .report import REPORT_JSON, REPORT_PNG, ExportReport
from .retention import LayerRetention, RetentionRecorder
from .settings import COMPUTE_DTYPES, QUANT_MODES, ExportSettings, parse_skip_modules

__all__ = [
    "COMPUTE_DTYPES", "DenseExport", "MANIFEST_NAME", "QUANT_MODES", "REPORT_JSON", "REPORT_PNG", "SETTINGS_FILE", "ExportReport",
    "ExportSettings", "Generation", "LayerRetention", "RetentionRecorder", "export", "export_dense", "generate_answer", "load_plain",
    "merge_lora",
    "parse_skip_modules", "strip_routers", "verify_manifest", "write_manifest",
]
