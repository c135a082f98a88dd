"""Hugging Face hub search: repositories with GGUF files, their quantizations, what fits."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from server.errors import InvalidRequest, LmxError

_QUANT = re.compile(
    r"(?<![A-Z0-9])(IQ\d_(?:XXS|XS|NL|S|M)|Q\d_K_[SML]|Q\d_K|Q\d_[01]|TQ\d_0|BF16|F16|F32|"
    r"MXFP4)(?![A-Z0-9])",
    re.IGNORECASE,
)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# Best quality first: the recommendation is the first that fits.
QUALITY = [
    "F32",
    "BF16",
    "F16",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q5_1",
    "Q5_0",
    "Q4_K_M",
    "Q4_K_S",
    "Q4_1",
    "Q4_0",
    "IQ4_NL",
    "IQ4_XS",
    "Q3_K_L",
    "Q3_K_M",
    "IQ3_M",
    "Q3_K_S",
    "IQ3_S",
    "IQ3_XS",
    "IQ3_XXS",
    "Q2_K",
    "IQ2_M",
    "IQ2_S",
    "IQ2_XS",
    "IQ2_XXS",
    "IQ1_M",
    "IQ1_S",
]
# A model needs about its file size plus KV cache and buffers; 20% covers modest contexts.
FIT_OVERHEAD = 1.2
# huggingface_hub retries a connection that fails for about half a minute; lmx first asks
# whether the hub answers at all, so that no network is reported within a few seconds.
REACH_TIMEOUT = 3.0


class HubError(LmxError):
    """The hub could not be reached or answered with an error; one line, no traceback."""

    status = 502
    type = "server_error"
    code = "hub_error"


def endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def quant_of(filename: str) -> str | None:
    m = _QUANT.search(filename.rsplit("/", 1)[-1])
    return m.group(1).upper() if m else None


@dataclass
class GGUFChoice:
    """One downloadable model in a repository: a GGUF file, or the shards of a split one."""

    name: str
    files: list[str]
    size: int
    quant: str | None
    fits: bool = False
    sha256: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "files": self.files,
            "size": self.size,
            "quantization": self.quant,
            "fits": self.fits,
        }


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_reachable(timeout: float = REACH_TIMEOUT) -> None:
    """Raise HubError at once when the hub does not answer (any HTTP answer will do)."""
    import httpx

    url = endpoint()
    try:
        httpx.head(url, timeout=timeout)
    except httpx.HTTPError as e:
        raise HubError(
            f"the hub at {url} cannot be reached ({_one_line(e)}); check the network "
            "(or HF_ENDPOINT)"
        ) from e


def search(query: str, *, sort: str = "downloads", limit: int = 20) -> list[dict[str, Any]]:
    """Repositories with GGUF files matching `query`, most downloaded (or liked) first."""
    from huggingface_hub import HfApi

    order: Literal["downloads", "likes"]
    if sort == "downloads":
        order = "downloads"
    elif sort == "likes":
        order = "likes"
    else:
        raise InvalidRequest("sort must be 'downloads' or 'likes'", param="sort")
    check_reachable()
    try:
        models = HfApi(endpoint=endpoint()).list_models(
            search=query, filter="gguf", sort=order, limit=limit
        )
        return [{"id": m.id, "downloads": m.downloads or 0, "likes": m.likes or 0} for m in models]
    except Exception as e:
        raise HubError(f"hub search failed: {_one_line(e)}") from e


def repo_files(repo: str, budget: int, revision: str = "main") -> dict[str, Any]:
    """A repository's GGUF models, grouped, with what fits and the recommended one."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    check_reachable()
    try:
        info = HfApi(endpoint=endpoint()).model_info(repo, revision=revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise LookupError(f"no repository '{repo}' on the hub") from e
    except Exception as e:
        raise HubError(f"cannot list {repo}: {_one_line(e)}") from e
    groups: dict[str, GGUFChoice] = {}
    for s in info.siblings or []:
        name = s.rfilename
        if not name.lower().endswith(".gguf"):
            continue
        m = _SHARD.search(name)
        key = name[: m.start()] + ".gguf" if m else name
        g = groups.setdefault(key, GGUFChoice(key, [], 0, quant_of(key)))
        g.files.append(name)
        g.sizes[name] = int(s.size or 0)
        g.size += g.sizes[name]
        if s.lfs is not None:
            g.sha256[name] = s.lfs.sha256
    choices = sorted(groups.values(), key=lambda g: g.name)
    for g in choices:
        g.files.sort()
        g.fits = g.size * FIT_OVERHEAD <= budget
    rank = {q: i for i, q in enumerate(QUALITY)}
    fitting = [g for g in choices if g.fits]
    best = min(fitting, key=lambda g: rank.get(g.quant or "", len(QUALITY)), default=None)
    return {
        "repo": repo,
        "commit": info.sha,
        "files": [g.as_dict() for g in choices],
        "recommended": best.name if best else None,
        "_choices": choices,
    }


def listing(repo: str, budget: int) -> dict[str, Any]:
    """`repo_files` with user errors in lmx's own types (bad id: 400, unknown repo: 404)."""
    from server.errors import NotFound

    if repo.count("/") != 1:
        raise InvalidRequest(f"'{repo}' is not a repository id (ORG/NAME)", param="repo")
    try:
        return repo_files(repo, budget)
    except LookupError as e:
        raise NotFound(str(e), param="repo") from e


def pick(listing: dict[str, Any], quant: str | None, filename: str | None) -> Any:
    """The choice a `REPO[:QUANT]` or `--file NAME` asks for; ValueError names the options."""
    choices = listing["_choices"]
    if filename:
        for g in choices:
            if filename in g.files or filename == g.name:
                return g
        raise ValueError(
            f"{listing['repo']} has no file {filename!r}; it has: "
            + ", ".join(g.name for g in choices)
        )
    if quant:
        hits = [g for g in choices if (g.quant or "").lower() == quant.lower()]
        if not hits:
            have = sorted({g.quant or "?" for g in choices})
            raise ValueError(
                f"{listing['repo']} has no {quant.upper()} file; it has: " + ", ".join(have)
            )
        return hits[0]
    name = listing["recommended"]
    if name is None:
        raise ValueError(f"no GGUF file in {listing['repo']} fits the memory budget")
    return next(g for g in choices if g.name == name)


def summary(listing: dict[str, Any]) -> dict[str, Any]:
    """A repository listing in one line: its size range, its quantizations, those that fit."""
    files = listing["files"]
    sizes = [f["size"] for f in files]
    rank = {q: i for i, q in enumerate(QUALITY)}

    def order(q: str) -> int:
        return rank.get(q, len(QUALITY))

    return {
        "repo": listing["repo"],
        "size_min": min(sizes, default=0),
        "size_max": max(sizes, default=0),
        "quantizations": sorted({f["quantization"] or "?" for f in files}, key=order),
        "fit": sorted({f["quantization"] or "?" for f in files if f["fits"]}, key=order),
        "recommended": listing["recommended"],
    }
