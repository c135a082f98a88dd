"""The model list in each dialect's shape: OpenAI's `{"object": "list"}` cards, and Anthropic's
page (`type`, `display_name`, RFC 3339 `created_at`, `first_id` / `last_id` / `has_more`),
which Claude Code and the Anthropic SDKs read from the same `GET /v1/models`."""

from __future__ import annotations

import datetime as dt
from typing import Any

from server.discovery import ModelInfo
from server.errors import InvalidRequest
from server.runtime import Runtime

# Anthropic's page size when the client names none, and its largest.
ANTHROPIC_DEFAULT_LIMIT = 20
ANTHROPIC_MAX_LIMIT = 1000


def model_card(info: ModelInfo, rt: Runtime) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "model",
        "created": int(info.path.stat().st_mtime) if info.path.exists() else 0,
        "owned_by": "lmx",
        "lmx": {**info.describe(), "state": rt.scheduler.state_of(info.id)},
    }


def openai_cards(rt: Runtime) -> list[dict[str, Any]]:
    """Every usable model, then every preset (a name for a model with its own system)."""
    data = [model_card(m, rt) for m in rt.catalog.models() if m.usable]
    for name, p in sorted(rt.settings.presets.items()):
        data.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "lmx",
                "lmx": {"preset_of": p.model, "system": p.system},
            }
        )
    return data


def anthropic_model(card: dict[str, Any]) -> dict[str, Any]:
    created = dt.datetime.fromtimestamp(card["created"], tz=dt.UTC)
    return {
        "type": "model",
        "id": card["id"],
        "display_name": card["id"],
        "created_at": created.isoformat().replace("+00:00", "Z"),
    }


def anthropic_page(
    cards: list[dict[str, Any]],
    limit: int | None,
    after_id: str | None,
    before_id: str | None,
) -> dict[str, Any]:
    """One page of Anthropic's model list: `limit` models after `after_id` (or the last ones
    before `before_id`)."""
    n = ANTHROPIC_DEFAULT_LIMIT if limit is None else limit
    if not 1 <= n <= ANTHROPIC_MAX_LIMIT:
        raise InvalidRequest(
            f"limit: Input should be between 1 and {ANTHROPIC_MAX_LIMIT}", param="limit"
        )
    models = [anthropic_model(c) for c in cards]
    ids = [m["id"] for m in models]
    for name, cursor in (("after_id", after_id), ("before_id", before_id)):
        if cursor is not None and cursor not in ids:
            raise InvalidRequest(f"{name}: no model {cursor!r} in the list", param=name)
    if before_id is not None:
        end = ids.index(before_id)
        page = models[max(0, end - n) : end]
        more = end - n > 0
    else:
        start = ids.index(after_id) + 1 if after_id is not None else 0
        page = models[start : start + n]
        more = start + n < len(models)
    return {
        "data": page,
        "has_more": more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
