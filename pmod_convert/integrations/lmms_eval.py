"""The ``pmod`` model for lmms-eval: any pmod or dense checkpoint, evaluated on lmms-eval's tasks.

Registered through lmms-eval's out-of-tree plugin mechanism: with ``LMMS_EVAL_PLUGINS=pmod_convert``,
lmms-eval imports ``pmod_convert.models`` (whose ``AVAILABLE_MODELS`` maps ``pmod`` to
:class:`PmodLMM`) and adds ``pmod_convert/tasks`` to its task folders::

    LMMS_EVAL_PLUGINS=pmod_convert python -m lmms_eval --model pmod \\
        --model_args pretrained=llava-pmod --tasks gqa,textvqa_val --batch_size 8

The checkpoint is loaded with :func:`pmod_convert.load_pretrained` (routing, routers, finetune sidecar) or,
for a folder without a ``pmod`` section, :func:`pmod_convert.load_dense`; prompts are formatted with the
checkpoint's own processor and chat template (:class:`pmod_convert.data.SampleEncoder`, the same encoder
``pmod-convert eval`` uses), so both give the same answers to the same question.

* ``generate_until``: left-padded batches of ``batch_size`` requests with the same generation settings,
  greedy unless the task sets ``temperature`` > 0; the text is cut at the task's ``until`` strings.
* ``loglikelihood`` (multiple-choice tasks): the log-probability of each continuation after the chat-template
  prompt (generation prompt included), and whether greedy decoding would produce it, one request at a time.
* Efficiency: the number of vision and text tokens of every prompt is recorded; when lmms-eval finishes
  (``clean``), :func:`pmod_convert.efficiency.estimate` turns them into the estimated decoder-FLOPs and
  KV-cache ratios against the dense model on these real token counts, per task and overall. They are printed
  (one line per task on stderr) and logged into the run's results (``results["throughput"]``, keys
  ``avg_pmod_decoder_flops_ratio``, ``avg_pmod_kv_ratio`` and ``..._<task>`` per task; lmms-eval prefixes
  ``avg_``; each key is logged once, so the value is the ratio itself).
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from ..api import load_dense, load_pretrained, resolve_dtype
from ..checkpoint import read_config
from ..data import SampleEncoder
from ..mod.context import SCORE_QUERY_KWARG
from ..data.conversations import IMAGE_MARKER, split_markers
from ..devices import resolve_device, to_device
from ..costs import stored_scorers
from ..efficiency import TextShape, estimate
from ..errors import DataError, RecipeError
from ..evaluation.evaluate import generate_batch
from ..progress import Progress

# Keyword arguments lmms-eval itself passes to every model (``batch_size``, ``max_batch_size``, ``device``).
_LMMS_EVAL_ARGS = ("max_batch_size",)


class PmodLMM(lmms):
    """lmms-eval model over a pmod or dense checkpoint folder (``--model pmod --model_args pretrained=DIR``).

    Model arguments (``--model_args key=value,...``): ``pretrained`` (the folder, required), ``device``
    (cpu / cuda; default cuda when available), ``dtype`` (auto / float32 / float16 / bfloat16; default the
    checkpoint's), ``batch_size`` (requests generated together, left-padded; default 1, or ``--batch_size``),
    ``max_new_tokens`` (when a task sets none; default 128), ``device_map`` (``auto`` for accelerate placement
    across devices, replaces ``device``), ``allow_pickle`` (accept ``*.bin`` weights; default false).

    Raises:
        RecipeError: an unknown model argument or an invalid value.
        CheckpointError / UnsupportedArchitecture: as :func:`pmod_convert.load_pretrained`.
        DataError: the checkpoint has no usable processor or chat template.
    """

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | str = 128, device_map: str | None = None,
                 allow_pickle: bool | str = False, **kwargs: Any) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise RecipeError("the pmod lmms-eval model runs in one process (each process would answer every "
                              "request); run `python -m lmms_eval` once, with device_map=auto to spread a model over "
                              "several GPUs")
        unknown = sorted(k for k in kwargs if k not in _LMMS_EVAL_ARGS)
        if unknown:
            raise RecipeError(f"unknown --model_args for pmod: {', '.join(unknown)}; known: pretrained, device, dtype, "
                              "batch_size, max_new_tokens, device_map, allow_pickle")
        if str(batch_size).startswith("auto"):
            raise RecipeError("--batch_size auto is not supported by the pmod model; give a number (e.g. 8)")
        self.batch_size_per_gpu = _positive_int("batch_size", 1 if batch_size is None else batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.checkpoint = Path(str(pretrained))
        allow = str(allow_pickle).lower() in ("1", "true", "yes")
        resolve_dtype(dtype)  # one-line error for an unknown dtype before anything loads
        is_pmod = isinstance(read_config(self.checkpoint).get("pmod"), dict)
        self.encoder = SampleEncoder.from_pretrained(self.checkpoint)
        load = load_pretrained if is_pmod else load_dense
        if device_map is not None:
            model = load(self.checkpoint, dtype=dtype, device_map=device_map, allow_pickle=allow)
        else:
            run_device = resolve_device(device)
            # CPU is transformers' default placement; an explicit CPU map would make quantized models refuse.
            placement = {"": str(run_device)} if run_device.type != "cpu" else None
            model = load(self.checkpoint, dtype=dtype, device_map=placement, allow_pickle=allow)
        self._model = model.eval()
        self.is_pmod = is_pmod
        config = self._model.config
        self._shape = TextShape.from_config(config)
        pmod = getattr(config, "pmod", None)
        self._ratios = list(pmod["layer_ratios"]) if isinstance(pmod, dict) else [None] * self._shape.num_layers
        self._vision_ids = torch.tensor(sorted(self.encoder.vision_ids))
        self.token_counts: dict[str, list[tuple[int, int]]] = defaultdict(list)  # task -> (vision, text) per prompt
        self._scored_docs: set[tuple[str, Any]] = set()  # (task, doc_id) whose prompt is counted (multiple choice)
        self._generated = 0
        self._seconds = 0.0
        self.efficiency: dict[str, Any] | None = None

    # ---- what lmms-eval reads ------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    # ---- requests ------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        out = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            if v is None:
                continue
            if isinstance(v, (list, tuple)):
                out.extend(v)
            else:
                out.append(v)
        for v in out:
            if not hasattr(v, "convert"):
                raise DataError(f"task {task} doc {doc_id}: the pmod model takes images only, got "
                                f"{type(v).__name__} (video and audio are not supported)")
        return out

    def _count(self, task: str, input_ids: torch.Tensor) -> tuple[int, int]:
        n_vision = int(torch.isin(input_ids[0], self._vision_ids).sum())
        counts = (n_vision, int(input_ids.shape[-1]) - n_vision)
        self.token_counts[task].append(counts)
        return counts

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers to ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)`` requests, in order.

        Requests with equal generation settings are generated together in left-padded batches of
        ``batch_size`` (a padded batch answers as each request alone). Each answer stops at the first end of
        turn / EOS token, or at ``max_new_tokens`` (the task's, else the model argument's), and is cut at the
        first of the task's ``until`` strings. Returns lmms-eval ``GenerationResult``s carrying the prompt and
        answer token counts.
        """
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[repr(sorted((request.args[1] or {}).items()))].append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        with Progress(total=len(requests), desc="pmod generate", unit="request") as bar:
            for indices in groups.values():
                for first in range(0, len(indices), self.batch_size):
                    chunk = indices[first:first + self.batch_size]
                    self._generate_chunk([requests[i] for i in chunk], chunk, results)
                    bar.update(len(chunk))
        return results  # type: ignore[return-value]

    def _generate_chunk(self, requests: list[Instance], positions: list[int], results: list) -> None:
        gen_kwargs = dict(requests[0].args[1] or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new_tokens = _positive_int("max_new_tokens", gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        extra: dict[str, Any] = {"num_beams": int(gen_kwargs.pop("num_beams", 1) or 1)}
        if temperature > 0:
            extra.update(do_sample=True, temperature=temperature)
            if gen_kwargs.get("top_p") is not None:
                extra["top_p"] = float(gen_kwargs["top_p"])
        encoded, counts = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            inputs = self._encode(self._visuals(doc_to_visual, doc_id, task, split), context, task, doc_id)
            encoded.append(inputs)
            counts.append(self._count(task, inputs["input_ids"]))
        start = time.perf_counter()
        answers = generate_batch(self._model, self.encoder, encoded, max_new_tokens=max_new_tokens, **extra)
        self._seconds += time.perf_counter() - start
        for position, inputs, answer in zip(positions, encoded, answers):
            text = self.encoder.decode(answer)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self._generated += len(answer)
            results[position] = GenerationResult(text=text, token_counts=TokenCounts(
                input_tokens=int(inputs["input_ids"].shape[-1]), output_tokens=len(answer)))

    def _encode(self, images: list[Any], context: str, task: str, doc_id: Any) -> dict[str, torch.Tensor]:
        """Generation inputs of one request with the checkpoint's chat template (images first, or where the
        context's ``<image>`` markers put them)."""
        try:
            return self.encoder.encode_prompt(images, context)
        except DataError as exc:
            raise DataError(f"task {task} doc {doc_id}: {exc}") from None

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(loss, is_greedy)`` (inside lmms-eval ``GenerationResult``s, see below) for ``(context, continuation, doc_to_visual, doc_id, task, split)`` requests
        (``continuation`` may be lmms-eval's ``doc_to_target`` function).

        ``loss``: the mean negative log-likelihood of the continuation's tokens, in nats per token (float32
        softmax). lmms-eval 0.7 expects a loss here, not a log-probability: its multiple-choice scoring picks
        the option with the lowest value (``argmin``), as its LLaVA models return the cross-entropy loss.
        ``is_greedy``: greedy decoding from the prompt would produce exactly these tokens.
        The prompt is the chat-template rendering of the user turn (images and ``context``) with the generation
        prompt, exactly what ``generate_until`` sends; the continuation's tokens are those the tokenizer gives
        the rendered prompt followed by the continuation text, after the prompt's own tokens. Each pair is the
        ``text`` of a ``GenerationResult`` (with the prompt + continuation token count): lmms-eval 0.7.3 turns a
        plain tuple into its string representation, and hands a ``GenerationResult``'s payload over unchanged.

        Raises:
            DataError: the continuation is empty or changes how the prompt itself is tokenized.
        """
        out = []
        with Progress(total=len(requests), desc="pmod loglikelihood", unit="request") as bar:
            for request in requests:
                context, continuation, doc_to_visual, doc_id, task, split = request.args
                if callable(continuation):
                    continuation = continuation(self.task_dict[task][split][doc_id])
                loss, greedy, n_prompt = self._loglikelihood(context, str(continuation),
                                                             self._visuals(doc_to_visual, doc_id, task, split),
                                                             task, doc_id)
                # lmms-eval 0.7.3 turns a plain (float, bool) tuple into its string (unwrap_generation_output);
                # a GenerationResult hands its payload to the task unchanged.
                out.append(GenerationResult(text=(loss, greedy),  # type: ignore[arg-type]
                                            token_counts=TokenCounts(input_tokens=n_prompt, output_tokens=0)))
                bar.update(1)
        return out

    def _loglikelihood(self, context: str, continuation: str, images: list[Any], task: str,
                       doc_id: Any) -> tuple[float, bool, int]:
        prompt_inputs = self._encode(images, context, task, doc_id)
        if (task, doc_id) not in self._scored_docs:  # one prompt per question, however many options it has
            self._scored_docs.add((task, doc_id))
            self._count(task, prompt_inputs["input_ids"])
        continuation_ids = self._continuation_ids(images, context, continuation, task, doc_id)
        cont = torch.tensor([continuation_ids])
        inputs = dict(prompt_inputs)
        inputs["input_ids"] = torch.cat([prompt_inputs["input_ids"], cont], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        for key in ("mm_token_type_ids", "token_type_ids"):  # per-token extras: continuation tokens are text (0)
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], torch.zeros_like(cont)], dim=1)
        if self.is_pmod:  # the prompt alone ranks vision tokens (attention-scored layers), as when generating
            inputs[SCORE_QUERY_KWARG] = prompt_inputs["input_ids"].shape[1] - 1
        start = time.perf_counter()
        with torch.no_grad():
            logits = self._model(**to_device(inputs, self.device)).logits[0].float().cpu()
        self._seconds += time.perf_counter() - start
        n = cont.shape[1]
        predicting = logits[-n - 1:-1]  # the positions whose next token is a continuation token
        logprobs = torch.log_softmax(predicting, dim=-1)
        loss = -float(logprobs.gather(1, cont[0].unsqueeze(1)).mean())
        greedy = bool(torch.equal(predicting.argmax(dim=-1), cont[0]))
        return loss, greedy, int(inputs["input_ids"].shape[-1])

    def _continuation_ids(self, images: list[Any], context: str, continuation: str, task: str,
                          doc_id: Any) -> list[int]:
        encoder, tokenizer = self.encoder, self.encoder.tokenizer
        markers = context.count(IMAGE_MARKER)
        parts = split_markers(context) if markers else None
        messages = encoder.messages([("user", context.replace(IMAGE_MARKER, "").strip())], len(images), parts)
        prompt = encoder.render(messages, generation_prompt=True)
        bos = tokenizer.bos_token
        special = not (bos is not None and prompt.startswith(bos))
        whole = tokenizer(prompt + continuation, add_special_tokens=special)["input_ids"]
        head = tokenizer(prompt, add_special_tokens=special)["input_ids"]
        if whole[:len(head)] != head or len(whole) == len(head):
            raise DataError(f"task {task} doc {doc_id}: the continuation {continuation!r} is empty or merges with "
                            "the prompt's last token; the pmod model cannot score it")
        return whole[len(head):]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise RecipeError("the pmod lmms-eval model answers single-turn tasks only (generate_until); this task "
                          "needs multi-round generation")

    # ---- efficiency summary --------------------------------------------------------------------------
    def summarize_efficiency(self) -> dict[str, Any] | None:
        """Estimated decoder-FLOPs and KV-cache ratios (MoD vs dense, prefill) on the prompts seen so far.

        Returns ``{"overall": {...}, "tasks": {task: {...}}}`` with, in each, ``prompts``, ``vision_tokens``
        and ``text_tokens`` (totals, tokens), ``decoder_flops_ratio`` and ``kv_ratio`` (ratios of sums over the
        prompts, :func:`pmod_convert.efficiency.estimate`), or None before any request.
        """
        if not any(self.token_counts.values()):
            return None

        def one(counts: list[tuple[int, int]]) -> dict[str, Any]:
            cost = estimate(self._shape, self._ratios, [c[0] for c in counts], [c[1] for c in counts],
                            scorers=stored_scorers(self._model.config) if self.is_pmod else None)
            return {"prompts": len(counts), "vision_tokens": sum(c[0] for c in counts),
                    "text_tokens": sum(c[1] for c in counts), "decoder_flops_ratio": cost.decoder_flops_ratio,
                    "kv_ratio": cost.kv_ratio}

        every = [c for counts in self.token_counts.values() for c in counts]
        return {"overall": one(every), "tasks": {t: one(c) for t, c in self.token_counts.items() if c}}

    def clean(self) -> None:
        """Called by lmms-eval once every request has run: print and log the efficiency summary, then free."""
        summary = self.summarize_efficiency()
        if summary is not None and self.rank == 0:
            self.efficiency = summary
            kind = "MoD" if self.is_pmod else "dense"
            metrics: dict[str, Any] = {}
            for name, row in [("", summary["overall"])] + [(f"_{t}", r) for t, r in summary["tasks"].items()]:
                metrics[f"pmod_decoder_flops_ratio{name}"] = row["decoder_flops_ratio"]
                metrics[f"pmod_kv_ratio{name}"] = row["kv_ratio"]
            for task, row in summary["tasks"].items():
                print(f"pmod ({kind} {self.checkpoint.name}) {task}: {row['prompts']} prompts, "
                      f"{row['vision_tokens']} vision + {row['text_tokens']} text tokens; estimated decoder FLOPs "
                      f"{100 * row['decoder_flops_ratio']:.1f}% of dense, KV cache {100 * row['kv_ratio']:.1f}%",
                      file=sys.stderr, flush=True)
            speed = self._generated / self._seconds if self._seconds > 0 else 0.0
            log_metrics(total_elapsed_time=self._seconds, total_gen_tokens=self._generated, avg_speed=speed,
                        additional_metrics=metrics)
        super().clean()


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{name} must be a positive integer, got {value!r}") from None
    if not 1 <= number <= 1 << 16:
        raise RecipeError(f"{name} must be in 1..65536, got {value!r}")
    return number
