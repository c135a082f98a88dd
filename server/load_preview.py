"""What loading a model would do, before anything happens: whether it fits, which idle models
the scheduler would evict for it (`Scheduler.plan`), and, for a model too large for the
budget, what would make it fit (a smaller context, fewer slots, a smaller quantization of the
same model from the hub). The app's load prompt and `/admin/estimate` read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from server.discovery import ModelInfo
from server.hub import QUALITY
from server.memory import MemoryEstimate
from server.scheduler import Scheduler
from server.settings import ConfigStore, ModelConfig
from server.units import human_size

MIN_CTX = 512  # a smaller context is no use for chat


@dataclass(frozen=True)
class FitOption:
    """One way to make a model fit the budget alone: other settings, or another file."""

    kind: str  # ctx, parallel, quantization
    ctx: int
    parallel: int
    total: int  # bytes it would take
    quantization: str | None = None
    repo: str | None = None
    file: str | None = None

    def describe(self) -> str:
        size = human_size(self.total)
        if self.kind == "quantization":
            return f"{self.quantization} from the hub ({self.repo}: {self.file}): about {size}"
        if self.kind == "parallel":
            return f"{self.parallel} slot{'s' if self.parallel > 1 else ''} (--parallel): {size}"
        if self.kind == "ctx":
            return f"ctx {self.ctx} (--ctx): {size}"
        return f"ctx {self.ctx} and {self.parallel} slot(s): {size}"

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "text": self.describe()}


@dataclass(frozen=True)
class LoadPreview:
    """The answer to "what happens if I load this now?"."""

    model: str
    estimate: MemoryEstimate
    budgets: dict[str, int]
    loaded: bool
    fits: bool  # fits now, after evicting `victims`
    fits_alone: bool  # fits an empty budget at all
    victims: tuple[str, ...]  # idle models evicted to make room, least recently used first
    blocked_by: tuple[str, ...]  # busy or pinned models it would have to wait for
    options: tuple[FitOption, ...] = field(default=())  # when it does not fit alone

    @property
    def reason(self) -> str:
        """Why it can never fit as configured ("" when it can)."""
        if self.fits_alone:
            return ""
        e = self.estimate
        over = [d for d, b in e.by_device().items() if b > self.budgets.get(d, 0)]
        if e.placement is not None and over and "ram" not in over:
            return f"{self.model}: {e.placement.note}"
        budget = sum(self.budgets.get(d, 0) for d in over)
        return (
            f"{self.model} needs about {human_size(e.total)} (weights {human_size(e.weights)}, "
            f"KV cache {human_size(e.kv_cache)} for ctx {e.ctx} x {e.parallel} slots, compute "
            f"{human_size(e.compute)}) but the budget is {human_size(budget)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "estimate": self.estimate.as_dict(),
            "loaded": self.loaded,
            "fits": self.fits,
            "fits_alone": self.fits_alone,
            "would_evict": list(self.victims),
            "blocked_by": list(self.blocked_by),
            "reason": self.reason or None,
            "options": [o.as_dict() for o in self.options],
        }


def hub_repo(info: ModelInfo) -> str | None:
    """The hub repository a model from the Hugging Face cache came from (ORG/NAME)."""
    if info.source != "hf-cache":
        return None
    for part in info.path.parts:
        if part.startswith("models--"):
            org, _, name = part.removeprefix("models--").partition("--")
            return f"{org}/{name}" if name else None
    return None


def _fits(est: MemoryEstimate, budgets: dict[str, int]) -> bool:
    return all(b <= budgets.get(d, 0) for d, b in est.by_device().items())


def fit_options(
    scheduler: Scheduler,
    info: ModelInfo,
    hub_files: list[dict[str, Any]] | None = None,
    repo: str | None = None,
) -> list[FitOption]:
    """Ways to make `info` fit the budget alone, most faithful first: the most slots that fit,
    the largest context that fits, both lowered, and the best quantization in `hub_files`
    (a hub listing's "files") that fits. Empty when it already fits."""
    budgets = scheduler.budgets()
    now = scheduler.estimate_for(info)
    if _fits(now, budgets):
        return []
    out: list[FitOption] = []
    for p in range(now.parallel - 1, 0, -1):
        est = scheduler.estimate_for(info, parallel=p)
        if _fits(est, budgets):
            out.append(FitOption("parallel", est.ctx, p, est.total))
            break
    ctx = now.ctx // 2
    while ctx >= MIN_CTX:
        est = scheduler.estimate_for(info, ctx=ctx)
        if _fits(est, budgets):
            out.append(FitOption("ctx", est.ctx, est.parallel, est.total))
            break
        ctx //= 2
    if not out and now.parallel > 1:
        ctx = now.ctx
        while ctx >= MIN_CTX:
            est = scheduler.estimate_for(info, ctx=ctx, parallel=1)
            if _fits(est, budgets):
                out.append(FitOption("ctx+parallel", est.ctx, 1, est.total))
                break
            ctx //= 2
    rank = {q: i for i, q in enumerate(QUALITY)}
    fitting = []
    for f in hub_files or []:
        # Another quantization of the same weights: its file instead of ours, same KV cache.
        total = int(f["size"]) + now.kv_cache + now.compute
        smaller = int(f["size"]) < now.weights
        if smaller and _fits(_replace_total(now, total), budgets):
            fitting.append((rank.get(f.get("quantization") or "", len(QUALITY)), f, total))
    if fitting:
        _, f, total = min(fitting, key=lambda t: t[0])
        out.append(
            FitOption(
                "quantization",
                now.ctx,
                now.parallel,
                total,
                quantization=f.get("quantization"),
                repo=repo,
                file=f["name"],
            )
        )
    return out


def _replace_total(est: MemoryEstimate, total: int) -> MemoryEstimate:
    weights = total - est.kv_cache - est.compute
    return MemoryEstimate(weights, est.kv_cache, est.compute, est.ctx, est.parallel)


def preview_load(
    scheduler: Scheduler,
    info: ModelInfo,
    ctx: int | None = None,
    parallel: int | None = None,
    hub_files: list[dict[str, Any]] | None = None,
) -> LoadPreview:
    """Whether `info` fits now, what it would evict or wait for, and (too large) what would
    make it fit. Nothing is loaded or evicted."""
    lm = scheduler.get(info.id)
    est = lm.estimate if lm is not None and not (ctx or parallel) else None
    est = est or scheduler.estimate_for(info, ctx, parallel)
    budgets = scheduler.budgets()
    plan = scheduler.plan(est, exclude=info.id)
    alone = _fits(est, budgets)
    options: list[FitOption] = []
    if not alone and not (ctx or parallel):
        options = fit_options(scheduler, info, hub_files, hub_repo(info))
    return LoadPreview(
        model=info.id,
        estimate=est,
        budgets=budgets,
        loaded=lm is not None,
        fits=lm is not None or plan.fits,
        fits_alone=alone,
        victims=() if lm is not None else tuple(plan.victims),
        blocked_by=() if lm is not None or plan.fits else tuple(plan.blocked_by),
        options=tuple(options),
    )


def apply_option(config: ConfigStore, model_id: str, option: FitOption) -> None:
    """Use a ctx / slots option for this model from now on (its `[models."id"]` settings, kept
    for this run as a flag is). A quantization option is a download instead (Runtime.pull)."""
    if option.kind == "quantization":
        raise ValueError("a quantization is pulled from the hub, not applied")
    models = dict(config.current.models)
    old = models.get(model_id) or ModelConfig()
    models[model_id] = msgspec.structs.replace(old, ctx=option.ctx, parallel=option.parallel)
    config.update(models=models)
