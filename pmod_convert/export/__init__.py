"""Export: merge the finetune sidecar, quantize with bitsandbytes, write a checked HF folder; generate from it.

Layout of an exported folder::

    OUT/config.json               transformers config + quantization_config (bitsandbytes) + pmod section
    OUT/model*.safetensors        packed bnb tensors for the language model's linears, the rest as saved
    OUT/recipe.yaml               the MoD recipe; export_settings.yaml: how it was exported
    OUT/export_report.json|png    bytes on disk and logit deviation vs the unquantized MoD model
    OUT/pmod_manifest.json        name, size, sha256 of every file (checked by load_pretrained)
    OUT/<processor/tokenizer files>
"""

from .generate import Generation, generate_answer
from .manifest import MANIFEST_NAME, verify_manifest, write_manifest
from .pipeline import SETTINGS_FILE, export, merge_lora
from .report import REPORT_JSON, REPORT_PNG, ExportReport
from .retention import LayerRetention, RetentionRecorder
from .settings import COMPUTE_DTYPES, QUANT_MODES, ExportSettings, parse_skip_modules

__all__ = [
    "COMPUTE_DTYPES", "MANIFEST_NAME", "QUANT_MODES", "REPORT_JSON", "REPORT_PNG", "SETTINGS_FILE", "ExportReport",
    "ExportSettings", "Generation", "LayerRetention", "RetentionRecorder", "export", "generate_answer", "merge_lora",
    "parse_skip_modules", "verify_manifest", "write_manifest",
]
