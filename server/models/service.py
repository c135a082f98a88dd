"""The control plane: the one path of model management, as `GenerationService` is the one
path of a request. The admin API, the Ollama management routes, the CLI and the TUI call it;
none of them computes a fit, a preview or a removal itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from server.catalog import Catalog
from server.discovery import ModelInfo
from server.downloads import Download, DownloadQueue
from server.errors import InvalidRequest, LmxError
from server.events import EventBus
from server.load_preview import FitOption, LoadPreview, apply_option, hub_repo, preview_load
from server.scheduler import LoadedModel, Scheduler
from server.settings import ConfigStore, ModelConfig

log = logging.getLogger(__name__)


class ModelService:
    """List with state and fit; preview a load (with the hub's smaller quantizations when it
    does not fit); load, unload, pin, pull, remove, describe. Blocking: callers on an event
    loop run these in a worker thread."""

    def __init__(
        self,
        config: ConfigStore,
        catalog: Catalog,
        scheduler: Scheduler,
        events: EventBus,
        downloads: Callable[[], DownloadQueue],
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._scheduler = scheduler
        self._events = events
        self._downloads = downloads

    # ----- what there is -------------------------------------------------------------------

    def resolve(self, name: str) -> ModelInfo:
        """The available model `name` names (id, alias, file name...); ModelNotFound if none."""
        return self._catalog.resolve(name)

    def runs_on(self, name: str) -> ModelInfo:
        """The model a request for `name` runs on: a preset's base model, else `resolve`.
        Loading, estimating, pinning and unloading take these names; removing does not."""
        return self._catalog.target(name).info

    def models(self) -> list[ModelInfo]:
        return self._catalog.models()

    def is_pinned(self, model_id: str) -> bool:
        return self._scheduler.is_pinned(model_id)

    def describe(self, info: ModelInfo) -> dict[str, Any]:
        """One model as the admin API, `lmx ls --estimate`, `lmx ps` and the TUI see it: its
        facts, state, estimate and fit now, and its live counters when loaded."""
        sched = self._scheduler
        out = info.describe()
        lm = sched.get(info.id)
        out["state"] = sched.state_of(info.id)
        out["pinned"] = sched.is_pinned(info.id)
        out["template_error"] = self._catalog.broken(info.id)
        group = self._catalog.group_of(info.id)
        out["group"] = group[0] if group else None
        if info.usable:
            est = lm.estimate if lm is not None else sched.estimate_for(info)
            plan = sched.plan(est, exclude=info.id)
            out["memory_estimate"] = est.as_dict()
            out["fits"] = lm is not None or plan.fits
            out["fits_alone"] = sched.fits_alone(est)
            out["would_evict"] = plan.victims if lm is None else []
        if lm is not None and lm.engine is not None:
            st = lm.engine.stats()
            out.update(
                {
                    "memory_measured": lm.measured,
                    "expires_in": lm.expires_in(),
                    "in_use": lm.leases,
                    "ctx": lm.options.n_ctx,
                    "slots": st["slots"],
                    "slots_busy": st["slots_busy"],
                    "queue_depth": st["queue_depth"],
                    "load_seconds": round(lm.load_seconds, 3),
                }
            )
            if st["slots_busy"]:
                out["state"] = "busy"
        return out

    def describe_all(self) -> list[dict[str, Any]]:
        return [self.describe(m) for m in self._catalog.models()]

    def memory(self) -> dict[str, Any]:
        """The budget, what the loaded models take of it (by estimate, per device) and the
        GPUs NVML sees, with whether llama.cpp here can use them."""
        sched = self._scheduler
        used: dict[str, int] = {}
        for lm in sched.loaded():
            for d, b in lm.estimate.by_device().items():
                used[d] = used.get(d, 0) + b
        gpus = sched.gpus.gpus()
        offload = bool(gpus) and sched.offload_supported()
        note = sched.gpus.note
        if gpus and not offload:
            note = "llama.cpp here was built without GPU offload: models stay in RAM"
        return {
            "budget_bytes": sched.budget,
            "used_bytes": sum(lm.estimate.total for lm in sched.loaded()),
            "budgets": sched.budgets(),
            "used": used,
            "gpus": [g.as_dict() for g in gpus],
            "offload": offload,
            "note": note or None,
        }

    # ----- a load, before and after ----------------------------------------------------------

    def preview(
        self,
        name: str,
        ctx: int | None = None,
        parallel: int | None = None,
        *,
        ask_hub: bool = False,
    ) -> tuple[LoadPreview, str]:
        """Whether the model fits now, what it would evict or wait for, and (too large) what
        would make it fit: a smaller context, fewer slots, and with `ask_hub` a smaller
        quantization from its hub repository. Returns the preview and a note (why the hub was
        not asked, when it could not be). Nothing is loaded or evicted."""
        from server import hub

        info = self.runs_on(name)
        preview = preview_load(self._scheduler, info, ctx, parallel)
        repo = hub_repo(info)
        if not ask_hub or preview.fits_alone or not repo or not info.usable or ctx or parallel:
            return preview, ""
        try:
            files = hub.listing(repo, self._scheduler.budget)["files"]
        except LmxError as e:  # no hub: the ctx and slot options remain
            return preview, f"(the hub was not asked for smaller quantizations: {e.message})"
        return preview_load(self._scheduler, info, ctx, parallel, files), ""

    def apply_option(self, model_id: str, option: FitOption) -> None:
        """Use a preview's ctx / slots option for this model from now on (a quantization
        option is a `pull` instead)."""
        apply_option(self._config, model_id, option)

    def estimate(self, info: ModelInfo, ctx: int | None = None) -> dict[str, Any]:
        return self._scheduler.estimate_for(info, ctx).as_dict()

    def load(self, name: str, ctx: int | None = None) -> LoadedModel:
        """Load (or keep) the model, evicting idle ones as the policy allows. `ctx`: with this
        context from now on (its `[models."id"]` ctx for this run, as Ollama's `num_ctx`); a
        loaded model with another context reloads with it, at once when idle, else when its
        requests end. A load that fails puts the old context back."""
        info = self.runs_on(name)
        if ctx is None or self._config.current.for_model("ctx", info.id) == ctx:
            return self._scheduler.load(info)
        before = self._config.current.models
        old = before.get(info.id) or ModelConfig()
        self._config.update(models={**before, info.id: msgspec.structs.replace(old, ctx=ctx)})
        try:
            return self._scheduler.load(info)
        except LmxError:
            self._config.update(models=before)
            raise

    def unload(self, name: str) -> bool:
        """Unload it now (its requests end with an error); False if it was not loaded."""
        return self._scheduler.unload(self.runs_on(name).id)

    def pin(self, name: str, pinned: bool = True) -> str:
        """Keep the model loaded (never evicted, no TTL) or let it go again; returns its id."""
        info = self.runs_on(name)
        self._scheduler.pin(info.id, pinned)
        return info.id

    # ----- files -----------------------------------------------------------------------------

    def pull(self, repo: str, quant: str | None = None, file: str | None = None) -> list[Download]:
        """Queue every file of the model `repo[:quant]` or `file` names (the recommended
        quantization when neither is given)."""
        from server import hub

        listing = hub.listing(repo, self._scheduler.budget)
        try:
            choice = hub.pick(listing, quant, file)
        except ValueError as e:
            raise InvalidRequest(str(e), param="quant" if quant else "file") from e
        missing = [f for f in choice.files if f not in choice.sha256]
        if missing:
            raise InvalidRequest(
                f"the hub gives no sha256 for {missing[0]}; lmx only installs files it can verify",
                param="file",
            )
        queue = self._downloads()
        return [
            queue.add(repo, f, choice.sha256[f], choice.sizes[f], listing["commit"])
            for f in choice.files
        ]

    def remove(self, name: str) -> Path:
        """Delete a model lmx manages (the Hugging Face cache): its snapshot link and blob."""
        info = self._catalog.resolve(name)
        if info.source != "hf-cache":
            raise InvalidRequest(
                f"'{info.id}' is used in place from {info.source} ({info.path}); lmx only "
                "removes models in the Hugging Face cache. Delete the file yourself.",
                param="model",
            )
        self._scheduler.unload(info.id)
        link = info.path
        # A GGUF is one link into the blobs; an MLX model a snapshot folder of them.
        links = [p for p in link.iterdir() if p.is_symlink()] if link.is_dir() else [link]
        blobs = {p.resolve() for p in links}
        for p in links:
            p.unlink(missing_ok=True)
        if link.is_dir():
            with contextlib.suppress(OSError):  # files of its own or other models: it stays
                link.rmdir()
        repo_dir = link
        while repo_dir.parent.name != "snapshots" and repo_dir != repo_dir.parent:
            repo_dir = repo_dir.parent
        blobs_dir = repo_dir.parent.parent / "blobs"
        used = {p.resolve() for p in repo_dir.parent.parent.rglob("*") if p.is_symlink()}
        for blob in blobs:
            if blob.parent == blobs_dir and blob not in used:
                blob.unlink(missing_ok=True)
        self._catalog.refresh()
        self._events.publish("removed", info.id, path=str(link))
        return link
