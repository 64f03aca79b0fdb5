"""Finetuning a converted checkpoint: LoRA on the language model, routers trained fully (``pmod-convert finetune``).

``finetune(checkpoint, data, image_folder, *, out=None, settings=FinetuneSettings(...)) -> summary dict``.
"""

from .finetune import REPORT_DIR, default_run_dir, finetune
from .settings import FinetuneSettings

__all__ = ["REPORT_DIR", "FinetuneSettings", "default_run_dir", "finetune"]
