"""``pmod-convert calibrate``: fit the PRD schedule to a budget, pick layers from data, warm-start routers.

Order of work (nothing is written until the end, and then atomically):

1. read and encode the calibration samples; count each sample's vision and text tokens;
2. when the schedule does not depend on measurements (``shape="cosine"``), solve the budget right away so
   an impossible budget fails before any model is loaded;
3. run the dense model (eager attention) on the fit split with hooks: ARank, vision cosine,
   text-to-vision attention per layer, and the router warm-start statistics;
4. run the dense model on the held-out split and keep its next-token distributions;
5. solve the budget for the chosen layer selection and shape; fit the MoD layers' routers;
6. convert the model, compare zero routers and warm-started routers with the dense model on the held-out
   split, and write the checkpoint, ``calibration_report.json`` and the plots.
"""

from __future__ import annotations

import json
import logging
import random
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from ..progress import progress as tqdm  # ETA on a terminal, periodic lines when piped

from .. import __version__
from ..adapters import get_adapter
from ..api import add_pruning, add_routers, load_dense, save_pretrained
from ..checkpoint import atomic_folder, check_replaceable, read_config, require_safetensors, update_in_place
from ..data import DataError, SampleEncoder, model_inputs, read_samples, routed_model_inputs
from ..devices import resolve_device, to_device
from ..efficiency import CONVENTIONS, TextShape, vision_tower_flops_for_tokens
from ..errors import CheckpointError, PmodError, RecipeError
from ..mod import schedule as prd
from ..mod.layer import MoDLayerMixin
from ..mod.router import set_layer_scorers
from ..recipe import Recipe, RouterSettings, ScheduleSettings
from ..sidecar import SIDECAR_DIR
from ..mod.scoring import METHODS
from .budget import FAMILIES, BudgetSolution, Workload, measured_curve, solve_baseline_budget, solve_budget
from .observers import LayerMetrics, LayerObserver, vision_and_queries
from .report import REPORT_FILE, REPORT_FORMAT, clean, write_report
from .warm_start import (
    AgreementMeter,
    RouterFit,
    RouterFitter,
    order_candidates,
    select_routers,
    set_routers,
)

log = logging.getLogger("pmod_convert")

LAYER_SELECTIONS = ("prd", "arank")
SHAPES = ("cosine", "measured")
PROFILES = ("arank", "vision_change", "text_to_vision")
MIN_ANSWER_POSITIONS = 8  # router choice on answer-position KL from this many answer tokens on
VALIDATION_SHARE = 0.25  # of the fit split, used to choose between fitted and zero routers


@dataclass
class CalibrationResult:
    path: Path  # the checkpoint written (``out``, or the updated CHECKPOINT)
    schedule: ScheduleSettings
    ratios: list[float | None]
    report: dict


def calibrate(checkpoint: str | Path, data: str | Path, image_folder: str | Path | None = None, *,
              out: str | Path | None = None, target_flops: float | None = None, target_kv: float | None = None,
              schedule: str = "auto", layer_selection: str = "prd", shape: str = "cosine", scorer: str = "auto",
              warm_start: bool = True, samples: int = 128, holdout: float = 0.25, seed: int = 0,
              include_vision_tower: bool = False, skip_bad_rows: bool = False, overwrite: bool = False,
              max_ratio: float | None = None, min_ratio: float | None = None, profile: str = "arank",
              tolerance: float = 0.01, rank_rows: int = 64, rank_rtol: float = 1e-3, logit_std: float = 0.1,
              router_targets: tuple[str, ...] = ("text_attention", "key_attention"), dtype: str | None = None, device: str | None = None,
              progress: bool = True, method: str = "pmod", fastv_k: int | None = None,
              pdrop_stages: int | None = None, allow_pickle: bool = False,
              allow_outside_images: bool = False, convention: str = "exact") -> CalibrationResult:
    """Calibrate CHECKPOINT (dense, or a pmod checkpoint from add-routers) on a LLaVA-style dataset.

    Writes an MoD checkpoint to ``out`` (or updates ``checkpoint`` in place when ``out`` is None) whose
    schedule meets ``target_flops`` (decoder FLOPs ratio MoD / dense; with ``include_vision_tower`` the
    tower is added to both) or ``target_kv`` (KV-cache ratio) within ``tolerance`` on the calibration
    data's token counts, plus ``calibration_report.json`` and PNG plots.

    ``schedule``: a family of ``budget.FAMILIES``, or ``"auto"`` (the default): every schedule of
    ``SCHEDULE_SEARCH`` (with ``min_ratio``, when given, replacing theirs) is fitted to the budget and the one whose
    model agrees best with the dense model on the held-out rows is kept. ``scorer``: how MoD layers rank vision
    tokens: ``"router"`` (the linear routers, warm-started), ``"attention"`` (each layer's own text-to-vision
    attention, :func:`pmod_convert.mod.scoring.own_attention_scores`; its cost is counted in the budget) or
    ``"auto"`` (the default: both, chosen on the held-out rows with the schedule). The report's ``search`` section
    lists every candidate's ratios, the budget metric it reached, its held-out agreement and KL.

    ``layer_selection``: ``"prd"`` (the schedule's own depth rule) or ``"arank"`` (the lowest-ARank layers
    become MoD layers and get the lowest ratios). ``shape``: ``"cosine"`` (the family's curve) or
    ``"measured"`` (a monotone curve fitted to the ``profile`` signal). ``warm_start``: fit the routers
    (one least-squares fit per signal in ``router_targets``; a validation part of the fit split keeps,
    per layer, the fit or the zero router, whichever agrees better with the dense model); else zero
    routers. Same inputs and ``seed``: the same report.

    In place (``out`` None), only the files calibrate writes are replaced (each atomically, config.json last):
    subfolders, notes and other files of the checkpoint stay; a dense checkpoint is never converted in place.
    With ``out``, ``overwrite`` replaces only an earlier pmod-convert output, never CHECKPOINT or a folder
    holding it. ``allow_pickle``: accept ``pytorch_model.bin`` weights (safetensors only by default);
    ``allow_outside_images``: accept image paths that lead outside ``image_folder`` (refused by default).

    ``convention``: how the budget counts FLOPs and KV: ``"exact"`` (every decoder linear plus the causal
    attention scores, KV over all tokens) or ``"paper"`` (the p-MoD paper's count: decoder linears without the
    quadratic attention term, ``lm_head`` on every prompt position, KV over vision tokens only; see
    ``pmod_convert.efficiency.estimate``). Recorded in the report's ``budget`` section.

    ``method``: ``"pmod"`` (routers, everything above), or a training-free pruning baseline on the same engine:
    ``"fastv"`` (Chen et al. 2024: after layer ``fastv_k`` drop the least-attended share R of the vision tokens;
    the solver picks R; ``fastv_k`` default the paper's 2, lowered when the budget needs it) or ``"pdrop"``
    (Xing et al. 2024: ``pdrop_stages`` stages, default the paper's 4, each keeping ``lambda`` of the remaining
    vision tokens; the solver picks lambda). Baselines ignore the schedule, layer-selection, shape, profile and
    warm-start options, load CHECKPOINT's dense weights (any routers in it are dropped) and write a checkpoint
    whose ``config.json`` ``pmod`` section records ``method``, ``score_layers`` and the per-layer ratios.

    Raises:
        RecipeError: invalid options or budget. DataError: unusable calibration data.
        CheckpointError: CHECKPOINT is missing / corrupt / holds a sidecar, is dense and no ``out`` is given,
            or ``out`` exists and may not be replaced.
        UnsupportedArchitecture: CHECKPOINT is not a supported family.
    """
    if method not in METHODS:
        raise RecipeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if convention not in CONVENTIONS:
        raise RecipeError(f"--convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if method == "pmod" and (fastv_k is not None or pdrop_stages is not None):
        raise RecipeError("--fastv-k / --pdrop-stages apply to --method fastv / pdrop only")
    if method != "pmod" and scorer != "auto":
        raise RecipeError(f"--scorer applies to --method pmod only; {method} ranks by its scoring layer's attention")
    _check_options(schedule, layer_selection, shape, profile, samples, holdout, seed)
    if scorer not in SCORER_CHOICES:
        raise RecipeError(f"--scorer must be one of {', '.join(SCORER_CHOICES)}, got {scorer!r}")
    device = resolve_device(device) if device is not None else None
    if (target_flops is None) == (target_kv is None):
        raise RecipeError("give exactly one budget: --target-flops R (decoder FLOPs MoD / dense) or --target-kv R "
                          "(KV-cache MoD / dense)")
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    adapter = get_adapter(config)
    require_safetensors(checkpoint, allow_pickle)  # before any data is read or encoded
    if (checkpoint / SIDECAR_DIR).exists():
        raise CheckpointError(f"{checkpoint} holds a finetune sidecar ({SIDECAR_DIR}/); calibrate before finetuning, "
                              "or export/merge the finetuned model first")
    dest = Path(out) if out is not None else checkpoint
    in_place = dest.resolve() == checkpoint.resolve()
    if in_place and not isinstance(config.get("pmod"), dict):
        raise CheckpointError(f"{checkpoint} is a dense checkpoint and calibrate would convert it in place; pass "
                              "--out NEW_FOLDER to write the calibrated copy there")
    if not in_place and dest.exists() and not overwrite:
        raise CheckpointError(f"{dest} already exists; choose another --out or pass --overwrite")
    if not in_place:
        check_replaceable(dest, protect=(checkpoint,))
    router = _router_settings(config)
    min_ratio_given = min_ratio is not None
    max_ratio = prd.DEFAULT_MAX_RATIO if max_ratio is None else float(max_ratio)
    min_ratio = prd.DEFAULT_MIN_RATIO if min_ratio is None else float(min_ratio)
    text_shape = TextShape.from_config(config)
    num_layers = text_shape.num_layers
    torch.manual_seed(seed)
    if method != "pmod":
        return _calibrate_baseline(
            checkpoint, data, image_folder, dest=dest, in_place=in_place, overwrite=overwrite, method=method,
            target_flops=target_flops, target_kv=target_kv, fastv_k=fastv_k, pdrop_stages=pdrop_stages,
            samples=samples, seed=seed, skip_bad_rows=skip_bad_rows, include_vision_tower=include_vision_tower,
            tolerance=tolerance, dtype=dtype, progress=progress, text_shape=text_shape, config=config,
            allow_pickle=allow_pickle, allow_outside_images=allow_outside_images, convention=convention)

    # 1. data
    dataset = read_samples(data, image_folder, skip_bad_rows=skip_bad_rows, allow_outside_images=allow_outside_images)
    encoder = SampleEncoder.from_pretrained(checkpoint)
    items, ids, skipped = _encode(dataset, encoder, samples, seed, skip_bad_rows, progress)
    vision_ids = adapter.vision_token_ids(encoder.config)
    n_hold = 0 if holdout == 0 else max(1, round(holdout * len(items)))
    if len(items) - n_hold < 1:
        raise DataError(f"{len(items)} usable calibration sample(s) cannot be split into fit and held-out parts "
                        f"(--holdout {holdout}); add samples or pass --holdout 0")
    held, fit = list(range(n_hold)), list(range(n_hold, len(items)))
    # Routers are fitted on ``train``; ``val`` decides per layer between the fit and the zero router.
    n_val = round(VALIDATION_SHARE * len(fit)) if warm_start and len(fit) >= 4 else 0
    val, train = fit[:n_val], set(fit[n_val:])
    workload = _workload(items, vision_ids, text_shape, config if include_vision_tower else None, convention)
    budget_args = dict(target_flops=target_flops, target_kv=target_kv, max_ratio=max_ratio, tolerance=tolerance)
    searched = _search_space(schedule, scorer, min_ratio, min_ratio_given, shape, layer_selection, num_layers)

    # 2. a budget that needs no measurement fails here, before the model is loaded
    fit_layers = None
    if shape == "cosine":
        _solve_all(searched, workload, budget_args)
        if layer_selection == "prd":
            fit_layers = {i for c in searched if c.solution is not None and c.scorer == "router"
                          for i, r in enumerate(c.solution.ratios) if r is not None}

    # 3. measurements on the fit split
    model = load_dense(checkpoint, dtype=dtype, attn_implementation="eager", allow_pickle=allow_pickle)
    if device is not None:
        model.to(device)
    run_device = next(model.parameters()).device
    hidden = adapter.text_config(model.config).hidden_size
    fitter = RouterFitter(hidden, targets=router_targets, logit_std=logit_std) if warm_start else None
    observer = LayerObserver(model, rank_rows=rank_rows, rank_rtol=rank_rtol, sink=fitter, sink_layers=fit_layers)
    with observer:
        for i in tqdm(fit, desc="measuring layers", disable=not progress, leave=False):
            if fitter is not None:
                fitter.enabled = i in train
            observer.observe(to_device(model_inputs(items[i]), run_device))
    metrics = observer.metrics()

    # 4. the dense reference on the validation and held-out splits
    _use_attention(model, "sdpa")
    val_refs = _references(model, items, val, vision_ids, run_device, progress, "dense reference (validation)")
    references = _references(model, items, held, vision_ids, run_device, progress, "dense reference (held-out)")

    # 5. schedules (each search candidate fitted to the budget)
    profile_values = _profile(metrics, profile) if (shape == "measured" or layer_selection == "arank") else None
    order = None
    if layer_selection == "arank":
        arank = [m.arank_fraction for m in metrics]
        order = sorted(range(num_layers), key=lambda i: (-arank[i], i))  # least redundant first
    curve = None
    if shape == "measured":
        curve = measured_curve(profile_values, order if order is not None else list(range(num_layers)))
    if shape == "measured" or layer_selection == "arank":
        _solve_all(searched, workload, dict(budget_args, curve=curve, order=order))

    # 6. convert every layer any candidate routes; per candidate choose routers (or the attention scorer) on
    # validation; keep the candidate closest to the dense model; rebuild it alone; compare on held-out; write
    union = sorted({i for c in searched if c.solution is not None for i, r in enumerate(c.solution.ratios)
                    if r is not None})
    superset = [0.5 if i in union else None for i in range(num_layers)]
    add_routers(model, Recipe(router=router, schedule=ScheduleSettings(kind="explicit", ratios=superset),
                              dtype=dtype or "auto").validate())
    layers = adapter.decoder_layers(model)
    seen: dict[tuple, int] = {}
    for index, c in enumerate(searched):
        if c.solution is None:
            continue
        same = seen.setdefault((tuple(c.solution.ratios), c.scorer), index)
        if same != index:  # e.g. "first layers dense" when the curve keeps them dense anyway: measured once
            c.same_as = same
            continue
        try:
            _apply_candidate(layers, c, {}, adapter)
        except PmodError as exc:  # this family's layers cannot run the attention scorer
            if scorer != "auto":
                raise RecipeError(f"--scorer {c.scorer}: {exc}") from None
            c.solution, c.error = None, str(exc)
            continue
        mod_layers = [i for i, r in enumerate(c.solution.ratios) if r is not None]
        if c.scorer == "router":
            candidates = {t: {i: fitter.solve(i, t) for i in mod_layers} for t in router_targets} if fitter else {}
            if candidates:
                candidates.update(order_candidates(candidates[router_targets[0]], hidden, logit_std))
            c.fits, c.choices = _choose_routers(model, layers, items, mod_layers, candidates, val_refs, run_device,
                                                progress)
            _apply_candidate(layers, c, c.fits, adapter)
        # The candidates are compared on the held-out rows, not on the validation rows their routers were chosen
        # on (a router chosen among many on a few rows looks better there than it is).
        if references or val_refs:
            c.validation = _agreement(model, items, references or val_refs, run_device, False, "")
            c.validation_kl = _selection_kl(c.validation)
    usable = [c for c in searched if c.solution is not None and c.same_as is None]
    if not usable:
        raise RecipeError("no schedule of the search can be used: " + "; ".join(
            f"{c.kind}/{c.scorer}: {c.error}" for c in searched if c.error)[:600])
    if len(usable) > 1 and all(c.validation_kl is None for c in usable):
        log.warning("calibrate: no held-out or validation rows to compare the %d search candidates on; keeping the "
                    "first (%s, %s). Give more samples or --holdout > 0, or fix --schedule and --scorer",
                    len(usable), usable[0].kind, usable[0].scorer)
    chosen = min(usable, key=lambda c: (c.validation_kl if c.validation_kl is not None else 0.0))
    chosen.chosen = True
    solution, fits, choices = chosen.solution, chosen.fits, chosen.choices
    del model  # rebuilt with the chosen schedule's MoD layers only (the search converted their union)
    model = load_dense(checkpoint, dtype=dtype, allow_pickle=allow_pickle)
    if device is not None:
        model.to(device)
    recipe = Recipe(router=router, schedule=solution.settings, dtype=dtype or "auto").validate()
    add_routers(model, recipe)
    layers = adapter.decoder_layers(model)
    agreement = {}
    if references:  # the fresh conversion: zero routers, ranked by them (the first k vision tokens)
        agreement["zero_routers"] = _agreement(model, items, references, run_device, progress, "zero routers")
    # what is saved (save_pretrained records the routers' position priors and scorers)
    _apply_candidate(layers, chosen, fits if warm_start else {}, adapter)
    if references and (warm_start or chosen.scorer != "router"):
        agreement["warm_start"] = _agreement(model, items, references, run_device, progress, "warm start")

    report = clean(_report(
        checkpoint=checkpoint, data=data, ids=ids, fit=fit, held=held, skipped=dataset.skipped + skipped,
        workload=workload, solution=solution, metrics=metrics, profile_values=profile_values, order=order,
        fits=fits, choices=choices, val=val, agreement=agreement, seed=seed, tolerance=tolerance, router=router,
        searched=searched,
        options=dict(schedule=schedule, scorer=scorer, layer_selection=layer_selection, shape=shape, profile=profile,
                     warm_start=warm_start, include_vision_tower=include_vision_tower, max_ratio=max_ratio,
                     min_ratio=min_ratio, samples=samples, holdout=holdout, rank_rows=rank_rows,
                     rank_rtol=rank_rtol, logit_std=logit_std, router_targets=list(router_targets))))
    if in_place:  # replace only what an earlier save wrote: other shards of the weights may disappear
        earlier = [p.name for p in dest.glob("model*.safetensors")] + ["model.safetensors.index.json"]
        writer = update_in_place(dest, written=earlier)
    else:
        writer = atomic_folder(dest, overwrite=overwrite, protect=(checkpoint,))
    with writer as tmp:
        # in place, the checkpoint's processor files stay where they are (only written files are replaced)
        save_pretrained(model, tmp, source=None if in_place else checkpoint, recipe=recipe, overwrite=True)
        write_report(tmp, report)
    return CalibrationResult(path=dest, schedule=solution.settings, ratios=solution.ratios, report=report)


def _calibrate_baseline(checkpoint: Path, data, image_folder, *, dest: Path, in_place: bool, overwrite: bool,
                        method: str, target_flops, target_kv, fastv_k, pdrop_stages, samples: int, seed: int,
                        skip_bad_rows: bool, include_vision_tower: bool, tolerance: float, dtype, progress: bool,
                        text_shape: TextShape, config: dict, allow_pickle: bool = False,
                        allow_outside_images: bool = False, convention: str = "exact") -> CalibrationResult:
    """FastV / PyramidDrop: solve the budget on the data's token counts, convert, write (no measurement pass)."""
    adapter = get_adapter(config)
    dataset = read_samples(data, image_folder, skip_bad_rows=skip_bad_rows, allow_outside_images=allow_outside_images)
    encoder = SampleEncoder.from_pretrained(checkpoint)
    items, ids, skipped = _encode(dataset, encoder, samples, seed, skip_bad_rows, progress)
    workload = _workload(items, adapter.vision_token_ids(encoder.config), text_shape,
                         config if include_vision_tower else None, convention)
    solution = solve_baseline_budget(workload, method, target_flops=target_flops, target_kv=target_kv, k=fastv_k,
                                     stages=pdrop_stages, tolerance=tolerance)
    model = load_dense(checkpoint, dtype=dtype, allow_pickle=allow_pickle)
    add_pruning(model, method, solution.ratios)
    est = solution.estimate
    n = len(workload.n_vision)
    report = clean({
        "format": REPORT_FORMAT,
        "pmod_convert_version": __version__,
        "method": method,
        "checkpoint": str(checkpoint),
        "data": str(data),
        "seed": seed,
        "samples": {"total": n, "skipped_rows": dataset.skipped + skipped, "ids": ids},
        "tokens": {"vision_per_sample": sum(workload.n_vision) / n, "text_per_sample": sum(workload.n_text) / n,
                   "n_vision": workload.n_vision, "n_text": workload.n_text},
        "budget": {"metric": solution.metric, "convention": workload.convention, "target": solution.target,
                   "achieved": solution.achieved,
                   "tolerance": tolerance, "reachable": list(solution.reachable), "parameter": solution.parameter,
                   "value": solution.value, "fastv_k": solution.k, "fastv_drop_rate": solution.drop_rate,
                   "pdrop_boundaries": solution.boundaries if method == "pdrop" else None,
                   "notes": solution.notes},
        "estimate": _estimate_dict(est),
        "layer_ratios": solution.ratios,
        "score_layers": solution.score_layers,
        "options": {"include_vision_tower": include_vision_tower, "samples": samples},
    })
    if in_place:
        earlier = [p.name for p in dest.glob("model*.safetensors")] + ["model.safetensors.index.json"]
        writer = update_in_place(dest, written=earlier)
    else:
        writer = atomic_folder(dest, overwrite=overwrite, protect=(checkpoint,))
    with writer as tmp:
        save_pretrained(model, tmp, source=None if in_place else checkpoint, overwrite=True)
        (Path(tmp) / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return CalibrationResult(path=dest, schedule=ScheduleSettings(kind="explicit", ratios=list(solution.ratios)),
                             ratios=solution.ratios, report=report)


# ---- helpers --------------------------------------------------------------------------------------------
def _encode(dataset, encoder, samples: int, seed: int, skip_bad_rows: bool, progress: bool):
    """A seeded random subset of ``samples`` rows, encoded; returns (items, sample ids, rows skipped)."""
    chosen = list(range(len(dataset.samples)))
    random.Random(seed).shuffle(chosen)
    items, ids, skipped = [], [], 0
    for index in tqdm(chosen[:samples], desc="encoding samples", disable=not progress, leave=False):
        sample = dataset.samples[index]
        try:
            items.append(encoder.encode(sample))
            ids.append(sample.id)
        except DataError as exc:
            if not skip_bad_rows:
                raise DataError(f"{dataset.source} row {sample.row} (id {sample.id!r}): {exc}; fix the row or pass "
                                "--skip-bad-rows") from None
            skipped += 1
    if not items:
        raise DataError(f"none of the chosen rows of {dataset.source} could be encoded ({skipped} skipped)")
    return items, ids, skipped


def _workload(items: list[dict], vision_ids: list[int], shape: TextShape, tower_config: dict | None,
              convention: str = "exact") -> Workload:
    """Per-sample vision / text token counts (and vision-tower FLOPs when ``tower_config`` is given)."""
    n_vision, n_text, runs = [], [], []
    for item in items:
        vision, _ = vision_and_queries(item["input_ids"][0], vision_ids, item.get("attention_mask"))
        n_vision.append(int(vision.sum()))
        n_text.append(int(item["attention_mask"].sum()) - n_vision[-1])
        runs.append(_runs(vision))
    if sum(n_vision) == 0:
        raise DataError(f"none of the {len(items)} calibration samples has an image; MoD routes vision tokens, "
                        "so calibration needs samples with images")
    vision_flops: list[float] | float = 0.0
    if tower_config is not None:
        vision_flops = [float(vision_tower_flops_for_tokens(tower_config, r)) for r in runs]
    return Workload(shape, n_vision, n_text, vision_flops, convention)


SCORER_CHOICES = ("auto", "router", "attention")
# What ``schedule="auto"`` tries: (family, min_ratio or None for --min-ratio / the default, whether the first
# ``dense_first_layers`` stay dense whatever the curve says). Measured on the accuracy benchmark's zoo models at
# 0.55 decoder FLOPs (test accuracy, routers chosen per layer): no one shape wins everywhere: shiftedcos 0.15 is
# best on object s1 (90.5) and worst on oddone s4 (65.0), where shiftedcos 0.3 gives 86.3 and a constant 0.5
# 85.5; shiftedlinear is best on oddone s1 (95.3). With the attention scorer's cost, the curves route layer 0
# (e.g. [0.80, 0.55, 0.15, 0.15]: 86.5 on oddone s0, against 93.5 with layer 0 dense at no scorer cost), hence
# the candidates that keep the first layers dense. docs/baselines.md has the tables.
SCHEDULE_SEARCH = (("shiftedcos", None, False), ("shiftedlinear", None, False), ("shiftedcos", 0.3, False),
                   ("shiftedcos", None, True), ("constant", None, True))


def dense_first_layers(num_layers: int) -> int:
    """How many first layers the "first layers dense" candidates of the search keep dense: an eighth of the
    depth, at least one (4 of 32 layers; FastV prunes after layer 2, PyramidDrop after layer 8 of 32)."""
    return max(1, num_layers // 8)


@dataclass
class Candidate:
    """One schedule x scorer of the calibration search and what was measured for it."""

    kind: str
    min_ratio: float
    scorer: str  # "router" | "attention"
    dense_first: int = 0  # the first layers kept dense whatever the curve says
    solution: BudgetSolution | None = None
    error: str | None = None  # why the budget could not be met with this schedule
    fits: dict = field(default_factory=dict)
    choices: list = field(default_factory=list)
    validation: dict | None = None
    validation_kl: float | None = None
    chosen: bool = False
    same_as: int | None = None  # index of an earlier candidate with the same ratios and scorer (not re-measured)

    def to_dict(self) -> dict:
        sol = self.solution
        return {"schedule": self.kind, "min_ratio": self.min_ratio, "dense_first": self.dense_first,
                "scorer": self.scorer,
                "ratios": None if sol is None else sol.ratios,
                "achieved": None if sol is None else sol.achieved, "error": self.error,
                "validation_kl": self.validation_kl, "validation": self.validation, "chosen": self.chosen,
                "same_as": self.same_as,
                "routers": {str(i): f.target for i, f in self.fits.items()} if self.fits else None}


def _search_space(schedule: str, scorer: str, min_ratio: float, min_ratio_given: bool, shape: str,
                  layer_selection: str, num_layers: int) -> list[Candidate]:
    """The candidates of the calibration search (see ``calibrate``'s ``schedule`` / ``scorer``)."""
    if schedule == "auto":
        shapes = [(kind, min_ratio if (min_ratio_given or m is None) else m,
                   dense_first_layers(num_layers) if first else 0) for kind, m, first in SCHEDULE_SEARCH]
        if shape != "cosine" or layer_selection != "prd":  # only the curve itself: no constant, no forced layers
            shapes = [(kind, m, 0) for kind, m, first in shapes if kind != "constant" and not first]
        shapes = list(dict.fromkeys(shapes))
    else:
        shapes = [(schedule, min_ratio, 0)]
    scorers = ["router", "attention"] if scorer == "auto" else [scorer]
    return [Candidate(kind, m, s, first) for s in scorers for kind, m, first in shapes]


def _solve_all(searched: list[Candidate], workload: Workload, budget_args: dict) -> None:
    """Fit every candidate's schedule to the budget; raise the first error when none can meet it."""
    first: RecipeError | None = None
    for c in searched:
        try:
            c.solution = solve_budget(dataclasses.replace(workload, scorer=c.scorer), kind=c.kind,
                                      min_ratio=c.min_ratio, dense_first=c.dense_first, **budget_args)
        except RecipeError as exc:
            c.solution, c.error = None, str(exc)
            first = first or exc
            continue
        losing = [row.layer for row in c.solution.estimate.layers
                  if row.ratio is not None and row.mod_flops > row.dense_flops] if c.scorer == "attention" else []
        if losing:  # the scorer would cost more than the layer saves (few vision tokens, ratio near 1)
            c.error = (f"with the attention scorer layers {losing} would cost more than their dense FLOPs at this "
                       "budget")
            c.solution = None
            first = first or RecipeError(c.error)
    if all(c.solution is None for c in searched):
        raise first


def _apply_candidate(layers, candidate: Candidate, fits: dict, adapter) -> None:
    """Set the converted ``layers`` to ``candidate``: its ratios (1.0 on converted layers it keeps dense, with a
    zero router that is exactly the dense layer), routers ``fits`` (absent: zero) and scorers."""
    ratios = candidate.solution.ratios
    for index, layer in enumerate(layers):
        if isinstance(layer, MoDLayerMixin):
            layer.pmod_ratio = 1.0 if ratios[index] is None else float(ratios[index])
    set_routers(layers, fits)
    set_layer_scorers(layers, [None if r is None else candidate.scorer for r in ratios],
                      norm_name=adapter.input_norm, rope=adapter.attention_rope)


def _selection_kl(result: dict) -> float:
    """What the search minimises: KL to the dense model at answer positions, or at every text position after
    the image when the validation rows hold fewer than ``MIN_ANSWER_POSITIONS`` answer tokens."""
    return result["answer_kl"] if result["answer_positions"] >= MIN_ANSWER_POSITIONS else result["kl"]


def _choose_routers(model, layers, items, mod_layers, candidates, val_refs, device, progress):
    """Per MoD layer a fitted router, an order-prior router or the zero router, chosen on the validation
    references by KL to the dense model at answer positions (at every text position after the first vision
    token when the validation rows hold fewer than ``MIN_ANSWER_POSITIONS`` answer tokens; see
    ``select_routers``); without validation samples, the first target's fits."""
    if not candidates:
        return {}, []
    if not val_refs:
        return next(iter(candidates.values())), []
    trials = 1 + len(candidates) + len(mod_layers) * (len(candidates) + 1)
    bar = tqdm(total=trials, desc="choosing routers (validation)",
               disable=not progress, leave=False)

    def validation_kl(trial: dict[int, RouterFit]) -> float:
        set_routers(layers, trial)
        bar.update(1)
        # Answer positions decide (what a user's accuracy depends on); with too few of them, every text position.
        return _selection_kl(_agreement(model, items, val_refs, device, False, ""))

    try:
        return select_routers(mod_layers, candidates, validation_kl)
    finally:
        bar.close()


def _check_options(schedule: str, layer_selection: str, shape: str, profile: str, samples: int, holdout: float,
                   seed: int) -> None:
    if schedule != "auto" and schedule not in FAMILIES:
        raise RecipeError(f"--schedule must be auto or one of {', '.join(FAMILIES)} for calibration, got {schedule!r}")
    if layer_selection not in LAYER_SELECTIONS:
        raise RecipeError(f"--layer-selection must be one of {', '.join(LAYER_SELECTIONS)}, got {layer_selection!r}")
    if shape not in SHAPES:
        raise RecipeError(f"--shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if profile not in PROFILES:
        raise RecipeError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if schedule == "constant" and (layer_selection != "prd" or shape != "cosine"):
        raise RecipeError("a constant schedule keeps the same ratio in every layer, so --layer-selection arank and "
                          "--shape measured do not apply; use --schedule shiftedcos or shiftedlinear with them")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise RecipeError(f"--samples must be a positive integer, got {samples!r}")
    if not 0 <= holdout < 1:
        raise RecipeError(f"--holdout must be a fraction in [0, 1), got {holdout!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RecipeError(f"--seed must be an integer, got {seed!r}")


def _router_settings(config: dict) -> RouterSettings:
    pmod = config.get("pmod")
    if isinstance(pmod, dict) and isinstance(pmod.get("router"), dict):
        try:
            return Recipe.from_dict({"router": pmod["router"]}, where="config.json pmod").router
        except RecipeError as exc:
            raise CheckpointError(f"the pmod section of the checkpoint's config.json is invalid: {exc}") from None
    return RouterSettings()


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the contiguous runs of True (one per image for families that separate images)."""
    runs, count = [], 0
    for value in mask.tolist():
        if value:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    if count:
        runs.append(count)
    return runs


def _use_attention(model: torch.nn.Module, implementation: str) -> None:
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError, AttributeError) as exc:  # keep eager: slower, same results
        log.info("keeping eager attention for evaluation (%s)", exc)


def _eval_positions(item: dict[str, torch.Tensor], vision_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text positions after the first vision token, and among them those that predict an answer token."""
    _, positions = vision_and_queries(item["input_ids"][0], vision_ids, item.get("attention_mask"))
    labels = item.get("labels")
    answer = torch.zeros_like(positions)
    if labels is not None:
        answer[:-1] = labels[0, 1:] != -100
    return positions, answer[positions]


def _references(model, items, indices, vision_ids, device, progress: bool, label: str) -> list:
    """Dense next-token log-probs at the evaluated positions of each sample (samples without any skipped)."""
    references = []
    with torch.no_grad():
        for i in tqdm(indices, desc=label, disable=not progress, leave=False):
            positions, answer = _eval_positions(items[i], vision_ids)
            if not bool(positions.any()):
                continue
            logits = model(**to_device(model_inputs(items[i]), device), use_cache=False).logits[0]
            references.append((i, positions, answer, torch.log_softmax(logits[positions].float(), -1).cpu()))
    return references


def _agreement(model, items, references, device, progress: bool, label: str) -> dict:
    meter = AgreementMeter()
    with torch.no_grad():
        for i, positions, answer, reference in tqdm(references, desc=f"held-out: {label}", disable=not progress,
                                                    leave=False):
            logits = model(**to_device(routed_model_inputs(items[i]), device), use_cache=False).logits[0]
            meter.add(reference, logits[positions].float().cpu(), answer)
    return meter.result().to_dict()


def _profile(metrics: list[LayerMetrics], profile: str) -> list[float]:
    """Per-layer importance (high = keep more vision tokens) from the chosen signal."""
    if profile == "arank":
        return [m.arank_fraction for m in metrics]
    values = []
    for m in metrics:
        value = (1.0 - m.vision_cosine) if profile == "vision_change" and m.vision_cosine is not None else (
            m.text_to_vision if profile == "text_to_vision" else None)
        if value is None:
            raise DataError(f"the {profile} profile needs samples with vision tokens and text after them")
        values.append(float(value))
    return values


def _report(*, checkpoint, data, ids, fit, held, skipped, workload: Workload, solution: BudgetSolution, metrics,
            profile_values, order, fits, choices, val, agreement, seed, tolerance, router, options,
            searched=()) -> dict:
    est = solution.estimate
    chosen = next((c for c in searched if c.chosen), None)
    scorer = chosen.scorer if chosen is not None else "router"
    position = {layer: pos for pos, layer in enumerate(order)} if order is not None else None
    choice = {c["layer"]: c for c in choices}
    layers = []
    for m, row in zip(metrics, est.layers):
        router_fit = fits.get(m.layer)
        layers.append({
            "layer": m.layer,
            "ratio": solution.ratios[m.layer],
            "arank": m.arank,
            "arank_fraction": m.arank_fraction,
            "vision_cosine": m.vision_cosine,
            "text_to_vision": m.text_to_vision,
            "profile": None if profile_values is None else profile_values[m.layer],
            "redundancy_rank": None if position is None else position[m.layer],
            "kept_vision_tokens": row.prefill_tokens - sum(workload.n_text),
            "vision_tokens": sum(workload.n_vision),
            "dense_flops": row.dense_flops, "mod_flops": row.mod_flops,
            "dense_kv_bytes": row.dense_kv_bytes, "mod_kv_bytes": row.mod_kv_bytes,
            "scorer": None if solution.ratios[m.layer] is None else scorer,
            "router": None if solution.ratios[m.layer] is None or not options["warm_start"] else {
                "choice": router_fit.target if router_fit is not None else "zero",
                "position_prior": 0.0 if router_fit is None else router_fit.prior,
                "validation_kl": choice[m.layer]["candidates"] if m.layer in choice else None,
                "fit_tokens": None if router_fit is None else router_fit.tokens,
                "target_correlation": None if router_fit is None else router_fit.correlation,
                "logit_std": None if router_fit is None else router_fit.logit_std,
                "weight_norm": 0.0 if router_fit is None else float(router_fit.weight.norm()),
                "bias": 0.0 if router_fit is None else router_fit.bias},
        })
    n = len(workload.n_vision)
    warm = agreement.get("warm_start")
    zero = agreement.get("zero_routers")
    return {
        "format": REPORT_FORMAT,
        "pmod_convert_version": __version__,
        "checkpoint": str(checkpoint),
        "data": str(data),
        "seed": seed,
        "options": options,
        "samples": {"total": n, "fit": len(fit), "validation": len(val), "held_out": len(held),
                    "skipped_rows": skipped,
                    "fit_ids": [ids[i] for i in fit], "held_out_ids": [ids[i] for i in held]},
        "tokens": {"vision_per_sample": sum(workload.n_vision) / n, "text_per_sample": sum(workload.n_text) / n,
                   "n_vision": workload.n_vision, "n_text": workload.n_text},
        "budget": {"metric": solution.metric, "convention": workload.convention, "target": solution.target,
                   "achieved": solution.achieved,
                   "tolerance": tolerance, "reachable": list(solution.reachable), "parameter": solution.parameter,
                   "value": solution.value, "gap_filled_layers": solution.gap_filled_layers,
                   "sweep": solution.sweep},
        "estimate": _estimate_dict(est),
        "schedule": asdict(solution.settings),
        "search": {"chosen_by": ("KL(dense || MoD) on the held-out rows (on the validation rows when there are no "
                                 "held-out rows) at answer positions (at every text position after the image below "
                                 f"{MIN_ANSWER_POSITIONS} answer tokens); each candidate's routers were chosen on the "
                                 "validation rows")
                   if any(c.validation_kl is not None for c in searched) else
                   "nothing measured (no held-out or validation rows): the first usable candidate",
                   "candidates": [c.to_dict() for c in searched]},
        "layer_ratios": solution.ratios,
        "router": asdict(router),
        "layers": layers,
        "warm_start": {
            "enabled": bool(options["warm_start"]),
            "evaluated_on": "held-out samples: text positions after the first vision token (answer_*: positions "
                            "predicting an answer token); top1 = argmax agrees with the dense model, kl = "
                            "KL(dense || MoD) in nats, at the same schedule",
            "zero_routers": zero,
            "warm_start": warm,
            "all_layers_validation_kl": choice["all"]["candidates"] if "all" in choice else None,
        },
    }


def _estimate_dict(est) -> dict:
    """The report's ``estimate`` section (FLOPs and KV bytes of the dense and converted prefill)."""
    return {"flops_ratio": est.flops_ratio, "decoder_flops_ratio": est.decoder_flops_ratio,
            "kv_ratio": est.kv_ratio, "dense_prefill_flops": est.dense_prefill_flops,
            "mod_prefill_flops": est.mod_prefill_flops, "vision_flops": est.vision_flops,
            "dense_kv_bytes": est.dense_kv_bytes, "mod_kv_bytes": est.mod_kv_bytes,
            "num_mod_layers": est.num_mod_layers, "counted": est.counted}
