"""Router warm start: fit each MoD layer's router to rank vision tokens the way the dense model values them.

Targets (per vision token ``t`` of a sample, in layer ``l`` of the dense model; see ``observers``):

- ``text_attention``: the attention the text tokens after the image pay to ``t`` (mean over heads and
  text queries): what the question and answer read;
- ``key_attention``: the attention ``t`` receives from every query that can see it (vision tokens after
  it included): its whole use as a key, which also counts what later vision tokens build from it;
- ``text_log_attention`` (mean log attention from the text), ``update`` (how much the layer changes ``t``).

Each is log-scaled and standardised within the sample (only the order inside a sample matters for top-k).

Fit: ridge least squares from the layer's input hidden state (what the router reads) to the target, on
inputs centred per sample (a per-sample offset cannot change a ranking). The fitted direction is then
scaled so the logits have standard deviation ``logit_std`` on the calibration tokens and centred (bias)
to mean 0: the TanhNorm weight ``alpha * tanh(logit) + beta`` stays within about ``alpha * logit_std`` of
``beta``, so the warm start changes which tokens are kept without visibly rescaling the layer's outputs.

Choice: a zero router is not a random one. Its logits tie, and the stable sort keeps the FIRST k vision
tokens, whose states then stay exactly the dense ones under causal attention: a strong default that a
linear router does not always beat. ``select_routers`` keeps, layer by layer, a fitted router or the zero
router, whichever agrees better with the dense model on validation samples.

Evaluation: top-1 agreement and KL(dense || MoD) of next-token distributions at the text positions after
the first vision token (where routing can change anything), and at answer positions alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RecipeError
from ..mod.layer import MoDLayerMixin
from ..mod.router import ROUTER_NAME

TARGETS = ("key_attention", "text_attention", "text_log_attention", "update")


def _standardise(values: torch.Tensor) -> torch.Tensor:
    values = values - values.mean()
    std = values.std(unbiased=False)
    return values / std if float(std) > 1e-12 else torch.zeros_like(values)


@dataclass
class RouterFit:
    layer: int
    weight: torch.Tensor  # [hidden]
    bias: float
    tokens: int  # vision tokens fitted on
    correlation: float  # correlation of the fitted (unscaled) scores with the target, on the fit tokens
    logit_std: float
    target: str = "text_attention"
    prior: float = 0.0  # the router's position_prior (selection only; see TanhNormRouter)

    def with_prior(self, prior: float, target: str) -> "RouterFit":
        """The same router with ``position_prior = prior``, named ``target`` in reports."""
        return RouterFit(self.layer, self.weight, self.bias, self.tokens, self.correlation, self.logit_std,
                         target, float(prior))


class _Accumulator:
    # float64 on the device of the hidden states (a GPU does the n x h^2 products of large models)
    def __init__(self, hidden: int, targets: tuple[str, ...], device: torch.device):
        self.xtx = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(hidden, dtype=torch.float64, device=device)
        self.tokens = 0
        self.xty = {t: torch.zeros(hidden, dtype=torch.float64, device=device) for t in targets}
        self.yty = {t: 0.0 for t in targets}


class RouterFitter:
    """Accumulates, per layer, the normal equations of (per-sample centred) inputs -> token importance.

    One accumulator per layer serves every target in ``targets`` (they share ``X^T X``); ``solve`` gives
    the router for one layer and target. Usable as a ``LayerObserver`` sink; ``enabled`` switches it off
    for samples that must not be fitted on (validation).
    """

    def __init__(self, hidden_size: int, *, targets: tuple[str, ...] | list[str] = ("text_attention",),
                 ridge: float = 1e-2, logit_std: float = 0.1):
        targets = tuple(targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise RecipeError(f"router warm-start targets must be among {', '.join(TARGETS)}, got {list(targets)}")
        if not logit_std > 0:
            raise RecipeError(f"logit_std must be > 0, got {logit_std!r}")
        self.hidden = int(hidden_size)
        self.targets = targets
        self.ridge = float(ridge)
        self.logit_std = float(logit_std)
        self.layers: dict[int, _Accumulator] = {}
        self.enabled = True

    @staticmethod
    def importance(signals: dict[str, torch.Tensor], target: str) -> torch.Tensor:
        """The per-sample standardised (log) target signal."""
        values = signals[target].detach().double()
        return _standardise(values if target == "text_log_attention" else torch.log(values.clamp_min(1e-12)))

    def add(self, layer: int, inputs: torch.Tensor, signals: dict[str, torch.Tensor]) -> None:
        """One sample's vision tokens of ``layer``: inputs [n, hidden] and per-token signals [n] (observers)."""
        if not self.enabled or inputs.shape[0] < 2:
            return
        x = inputs.detach().to(torch.float64)
        acc = self.layers.setdefault(layer, _Accumulator(self.hidden, self.targets, x.device))
        xc = x - x.mean(0, keepdim=True)
        acc.xtx += xc.T @ xc
        acc.sum_x += x.sum(0)
        acc.tokens += x.shape[0]
        for target in self.targets:
            y = self.importance(signals, target).to(x.device)
            acc.xty[target] += xc.T @ y
            acc.yty[target] += float(y @ y)

    __call__ = add  # usable as an observer sink

    def solve(self, layer: int, target: str | None = None) -> RouterFit:
        target = target or self.targets[0]
        acc = self.layers.get(layer)
        zero = RouterFit(layer, torch.zeros(self.hidden), 0.0, 0 if acc is None else acc.tokens, 0.0, 0.0, target)
        if acc is None or acc.tokens == 0 or acc.yty[target] <= 0:
            return zero
        xtx, xty, sum_x = acc.xtx.cpu(), acc.xty[target].cpu(), acc.sum_x.cpu()
        lam = self.ridge * float(torch.trace(xtx)) / self.hidden + 1e-12
        beta = torch.linalg.solve(xtx + lam * torch.eye(self.hidden, dtype=torch.float64), xty)
        var = float(beta @ xtx @ beta) / acc.tokens
        if var <= 1e-24:
            return zero
        correlation = float(beta @ xty) / math.sqrt(var * acc.tokens * acc.yty[target])
        weight = beta * (self.logit_std / math.sqrt(var))
        bias = -float(sum_x @ weight) / acc.tokens
        return RouterFit(layer, weight.float(), bias, acc.tokens, correlation, self.logit_std, target)


def order_candidates(fits: dict[int, RouterFit], hidden: int, logit_std: float) -> dict[str, dict[int, RouterFit]]:
    """Routers that prefer the last vision tokens, to choose from next to the fitted ones and the zero router.

    ``fits``: one fitted router per MoD layer (any target). Returns ``{"last": zero router with
    ``prior = 1`` (keeps the LAST k vision tokens), "<target>+last": the fit with ``prior = 2 * logit_std``
    (its ranking, tilted towards later tokens by about two logit standard deviations across the image)}``.
    Why: under causal attention a late vision token has attended to the whole image before it; on some
    models keeping the last k loses far less than keeping the first k or the dense model's most attended
    tokens (measured in ``docs/baselines.md``).
    """
    last = {i: RouterFit(i, torch.zeros(hidden), 0.0, f.tokens, 0.0, 0.0, "last", 1.0) for i, f in fits.items()}
    out = {"last": last}
    target = next((f.target for f in fits.values()), None)
    if target is not None:
        out[f"{target}+last"] = {i: f.with_prior(2.0 * logit_std, f"{target}+last") for i, f in fits.items()}
    return out


def set_routers(layers: nn.ModuleList, fits: dict[int, RouterFit] | None) -> None:
    """Load fitted routers into the MoD layers (``None``: zero routers, the fresh p-MoD start), with each
    fit's ``position_prior`` (0 for a layer without a fit)."""
    with torch.no_grad():
        for index, layer in enumerate(layers):
            if not isinstance(layer, MoDLayerMixin):
                continue
            router = getattr(layer, ROUTER_NAME)
            fit = None if fits is None else fits.get(index)
            router.position_prior = 0.0 if fit is None else float(fit.prior)
            if fit is None:
                router.weight.zero_()
                if router.bias is not None:
                    router.bias.zero_()
                continue
            router.weight.copy_(fit.weight.to(router.weight.dtype).view_as(router.weight))
            if router.bias is not None:
                router.bias.fill_(fit.bias)


@dataclass
class Agreement:
    """Next-token agreement of a model with the dense reference over the evaluated positions."""

    top1: float
    kl: float
    positions: int
    answer_top1: float | None
    answer_kl: float | None
    answer_positions: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class AgreementMeter:
    """Compares next-token distributions with the dense model's, sample by sample."""

    def __init__(self) -> None:
        self.hits = self.kl = 0.0
        self.count = 0
        self.answer_hits = self.answer_kl = 0.0
        self.answer_count = 0

    def add(self, reference: torch.Tensor, logits: torch.Tensor, answer: torch.Tensor) -> None:
        """``reference``: dense log-probs [n, vocab]; ``logits``: the model's [n, vocab]; ``answer``: [n] bool."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        ref = reference.double()
        kl = (ref.exp() * (ref - logp)).sum(-1).clamp_min(0.0)
        hit = (ref.argmax(-1) == logp.argmax(-1)).double()
        self.hits += float(hit.sum())
        self.kl += float(kl.sum())
        self.count += int(hit.numel())
        self.answer_hits += float(hit[answer].sum())
        self.answer_kl += float(kl[answer].sum())
        self.answer_count += int(answer.sum())

    def result(self) -> Agreement:
        n, na = max(self.count, 1), self.answer_count
        return Agreement(top1=self.hits / n, kl=self.kl / n, positions=self.count,
                         answer_top1=self.answer_hits / na if na else None,
                         answer_kl=self.answer_kl / na if na else None, answer_positions=na)


def select_routers(mod_layers: list[int], candidates: dict[str, dict[int, RouterFit]],
                   validation_kl: Callable[[dict[int, RouterFit]], float],
                   min_gain: float = 0.02) -> tuple[dict[int, RouterFit], list[dict]]:
    """Choice per MoD layer among the candidates (fitted routers, order priors) and the zero router: first the
    best single candidate on every layer at once, then a greedy pass in depth order that changes a layer's
    router when that lowers the validation KL to the dense model, given the other layers' choices.

    A linear router cannot always rank better than the zero router's default order (its stable sort keeps
    the FIRST k vision tokens, whose states stay exact under causal attention); this keeps a fitted router
    only where it measurably helps: it must lower the validation KL by at least ``min_gain`` (relative),
    so noise on a small validation set does not swap in a router. Returns the chosen fits (absent = zero)
    and a log (first entry ``layer "all"``, then one per layer) whose ``candidates`` also hold the KL of the
    router the layer had before (``kept (...)``; ``zero`` for the all-layer step) and ``min_gain``.
    """
    chosen: dict[int, RouterFit] = {}
    best = validation_kl(chosen)
    zero_kl = best
    history = []
    # Start from the best candidate applied to every layer at once: layers interact (e.g. keeping the last
    # tokens may pay only when every layer does), which a layer-by-layer pass from zero cannot see.
    uniform = {name: validation_kl({i: fits[i] for i in mod_layers}) for name, fits in candidates.items()}
    name = min(uniform, key=lambda n: (uniform[n], n)) if uniform else None
    if name is not None and uniform[name] < (1.0 - min_gain) * best:
        chosen, best = {i: candidates[name][i] for i in mod_layers}, uniform[name]
    history.append({"layer": "all", "choice": name if chosen else "zero", "validation_kl": best,
                    "candidates": {**uniform, "zero": zero_kl}, "min_gain": min_gain})
    for layer in mod_layers:
        before = best  # the validation KL with this layer's current router (zero, or the all-layer choice)
        scores = {}
        for name, fits in candidates.items():
            trial = dict(chosen)
            trial[layer] = fits[layer]
            scores[name] = validation_kl(trial)
        current = chosen.get(layer)
        if current is not None:  # the zero router is a candidate too once the layer holds another one
            trial = dict(chosen)
            del trial[layer]
            scores["zero"] = validation_kl(trial)
        name = min(scores, key=lambda n: (scores[n], n)) if scores else None
        if name is not None and scores[name] < (1.0 - min_gain) * best:
            if name == "zero":
                del chosen[layer]
            else:
                chosen[layer] = candidates[name][layer]
            best = scores[name]
        else:
            name = current.target if current is not None else "zero"
        had = current.target if current is not None else "zero"
        history.append({"layer": layer, "choice": name, "validation_kl": best, "min_gain": min_gain,
                        "candidates": {**scores, f"kept ({had})": before}})
    return chosen, history
