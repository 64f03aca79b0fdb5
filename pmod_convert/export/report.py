"""The export report: bytes on disk per model part and logit deviation, as JSON, a rich table and a PNG."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..mod.router import ROUTER_NAME
from .compare import LogitDeviation

REPORT_JSON = "export_report.json"
REPORT_PNG = "export_report.png"
REPORT_FORMAT = 1

# First matching group wins; checked on the dotted components of a tensor name.
_PARTS = (
    ("routers", (ROUTER_NAME,)),
    ("vision tower", ("vision_tower", "visual", "vision_model")),
    ("projector", ("multi_modal_projector", "connector", "image_newline")),
    ("lm_head", ("lm_head",)),
    ("embeddings", ("embed_tokens",)),
)


def part_of(tensor_name: str) -> str:
    parts = set(tensor_name.split("."))
    for label, names in _PARTS:
        if parts.intersection(names):
            return label
    return "decoder"


def tensor_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes of every tensor stored in the folder's safetensors files (read from their headers)."""
    sizes: dict[str, int] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = end - start
    return sizes


def bytes_by_part(folder: str | Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, size in tensor_bytes(folder).items():
        out[part_of(name)] = out.get(part_of(name), 0) + size
    return out


def weight_file_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


@dataclass
class ExportReport:
    """What one export wrote and how close it stays to the unquantized MoD model."""

    checkpoint: str
    out: str
    settings: dict
    skip_modules: list[str]
    lora_merged: bool
    linears: dict[str, int]
    weight_bytes: int
    unquantized_weight_bytes: int
    parts: dict[str, dict[str, int]]  # part -> {"unquantized": bytes, "exported": bytes}
    logits: dict
    seconds: float
    versions: dict = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        return self.weight_bytes / self.unquantized_weight_bytes if self.unquantized_weight_bytes else float("nan")

    def to_dict(self) -> dict:
        return {"format": REPORT_FORMAT, "checkpoint": self.checkpoint, "out": self.out, "settings": self.settings,
                "skip_modules": self.skip_modules, "lora_merged": self.lora_merged, "linears": self.linears,
                "bytes": {"weights": self.weight_bytes, "unquantized_weights": self.unquantized_weight_bytes,
                          "ratio": self.size_ratio, "parts": self.parts},
                "logits": self.logits, "seconds": round(self.seconds, 2), "versions": self.versions}

    def save(self, folder: str | Path, deviation: LogitDeviation | None = None) -> None:
        folder = Path(folder)
        (folder / REPORT_JSON).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.plot(folder / REPORT_PNG, deviation)

    @classmethod
    def load(cls, folder: str | Path) -> dict:
        return json.loads((Path(folder) / REPORT_JSON).read_text())

    def table(self):
        from rich.table import Table

        mode = self.settings["quantize"]
        table = Table(title=f"export {mode}: {self.out}")
        table.add_column("part")
        table.add_column("unquantized MiB", justify="right")
        table.add_column("exported MiB", justify="right")
        table.add_column("ratio", justify="right")
        for part, sizes in sorted(self.parts.items()):
            before, after = sizes["unquantized"], sizes["exported"]
            table.add_row(part, _mib(before), _mib(after), f"{after / before:.3f}" if before else "-")
        table.add_row("[bold]weights[/bold]", _mib(self.unquantized_weight_bytes), _mib(self.weight_bytes),
                      f"{self.size_ratio:.3f}")
        lg, text = self.logits, self.logits.get("text_positions")
        caption = (f"logits vs the unquantized MoD model on {lg['inputs']} inputs / {lg['positions']} positions: "
                   f"max |diff| {lg['max_abs_diff']:.4g}, mean |diff| {lg['mean_abs_diff']:.4g}, "
                   f"top-1 agreement {lg['top1_agreement']:.1%}")
        if text:
            caption += (f"; text positions ({text['positions']}): max |diff| {text['max_abs_diff']:.4g}, "
                        f"mean |diff| {text['mean_abs_diff']:.4g}, top-1 agreement {text['top1_agreement']:.1%}")
        table.caption = (caption + f"; {self.linears['quantized']} linears quantized, "
                         f"LoRA {'merged' if self.lora_merged else 'absent'}")
        return table

    def plot(self, path: Path, deviation: LogitDeviation | None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_bytes, ax_diff) = plt.subplots(1, 2, figsize=(11, 4))
        names = sorted(self.parts)
        x = torch.arange(len(names)).tolist()
        before = [self.parts[n]["unquantized"] / 2**20 for n in names]
        after = [self.parts[n]["exported"] / 2**20 for n in names]
        ax_bytes.bar([i - 0.2 for i in x], before, width=0.4, label="unquantized")
        ax_bytes.bar([i + 0.2 for i in x], after, width=0.4, label=self.settings["quantize"])
        ax_bytes.set_xticks(x, names, rotation=20)
        ax_bytes.set_ylabel("MiB on disk")
        ax_bytes.set_title(f"weights: {self.size_ratio:.2f}x of unquantized")
        ax_bytes.legend()
        if deviation is not None and deviation.positions:
            ax_diff.hist(deviation.per_position_max.numpy(), bins=40)
        ax_diff.set_xlabel("max |logit diff| per position")
        ax_diff.set_ylabel("positions")
        ax_diff.set_title(f"top-1 agreement {self.logits['top1_agreement']:.1%}")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"
