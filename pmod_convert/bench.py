"""Measured savings: the MoD model against its dense model in one process, same prompts, alternating runs.

``bench(mod_model, dense_model, ...)`` builds prompt batches with a given number of vision and text
tokens per row (the nearest the family's image geometry allows; the real counts are reported), runs
greedy ``generate`` on both models (warm-up first, then alternating dense/MoD runs, order flipped
every repeat), and reports medians and MoD / dense ratios of:

- prefill latency: from ``generate`` handing the prompt to the streamer to the first token (one
  forward pass over the prompt, vision tower included, logits of the last position only);
- decode tokens/s: the ``new_tokens - 1`` single-token steps after the first token, with the cache
  (EOS is suppressed with ``min_new_tokens``, so every run decodes the same number of steps);
- peak memory during one untimed ``generate`` call, above the level at its start (weights and inputs
  excluded). CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the peak
  of bytes live in torch's CPU allocator, from the profiler's allocation events; allocator caching,
  the OS and libraries that allocate outside torch (oneDNN scratch) are not seen;
- KV-cache bytes read from the cache tensors after the prefill and after the decode (the MoD
  layers' ``MoDCacheLayer`` hold only the tokens they kept);
- estimated FLOPs from ``pmod_convert.efficiency.estimate`` for the real token counts.

Timing is wall clock around ``torch.cuda.synchronize()`` on CUDA. Nothing here asserts speed: the
numbers are for people to read (``benchmarks/``), next to the estimate, with their spread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import ArchitectureAdapter, get_adapter
from .checkpoint import _umask, check_writable
from .devices import resolve_device
from .errors import CheckpointError, PmodError

__all__ = [
    "BenchError",
    "BenchReport",
    "ModelRun",
    "PromptPlan",
    "allocator_mode",
    "bench",
    "build_prompts",
    "cache_bytes",
    "cached_tokens",
    "check_report_path",
    "check_workload",
    "format_report",
    "pair_from_checkpoint",
    "pair_from_shape",
    "pinned_threads",
    "ratio_spread",
    "report_header",
    "report_rows",
    "retain_freed_memory",
    "save_report",
    "vision_layout",
]


class BenchError(PmodError):
    """A benchmark setting is invalid (token counts, repeats, device, mismatched models)."""


# --------------------------------------------------------------------------------------------------
# Prompts with a chosen number of vision and text tokens per row
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionLayout:
    """Images of ONE row that give ``tokens`` vision tokens: ``sizes`` are (height, width) in pixels."""

    sizes: tuple[tuple[int, int], ...]
    tokens: int

    def describe(self) -> str:
        if not self.sizes:
            return "no image"
        distinct = sorted(set(self.sizes))
        what = ", ".join(f"{h}x{w}" for h, w in distinct)
        return f"{len(self.sizes)} image(s) of {what} px"


def vision_layout(config: Any, vision_tokens: int) -> VisionLayout:
    """The images of one row whose vision-token count is nearest to ``vision_tokens`` for this family.

    The family's adapter answers (``ArchitectureAdapter.vision_layout``): exact for dynamic-resolution families
    (an a x b patch grid); multiples of the per-image or per-tile count for fixed-size ones; the nearest count
    over a grid of image sizes for the any-res families.
    """
    if vision_tokens == 0:
        return VisionLayout((), 0)
    sizes, tokens = get_adapter(config).vision_layout(config, vision_tokens)
    return VisionLayout(tuple(tuple(int(x) for x in size) for size in sizes), int(tokens))


@dataclass
class PromptPlan:
    """What the prompt batch really holds (per row; every row has the same counts)."""

    batch_size: int
    requested_vision_tokens: int
    requested_text_tokens: int
    vision_tokens: int
    text_tokens: int
    layout: str


def build_prompts(model_or_config: Any, *, batch_size: int, vision_tokens: int, text_tokens: int,
                  seed: int = 0) -> tuple[dict[str, torch.Tensor], PromptPlan]:
    """A batch of ``batch_size`` identical-shape prompts with (nearly) the requested token counts.

    Text tokens are every non-vision token of a row (BOS, vision start/end markers and tile tags
    included), so random text fills the rest up to ``text_tokens``; rows are unpadded.
    """
    config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(config)
    layout = vision_layout(config, vision_tokens)
    kwargs: dict[str, Any] = {"images_per_row": len(layout.sizes)}
    if layout.sizes:
        kwargs["image_sizes"] = list(layout.sizes) * batch_size

    def make(n_text: int) -> dict[str, torch.Tensor]:
        return adapter.dummy_inputs(config, batch_size=batch_size, text_lengths=[n_text] * batch_size, seed=seed,
                                    **kwargs)

    inputs = make(text_tokens)
    markers = _text_counts(inputs, adapter, config)[0] - text_tokens  # non-vision tokens that are not random text
    if markers:
        inputs = make(max(0, text_tokens - markers))
    text = _text_counts(inputs, adapter, config)
    vision = _vision_counts(inputs, adapter, config)
    if len(set(text)) != 1 or len(set(vision)) != 1 or vision[0] != layout.tokens:
        raise BenchError(f"the {adapter.family} prompt builder gave rows of {vision} vision / {text} text tokens, "
                         f"expected {layout.tokens} vision tokens in every row")
    plan = PromptPlan(batch_size, vision_tokens, text_tokens, vision[0], text[0], layout.describe())
    return inputs, plan


def _vision_mask(inputs: dict[str, torch.Tensor], adapter: ArchitectureAdapter, config: Any) -> torch.Tensor:
    ids = torch.tensor(adapter.vision_token_ids(config))
    return torch.isin(inputs["input_ids"], ids)


def _vision_counts(inputs, adapter, config) -> list[int]:
    return _vision_mask(inputs, adapter, config).sum(1).tolist()


def _text_counts(inputs, adapter, config) -> list[int]:
    real = inputs["attention_mask"].bool()
    return (real & ~_vision_mask(inputs, adapter, config)).sum(1).tolist()


# --------------------------------------------------------------------------------------------------
# Reading the cache
# --------------------------------------------------------------------------------------------------


def _cache_tensors(layer: Any) -> list[torch.Tensor]:
    return [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]


def cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of every layer of a transformers ``Cache`` (padding included)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in _cache_tensors(layer))


def cached_tokens(cache: Any) -> list[int]:
    """Per layer: cached tokens summed over the batch (MoD layers: the valid entries they kept)."""
    from .mod.cache import MoDCacheLayer

    out = []
    for layer in cache.layers:
        if isinstance(layer, MoDCacheLayer):
            out.append(int(layer.kept_lengths().sum()))
        else:
            keys = getattr(layer, "keys", None)
            out.append(int(keys.shape[0] * keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0)
    return out


# --------------------------------------------------------------------------------------------------
# One generate call, timed by a streamer
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _clock_class():
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """``generate`` calls ``put`` with the prompt right before the prefill and with every new token."""

        def __init__(self, sync: Callable[[], None], on_first_token: Callable[[], None]):
            self.sync, self.on_first_token, self.times, self.paused = sync, on_first_token, [], 0.0

        def put(self, value: torch.Tensor) -> None:
            self.sync()
            self.times.append(time.perf_counter())
            if len(self.times) == 2:  # the prefill is done; its cache is read off the clock
                self.on_first_token()
                self.paused = time.perf_counter() - self.times[1]

        def end(self) -> None:
            pass

    return StepClock


@dataclass
class _Call:
    prefill_s: float
    decode_s: float | None
    kv_bytes_prefill: int | None = None
    kv_bytes_decode: int | None = None
    cached_tokens_prefill: list[int] | None = None
    peak_memory_bytes: int | None = None


def _generate(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, device: torch.device) -> _Call:
    from transformers import DynamicCache, GenerationConfig

    config = model.config
    gen = getattr(model, "generation_config", None)
    steps = max(1, new_tokens)
    settings = GenerationConfig(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1, use_cache=True,
        pad_token_id=getattr(gen, "pad_token_id", None) if getattr(gen, "pad_token_id", None) is not None
        else get_adapter(config).pad_token_id(config),
        eos_token_id=getattr(gen, "eos_token_id", None), bos_token_id=getattr(gen, "bos_token_id", None),
    )
    cache = DynamicCache(config=config.get_text_config(decoder=True))
    seen: dict[str, Any] = {}

    def at_first_token() -> None:  # the cache holds exactly the prompt now
        seen["kv"], seen["tokens"] = cache_bytes(cache), cached_tokens(cache)

    clock = _clock_class()(_sync(device), at_first_token)
    with torch.no_grad():
        model.generate(**inputs, generation_config=settings, streamer=clock, cache=cache)
    times = clock.times
    if len(times) != steps + 1:
        raise BenchError(f"generate produced {len(times) - 1} tokens, expected {steps}")
    return _Call(prefill_s=times[1] - times[0],
                 decode_s=times[-1] - times[1] - clock.paused if new_tokens >= 2 else None,
                 kv_bytes_prefill=seen["kv"], cached_tokens_prefill=seen["tokens"],
                 kv_bytes_decode=cache_bytes(cache) if new_tokens >= 2 else None)


# Lines the profiler's C++ side prints on every use; they say nothing about the measurement.
_PROFILER_CHATTER = ("SyncActivityProfilerHandler", "allocated before the profiling started")


@contextlib.contextmanager
def _quiet_profiler() -> Iterator[None]:
    """Drop the profiler's own log lines from stderr (file descriptor 2); everything else is replayed."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured by a test runner): nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(marker in line for marker in _PROFILER_CHATTER)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _cpu_allocator_peak(run: Callable[[], _Call]) -> tuple[_Call, int | None]:
    """Run under the torch profiler; the peak of (allocated - freed) bytes over the call's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call = run()
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:
        return call, None
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return call, peak


def _memory_run(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, device: torch.device) -> _Call:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call = _generate(model, inputs, new_tokens, device)
        call.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device) - base)
        return call
    call, peak = _cpu_allocator_peak(lambda: _generate(model, inputs, new_tokens, device))
    call.peak_memory_bytes = peak
    return call


CPU_MEMORY_METHOD = (
    "CPU: peak bytes live in torch's CPU allocator during one untimed generate call (prefill + decode), above the "
    "level at its start, from the torch profiler's allocation events (profile_memory=True); weights and inputs are "
    "excluded, and memory allocated outside torch (oneDNN/BLAS scratch, allocator caching, the OS) is not seen"
)
CUDA_MEMORY_METHOD = (
    "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory allocated before one "
    "untimed generate call (prefill + decode); weights and inputs are excluded"
)


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """Measurements of one model. Times in seconds, one entry per timed repeat."""

    prefill_s: list[float]
    decode_s: list[float] | None
    prefill_s_median: float
    decode_tokens_per_s: float | None  # generated tokens of the whole batch per second, median over repeats
    peak_memory_bytes: int | None
    kv_bytes_prefill: int
    kv_bytes_decode: int | None
    cached_tokens_per_layer: list[int]  # after the prefill, summed over the batch


@dataclass
class BenchReport:
    model: str
    family: str
    device: str
    device_name: str
    dtype: str
    threads: int
    batch_size: int
    requested_vision_tokens: int
    requested_text_tokens: int
    vision_tokens: int  # per row, real
    text_tokens: int  # per row, real (every non-vision token)
    prompt_layout: str
    new_tokens: int
    warmup: int
    repeats: int
    layer_ratios: list[float | None]
    dense: ModelRun
    mod: ModelRun
    ratios: dict[str, float | None]  # MoD / dense
    prefill_ratio_per_repeat: list[float]  # MoD / dense of each alternating pair: the run-to-run noise
    estimate: dict[str, Any]
    memory_method: str
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    # dense / MoD decode time (= MoD / dense tokens/s) of each alternating pair; empty without decode
    decode_ratio_per_repeat: list[float] = field(default_factory=list)
    # per measured ratio ("prefill_time", "decode_tokens_per_s"): median, quartiles, min, max of the pair ratios,
    # relative spread (q3 - q1) / median, number of pairs (see ratio_spread)
    spread: dict[str, dict[str, float | None]] = field(default_factory=dict)
    target_spread: float | None = None  # repeats continued until every spread was at most this (or max_repeats)
    converged: bool | None = None  # whether that happened; None when repeats were fixed
    pinned_cpus: list[int] | None = None  # the CPUs the process was pinned to while measuring (None: not pinned)
    # "glibc, freed memory retained" after retain_freed_memory(); else "default" (the C library's own behaviour)
    allocator: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _ratio(mod: float | None, dense: float | None) -> float | None:
    if mod is None or dense is None or dense == 0:
        return None
    return float(mod) / float(dense)


# Upper bounds of a benchmark workload: far above real use, far below what would exhaust memory.
MAX_PROMPT_TOKENS = 1 << 20
MAX_NEW_TOKENS = 1 << 16
MAX_BATCH = 4096
MAX_RUNS = 10_000


def check_workload(*, batch_size: int, vision_tokens: int | None, text_tokens: int, new_tokens: int,
                   warmup: int, repeats: int) -> None:
    """One-line errors for impossible benchmark settings (before any model is loaded)."""
    checks = [("batch size", batch_size, 1, MAX_BATCH), ("text tokens", text_tokens, 0, MAX_PROMPT_TOKENS),
              ("new tokens", new_tokens, 0, MAX_NEW_TOKENS), ("warm-up runs", warmup, 0, MAX_RUNS),
              ("repeats", repeats, 1, MAX_RUNS)]
    if vision_tokens is not None:
        checks.append(("vision tokens", vision_tokens, 0, MAX_PROMPT_TOKENS))
    for name, value, low, high in checks:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise BenchError(f"{name} must be an integer >= {low}, got {value!r}")
        if value > high:
            raise BenchError(f"{name} must be at most {high}, got {value}; nothing was allocated")
    if (vision_tokens or 0) + text_tokens == 0:
        raise BenchError("the prompt would be empty: ask for some vision or text tokens")
    if (vision_tokens or 0) + text_tokens + new_tokens > MAX_PROMPT_TOKENS:
        raise BenchError(f"a prompt of {(vision_tokens or 0) + text_tokens} tokens plus {new_tokens} new ones is longer "
                         f"than {MAX_PROMPT_TOKENS} tokens; nothing was allocated")


def _resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        return next(model.parameters()).device
    return resolve_device(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _check_pair(mod_model: nn.Module, dense_model: nn.Module) -> list[float | None]:
    from .api import is_pmod_model, layer_infos
    from .efficiency import TextShape

    if not is_pmod_model(mod_model):
        raise BenchError("the MoD model has no MoD layers; convert it with pmod_convert.add_routers or load a pmod checkpoint")
    if is_pmod_model(dense_model):
        raise BenchError("the dense model has MoD layers; load it with pmod_convert.load_dense")
    a, b = get_adapter(mod_model), get_adapter(dense_model)
    if a.family != b.family or TextShape.from_config(mod_model.config) != TextShape.from_config(dense_model.config):
        raise BenchError(f"the MoD model ({a.family}) and the dense model ({b.family}) differ in family or decoder "
                         "shape; compare a model with its own dense version")
    return [info.ratio for info in layer_infos(mod_model)]


def ratio_spread(pairs: list[float]) -> dict[str, float]:
    """Spread of per-pair ratios: median, q1, q3 (inclusive quartiles), min, max, ``rel_spread`` = (q3 - q1) /
    median (None with fewer than 2 pairs or a zero median), ``n``. Raises ``BenchError`` for an empty list."""
    if not pairs:
        raise BenchError("no measured pairs to summarise")
    med = statistics.median(pairs)
    if len(pairs) >= 2:
        q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
        rel = (q3 - q1) / med if med else None
    else:
        q1 = q3 = med
        rel = None
    return {"median": med, "q1": q1, "q3": q3, "min": min(pairs), "max": max(pairs), "rel_spread": rel,
            "n": len(pairs)}


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[list[int] | None]:
    """Run the block with ``threads`` torch intra-op threads, the process pinned to that many CPUs.

    The CPUs are the first ``threads`` of the process's current affinity set (Linux ``sched_setaffinity``;
    elsewhere only the thread count is set and None is yielded). Thread count and affinity are restored after.
    ``threads=None`` changes nothing and yields None. Raises ``BenchError`` for fewer than 1 thread or more
    threads than CPUs available.
    """
    if threads is None:
        yield None
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise BenchError(f"threads must be an integer >= 1, got {threads!r}")
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if affinity is not None and threads > len(affinity):
        raise BenchError(f"asked for {threads} threads but the process may run on {len(affinity)} CPU(s)")
    before = torch.get_num_threads()
    cpus = affinity[:threads] if affinity is not None else None
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
        yield cpus
    finally:
        torch.set_num_threads(before)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def bench(mod_model: nn.Module, dense_model: nn.Module, *, batch_size: int = 1, vision_tokens: int | None = None,
          text_tokens: int = 64, new_tokens: int = 16, warmup: int = 1, repeats: int = 5,
          device: str | torch.device | None = None, seed: int = 0, memory: bool = True, progress: bool = True,
          label: str | None = None, max_repeats: int | None = None, target_spread: float = 0.03,
          threads: int | None = None) -> BenchReport:
    """Measure ``mod_model`` against ``dense_model`` on the same prompts (see the module docstring).

    ``vision_tokens=None`` uses one typical image of the family (``efficiency.default_vision_tokens``).
    ``device``: move both models there first (default: where the MoD model is). ``repeats`` timed
    runs per model follow ``warmup`` untimed ones and, with ``memory``, one untimed peak-memory run per
    model. KV-cache bytes are read in every run, off the clock (the last timed run is reported).

    Runs come in alternating pairs (dense, MoD; then MoD, dense; ...) and each pair gives one MoD / dense
    ratio, so load that drifts over seconds hits both sides of a pair. ``max_repeats`` (> ``repeats``): keep
    adding pairs until the relative spread (q3 - q1) / median of the per-pair prefill ratios (and decode
    ratios) is at most ``target_spread``, or ``max_repeats`` pairs were run; ``report.converged`` says which.
    ``threads``: pin the process to that many CPUs and torch threads while measuring (``pinned_threads``).
    """
    with pinned_threads(threads) as cpus:
        report = _bench(mod_model, dense_model, batch_size=batch_size, vision_tokens=vision_tokens,
                        text_tokens=text_tokens, new_tokens=new_tokens, warmup=warmup, repeats=repeats, device=device,
                        seed=seed, memory=memory, progress=progress, label=label, max_repeats=max_repeats,
                        target_spread=target_spread)
    report.pinned_cpus = cpus
    report.allocator = allocator_mode()
    return report


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ALLOCATOR = {"mode": None}
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
              "MALLOC_ARENA_MAX")


def retain_freed_memory() -> str:
    """Make glibc's allocator keep freed memory for reuse, for the rest of this process (CPU timing).

    By default glibc gives every allocation above a moving threshold (128 KiB at start, raised up to 32 MiB as
    such blocks are freed) a mapping of its own, unmapped again when it is freed, and returns free memory at the
    top of its heap to the system above a trim threshold (128 KiB at start, then twice the mmap threshold). A
    forward pass then page-faults many of its activations in again on every run, and which model pays more
    depends on the sizes and order of its tensors, not on its FLOPs: measured on a 2-core machine (qwen2-0.5b
    shape, 2 threads, 729 + 64 tokens), about 270,000 minor faults per dense prefill and 110,000-125,000 per
    MoD prefill; in back-to-back runs of one script the MoD / dense prefill ratio was 0.58-0.60 with them and
    0.60-0.61 with freed memory retained; in the attention-scorer model the MLPs paid 40-70 ms per prefill
    more than the plain MoD model's on the same token counts.

    This sets, with ``mallopt(3)``: ``M_ARENA_MAX`` 1 (every thread allocates from the main heap; a thread's own
    arena would still map blocks over 64 MiB on their own), ``M_MMAP_MAX`` 0 (no allocation gets a mapping of
    its own) and ``M_TRIM_THRESHOLD`` -1 (glibc reads it as SIZE_MAX: free heap memory is never given back).
    Every glibc version accepts these. Once the heap has grown to what the runs need, buffers are reused with
    almost no page faults, as with a caching allocator (jemalloc / tcmalloc, or PyTorch's own on CUDA). Growing
    there can take a few runs (a benchmark's warm-up should cover them), and freed blocks that do not fit new
    requests are kept too, so the process can hold several times its peak live memory (4-5x seen with
    repeated 1.5 GiB tensors; about the same as the default for the 0.5B benchmark shapes). glibc's automatic
    threshold adjustment stays off for the rest of the process: this is for the start of a benchmark process
    (``--retain-memory`` of ``pmod-convert bench`` and ``benchmarks/``), not for an application that imports
    pmod_convert. Returns the mode recorded in ``BenchReport.allocator``. Raises ``BenchError`` where the C
    library is not glibc, where ``malloc`` is not glibc's (an ``LD_PRELOAD``ed jemalloc or tcmalloc: it already
    keeps freed memory), or where glibc refuses.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        raise BenchError(f"retaining freed memory needs glibc's mallopt; this is {platform.system()} "
                         f"{' '.join(platform.libc_ver()).strip() or 'without glibc'}: run without it")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    used = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    if used != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        raise BenchError("malloc here is not glibc's (an LD_PRELOADed allocator such as jemalloc or tcmalloc, which "
                         "already keeps freed memory): run without retaining freed memory")
    # M_TRIM_THRESHOLD -1 is SIZE_MAX once glibc converts it: trimming off (malloc.c: "-1 disables trimming")
    for name, param, value in (("M_ARENA_MAX", _M_ARENA_MAX, 1), ("M_MMAP_MAX", _M_MMAP_MAX, 0),
                               ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, -1)):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise BenchError(f"glibc refused mallopt({name}, {value}); run without retaining freed memory")
    _ALLOCATOR["mode"] = "glibc, freed memory retained"
    return _ALLOCATOR["mode"]


def allocator_mode() -> str:
    """How this process's CPU allocator treats freed memory, as recorded in reports.

    "glibc, freed memory retained" after ``retain_freed_memory``; else "default", naming the environment
    variables that change the same behaviour when they are set: ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_MAX_``, ``MALLOC_TOP_PAD_``, ``MALLOC_ARENA_MAX``, a
    ``GLIBC_TUNABLES`` with malloc settings, and ``LD_PRELOAD``.
    """
    if _ALLOCATOR["mode"] is not None:
        return _ALLOCATOR["mode"]
    env = [name for name in _GLIBC_ENV if os.environ.get(name)]
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        env.append("GLIBC_TUNABLES")
    if os.environ.get("LD_PRELOAD"):
        env.append("LD_PRELOAD")
    return "default" + (f" (environment sets {', '.join(env)})" if env else "")


def _bench(mod_model, dense_model, *, batch_size, vision_tokens, text_tokens, new_tokens, warmup, repeats, device,
           seed, memory, progress, label, max_repeats, target_spread) -> BenchReport:
    from .progress import progress as tqdm  # ETA on a terminal, periodic lines when piped

    from .costs import stored_scorers
    from .efficiency import TextShape, default_vision_tokens, estimate

    ratios = _check_pair(mod_model, dense_model)
    if vision_tokens is None:
        vision_tokens = default_vision_tokens(mod_model.config)
    check_workload(batch_size=batch_size, vision_tokens=vision_tokens, text_tokens=text_tokens,
                   new_tokens=new_tokens, warmup=warmup, repeats=repeats)
    adaptive = max_repeats is not None and max_repeats > repeats
    if max_repeats is not None and (not isinstance(max_repeats, int) or max_repeats > MAX_RUNS):
        raise BenchError(f"max_repeats must be an integer of at most {MAX_RUNS}, got {max_repeats!r}")
    if not (isinstance(target_spread, (int, float)) and math.isfinite(target_spread) and target_spread > 0):
        raise BenchError(f"target_spread must be a finite number > 0, got {target_spread!r}")
    device = _resolve_device(device, mod_model)
    mod_model.to(device).eval()
    dense_model.to(device).eval()
    inputs, plan = build_prompts(mod_model, batch_size=batch_size, vision_tokens=vision_tokens,
                                 text_tokens=text_tokens, seed=seed)
    dtype = next(dense_model.parameters()).dtype
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    models = {"dense": dense_model, "mod": mod_model}
    bar = tqdm(total=2 * (warmup + int(memory) + repeats), desc="bench", unit="run", disable=not progress, leave=False)
    timed: dict[str, list[_Call]] = {"dense": [], "mod": []}
    peaks: dict[str, int | None] = {"dense": None, "mod": None}
    try:
        for i in range(warmup):
            for name in _order(i):
                bar.set_description(f"warm-up {i + 1}/{warmup} {name}")
                _generate(models[name], inputs, new_tokens, device)
                bar.update()
        for name in ("dense", "mod") if memory else ():
            bar.set_description(f"peak memory {name}")
            peaks[name] = _memory_run(models[name], inputs, new_tokens, device).peak_memory_bytes
            bar.update()
        i = 0
        while i < repeats or (adaptive and i < max_repeats and not _settled(timed, target_spread)):
            for name in _order(i):
                bar.set_description(f"timed {i + 1}/{max(repeats, i + 1)} {name}")
                timed[name].append(_generate(models[name], inputs, new_tokens, device))
                bar.update()
            i += 1
    finally:
        bar.close()
    repeats = i
    pair_prefill, pair_decode = _pair_ratios(timed)
    spread = {"prefill_time": ratio_spread(pair_prefill)}
    if pair_decode:
        spread["decode_tokens_per_s"] = ratio_spread(pair_decode)

    runs = {name: _model_run(timed[name], peaks[name], batch_size, new_tokens) for name in models}
    element = torch.empty((), dtype=dtype).element_size()
    est = estimate(TextShape.from_config(mod_model.config), ratios, [plan.vision_tokens] * batch_size,
                   [plan.text_tokens] * batch_size, new_tokens=new_tokens, bytes_per_element=element,
                   scorers=stored_scorers(mod_model.config))
    d, m = runs["dense"], runs["mod"]
    report_ratios = {
        "prefill_time": _ratio(m.prefill_s_median, d.prefill_s_median),
        "decode_tokens_per_s": _ratio(m.decode_tokens_per_s, d.decode_tokens_per_s),
        "peak_memory": _ratio(m.peak_memory_bytes, d.peak_memory_bytes),
        "kv_bytes_prefill": _ratio(m.kv_bytes_prefill, d.kv_bytes_prefill),
        "kv_bytes_decode": _ratio(m.kv_bytes_decode, d.kv_bytes_decode),
        "estimated_prefill_flops": est.flops_ratio,
        "estimated_decode_flops": est.decode_flops_ratio,
        "estimated_kv_bytes": est.kv_ratio,
    }
    summary = {k: v for k, v in est.to_dict().items() if k != "layers"}
    summary["mod_cached_tokens_per_layer"] = [row.cached_tokens for row in est.layers]
    return BenchReport(
        model=label or type(mod_model).__name__, family=get_adapter(mod_model).family, device=str(device),
        device_name=_device_name(device), dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(),
        batch_size=batch_size, requested_vision_tokens=plan.requested_vision_tokens,
        requested_text_tokens=plan.requested_text_tokens, vision_tokens=plan.vision_tokens,
        text_tokens=plan.text_tokens, prompt_layout=plan.layout, new_tokens=new_tokens, warmup=warmup,
        repeats=repeats, layer_ratios=ratios, dense=d, mod=m, ratios=report_ratios,
        prefill_ratio_per_repeat=pair_prefill, decode_ratio_per_repeat=pair_decode, spread=spread,
        target_spread=target_spread if adaptive else None,
        converged=_settled(timed, target_spread) if adaptive else None,
        estimate=summary, memory_method=_memory_method(device, memory),
        notes=_notes(plan, new_tokens), versions=_versions(),
    )


def _memory_method(device: torch.device, measured: bool) -> str:
    if not measured:
        return "peak memory not measured (memory=False)"
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


def _pair_ratios(timed: dict[str, list[_Call]]) -> tuple[list[float], list[float]]:
    """Per alternating pair: MoD / dense prefill time, and dense / MoD decode time (= MoD / dense tokens/s)."""
    pairs = list(zip(timed["mod"], timed["dense"]))
    prefill = [m.prefill_s / d.prefill_s for m, d in pairs]
    decode = [d.decode_s / m.decode_s for m, d in pairs if m.decode_s and d.decode_s]
    return prefill, decode


def _settled(timed: dict[str, list[_Call]], target: float) -> bool:
    prefill, decode = _pair_ratios(timed)
    if len(prefill) < 2:
        return False
    spreads = [ratio_spread(r)["rel_spread"] for r in (prefill, decode) if r]
    return all(x is not None and x <= target for x in spreads)


def _order(i: int) -> tuple[str, str]:
    # Flip the order every repeat so slow drift (thermal, other jobs) hits both models alike.
    return ("dense", "mod") if i % 2 == 0 else ("mod", "dense")


def _model_run(calls: list[_Call], peak: int | None, batch_size: int, new_tokens: int) -> ModelRun:
    prefill = [c.prefill_s for c in calls]
    decode = [c.decode_s for c in calls] if new_tokens >= 2 else None
    rate = None
    if decode:
        rate = statistics.median(batch_size * (new_tokens - 1) / s for s in decode)
    return ModelRun(prefill_s=prefill, decode_s=decode, prefill_s_median=_median(prefill), decode_tokens_per_s=rate,
                    peak_memory_bytes=peak, kv_bytes_prefill=calls[-1].kv_bytes_prefill,
                    kv_bytes_decode=calls[-1].kv_bytes_decode, cached_tokens_per_layer=calls[-1].cached_tokens_prefill)


def _notes(plan: PromptPlan, new_tokens: int) -> list[str]:
    notes = [("prefill latency: generate's prompt forward pass (vision tower, embeddings, decoder, lm_head on the "
              "last position); the FLOPs estimate counts decoder layers only")]
    if new_tokens >= 2:
        notes += [("decode: greedy, EOS suppressed (min_new_tokens); tokens/s over the new_tokens - 1 steps after "
                   "the first token, counted over the whole batch"),
                  ("the cache after decode holds the prompt plus new_tokens - 1 tokens (the last token is never fed "
                   "back)")]
    if plan.vision_tokens != plan.requested_vision_tokens:
        notes.append(f"asked for {plan.requested_vision_tokens} vision tokens per row; the nearest this family's "
                     f"image geometry gives is {plan.vision_tokens} ({plan.layout})")
    if plan.text_tokens != plan.requested_text_tokens:
        notes.append(f"asked for {plan.requested_text_tokens} text tokens per row; the family's image markers "
                     f"alone need {plan.text_tokens}")
    if new_tokens == 0:
        notes.append("new_tokens = 0: prefill only (one token is produced to end the prefill)")
    return notes


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"pmod_convert": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": str(os.cpu_count())}


# --------------------------------------------------------------------------------------------------
# Model pairs: a named shape, or a checkpoint and its dense model
# --------------------------------------------------------------------------------------------------


def _share_weights_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters ARE the original's tensors (no weight memory)."""
    import copy

    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def pair_from_shape(name: str, recipe: Any = None, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", seed: int = 0) -> tuple[nn.Module, nn.Module, str]:
    """``(mod, dense, label)``: a random model of a named shape and its MoD conversion (``recipe``; default:
    the published schedule). Both share the same weight tensors, so memory holds one set of weights."""
    from .api import add_routers, resolve_dtype
    from .shapes import build_shape, get_shape

    shape = get_shape(name)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = torch.float32
    device = _resolve_device(device, None) if device is not None else torch.device("cpu")
    dense = build_shape(name, dtype=torch_dtype, device=device, seed=seed)
    mod = add_routers(_share_weights_copy(dense), recipe)
    return mod, dense, f"shape {shape.name}: {shape.summary} (random weights)"


def pair_from_checkpoint(checkpoint: str | Path, dense: str | Path | None = None, *,
                         dtype: str | torch.dtype | None = None,
                         device: str | torch.device = "cpu", allow_pickle: bool = False
                         ) -> tuple[nn.Module, nn.Module, str]:
    """``(mod, dense, label)``: a pmod checkpoint (``load_pretrained``) and its dense model: ``dense`` if given,
    else the same folder loaded with ``load_dense`` (routers ignored: the dense fallback). A finetune
    sidecar's LoRA is merged into the MoD model's weights, so it costs no extra time. ``allow_pickle``: accept
    ``pytorch_model.bin`` / ``adapter_model.bin`` weights in either folder (safetensors only by default)."""
    from .api import load_dense, load_pretrained

    device = _resolve_device(device, None) if device is not None else torch.device("cpu")
    device_map = str(device) if device.type == "cuda" else None
    mod = load_pretrained(checkpoint, dtype=dtype, device_map=device_map, allow_pickle=allow_pickle)
    if hasattr(mod, "merge_and_unload"):
        mod = mod.merge_and_unload()
    reference = load_dense(dense if dense is not None else checkpoint, dtype=dtype, device_map=device_map,
                           allow_pickle=allow_pickle)
    label = f"checkpoint {checkpoint} vs dense {dense if dense is not None else f'{checkpoint} (routers ignored)'}"
    return mod, reference, label


# --------------------------------------------------------------------------------------------------
# Output: JSON + PNG, human-readable lines
# --------------------------------------------------------------------------------------------------


def _fmt_bytes(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_flops(x: float) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("KFLOPs", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOPs"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def report_rows(report: BenchReport) -> list[tuple[str, str, str, str]]:
    """(metric, dense, MoD, MoD / dense) rows for a table."""
    d, m, r = report.dense, report.mod, report.ratios
    est = report.estimate

    def spread(values: list[float]) -> str:
        return f"{_fmt_s(statistics.median(values))} ({_fmt_s(min(values))}-{_fmt_s(max(values))})"

    rows = [
        ("prefill latency, median (min-max)", spread(d.prefill_s), spread(m.prefill_s), _fmt_ratio(r["prefill_time"])),
        ("prefill FLOPs, estimated (decoder)", _fmt_flops(est["dense_decoder_flops"]),
         _fmt_flops(est["mod_decoder_flops"]), _fmt_ratio(r["estimated_prefill_flops"])),
    ]
    if d.decode_tokens_per_s is not None:
        rows += [
            ("decode tokens/s, median", f"{d.decode_tokens_per_s:.2f}", f"{m.decode_tokens_per_s:.2f}",
             _fmt_ratio(r["decode_tokens_per_s"])),
            ("decode FLOPs, estimated", _fmt_flops(est["dense_decode_flops"]),
             _fmt_flops(est["mod_decode_flops"]), _fmt_ratio(r["estimated_decode_flops"])),
        ]
    rows += [
        ("peak memory above start (see note)", _fmt_bytes(d.peak_memory_bytes), _fmt_bytes(m.peak_memory_bytes),
         _fmt_ratio(r["peak_memory"])),
        ("KV cache after prefill, measured", _fmt_bytes(d.kv_bytes_prefill), _fmt_bytes(m.kv_bytes_prefill),
         _fmt_ratio(r["kv_bytes_prefill"])),
        ("KV cache after prefill, estimated", _fmt_bytes(est["dense_kv_bytes"]), _fmt_bytes(est["mod_kv_bytes"]),
         _fmt_ratio(r["estimated_kv_bytes"])),
    ]
    if d.kv_bytes_decode is not None and report.new_tokens >= 2:
        rows.append(("KV cache after decode, measured", _fmt_bytes(d.kv_bytes_decode), _fmt_bytes(m.kv_bytes_decode),
                     _fmt_ratio(r["kv_bytes_decode"])))
    return rows


def report_header(report: BenchReport) -> list[str]:
    n_mod = sum(1 for r in report.layer_ratios if r is not None)
    noise = report.prefill_ratio_per_repeat
    lines = [
        report.model,
        (f"{report.family} on {report.device} ({report.device_name}), {report.dtype}, {report.threads} thread(s); "
         f"{n_mod}/{len(report.layer_ratios)} MoD layers"),
        (f"batch {report.batch_size} x ({report.vision_tokens} vision + {report.text_tokens} text tokens; "
         f"{report.prompt_layout}), {report.new_tokens} new tokens; {report.warmup} warm-up + {report.repeats} "
         "timed runs per model, alternating"),
        "prefill time ratio of each alternating pair: " + ", ".join(f"{x:.3f}" for x in noise),
    ] + [_spread_line(name, report) for name in report.spread]
    if report.converged is not None:
        lines.append(f"repeated until every relative spread was <= {report.target_spread:.3f}: "
                     + ("yes" if report.converged else f"NO, stopped at {report.repeats} pairs; the ratios are noisy"))
    if report.pinned_cpus is not None:
        lines.append(f"pinned to CPU(s) {report.pinned_cpus}")
    lines.append(f"allocator: {report.allocator}")
    return lines


def _spread_line(name: str, report: BenchReport) -> str:
    sp = report.spread[name]
    what = {"prefill_time": "prefill time", "decode_tokens_per_s": "decode tokens/s"}.get(name, name)
    return (f"{what} MoD/dense over {sp['n']} pairs: median {sp['median']:.3f}, quartiles {sp['q1']:.3f}-{sp['q3']:.3f}, "
            f"min-max {sp['min']:.3f}-{sp['max']:.3f}, relative spread "
            + ("-" if sp["rel_spread"] is None else f"{sp['rel_spread']:.3f}"))


def format_report(report: BenchReport) -> str:
    """Plain-text version of the table (for scripts and logs)."""
    rows = [("metric", "dense", "MoD", "MoD/dense")] + report_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = report_header(report) + [""]
    for j, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if j == 0:
            lines.append("-" * (sum(widths) + 6))
    lines += ["", f"memory: {report.memory_method}"] + [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report.ratios
    bars = [("prefill time", r["prefill_time"], "measured"),
            ("prefill FLOPs", r["estimated_prefill_flops"], "estimated")]
    if r["decode_tokens_per_s"]:
        bars += [("decode time/token", 1.0 / r["decode_tokens_per_s"], "measured"),
                 ("decode FLOPs", r["estimated_decode_flops"], "estimated")]
    bars += [("peak memory", r["peak_memory"], "measured"), ("KV after prefill", r["kv_bytes_prefill"], "measured"),
             ("KV estimated", r["estimated_kv_bytes"], "estimated")]
    bars = [b for b in bars if b[1] is not None]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    colors = {"measured": "tab:blue", "estimated": "tab:gray"}
    ax.bar(range(len(bars)), [b[1] for b in bars], color=[colors[b[2]] for b in bars])
    for i, (_, value, _) in enumerate(bars):
        ax.text(i, value, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_ylim(0, max(1.1, 1.1 * max(b[1] for b in bars)))
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("MoD / dense (lower is better)")
    ax.set_title("blue: measured, gray: estimated", fontsize=9)
    repeats = range(1, len(report.dense.prefill_s) + 1)
    ax2.plot(repeats, report.dense.prefill_s, "o-", label="dense")
    ax2.plot(repeats, report.mod.prefill_s, "o-", label="MoD")
    ax2.set_xticks(list(repeats))
    ax2.set_xlabel("timed repeat")
    ax2.set_ylabel("prefill latency (s)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{report.family}, {report.device}, {report.dtype}: batch {report.batch_size} x "
                 f"({report.vision_tokens} vision + {report.text_tokens} text), {report.new_tokens} new tokens",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


_TEMP_NAME_EXTRA = 16  # bytes a temporary name adds to the report's: "." + "." + 8 random + ".tmp" (+ spare)


def check_report_path(path: str | Path) -> Path:
    """Refuse an output path a report cannot be written to, before anything is measured.

    ``path`` is the JSON file (a PNG goes beside it). Raises ``BenchError`` when it is a folder, ends in ``.png``,
    or fails ``checkpoint.check_writable`` (under a file instead of a folder, or its nearest existing folder not
    writable), when its name plus a temporary file's suffix is longer than the folder allows, or when the system
    refuses the name (too long, no permission). Returns it as a Path.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise BenchError(f"{path} is a folder; pass a file name such as report.json")
        if path.suffix.lower() == ".png":
            raise BenchError(f"{path}: pass the JSON file name (report.json); the PNG is written beside it")
        check_writable(path)
        parent = path.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        # the report goes through a temporary ".<name>.XXXXXXXX.tmp" beside it: that name must fit as well
        if len(path.name.encode()) + _TEMP_NAME_EXTRA > os.pathconf(parent, "PC_NAME_MAX"):
            raise BenchError(f"cannot write {path}: its name is too long for {parent} once written through a "
                             f"temporary file; use a name of at most "
                             f"{os.pathconf(parent, 'PC_NAME_MAX') - _TEMP_NAME_EXTRA} bytes")
    except CheckpointError as exc:
        raise BenchError(str(exc)) from None
    except OSError as exc:
        raise BenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def save_report(report: BenchReport, path: str | Path, *, plot: bool = True) -> list[Path]:
    """Write ``path`` (JSON) and, with ``plot``, a PNG beside it; both appear only when both are complete.

    Raises ``BenchError`` for a path ``check_report_path`` refuses or one the system will not let us write.
    """
    path = check_report_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create the folder of {path}: {exc.strerror or exc}") from None
    targets = [path] + ([path.with_suffix(".png")] if plot else [])
    temps = []
    try:
        for target in targets:
            handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(handle)
            temps.append(Path(name))
        temps[0].write_text(report.to_json())
        if plot:
            _plot(report, temps[1])
        mode = 0o666 & ~_umask()  # mkstemp makes 0600 files; a plain open() would honour the umask
        for tmp, target in zip(temps, targets):
            os.chmod(tmp, mode)
            os.replace(tmp, target)
    except OSError as exc:
        raise BenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return targets
