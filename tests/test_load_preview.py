"""What a load would do, before it happens: the victims, what blocks it, and for a model too
large for the budget what would make it fit. Fake engine, virtual time (tests/test_scheduler)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.discovery import ModelInfo
from server.load_preview import apply_option, hub_repo, preview_load
from tests.test_scheduler import MB, World


def test_preview_names_the_idle_model_it_would_evict(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 400, "b": 400, "c": 400}, max_memory=1000 * MB, ctx=1000)
    w.use("a")
    w.clock.advance(1)
    w.use("b")
    p = preview_load(w.s, w.catalog.resolve("c"))
    assert p.fits and p.fits_alone and p.victims == ("a",) and not p.blocked_by
    assert w.loaded() == {"a", "b"}  # a preview changes nothing
    pin = preview_load(w.s, w.catalog.resolve("a"))
    assert pin.loaded and pin.victims == ()


def test_preview_of_a_load_blocked_by_busy_and_pinned_models(tmp_path: Path) -> None:
    w = World(tmp_path, {"a": 400, "b": 400, "c": 400}, max_memory=1000 * MB, ctx=1000)
    held = w.lease("a")
    w.use("b")
    w.s.pin("b")
    p = preview_load(w.s, w.catalog.resolve("c"))
    assert not p.fits and p.fits_alone and p.victims == ()
    assert set(p.blocked_by) == {"a", "b"}
    held.release()


def test_too_large_says_why_and_what_would_make_it_fit(tmp_path: Path) -> None:
    # weights 950 MB + KV (ctx x slots x 100 B) 400 MB; the budget is 1 GB
    w = World(tmp_path, {"big": 950}, max_memory=1000 * MB, ctx=1_000_000, parallel=4)
    info = w.catalog.resolve("big")
    files = [
        {"name": "big-Q8_0.gguf", "quantization": "Q8_0", "size": 940 * MB},
        {"name": "big-Q6_K.gguf", "quantization": "Q6_K", "size": 700 * MB},
    ]
    p = preview_load(w.s, info, hub_files=files)
    assert not p.fits_alone and not p.fits
    assert "needs about 1.4 GB" in p.reason and "budget is 1.0 GB" in p.reason
    kinds = {o.kind: o for o in p.options}
    assert "parallel" not in kinds  # even one slot takes 1.05 GB
    assert (kinds["ctx"].ctx, kinds["ctx"].parallel) == (125_000, 4)
    assert kinds["ctx"].total <= 1000 * MB
    assert "quantization" not in kinds  # with this KV cache no file of it fits
    assert "ctx 125000" in kinds["ctx"].describe()


def test_fewer_slots_and_a_smaller_quantization_are_offered(tmp_path: Path) -> None:
    w = World(tmp_path, {"big": 700}, max_memory=1000 * MB, ctx=1_000_000, parallel=4)
    info = w.catalog.resolve("big")  # 700 + 400 MB
    files = [
        {"name": "big-Q8_0.gguf", "quantization": "Q8_0", "size": 690 * MB},
        {"name": "big-Q4_K_M.gguf", "quantization": "Q4_K_M", "size": 500 * MB},
        {"name": "big-Q2_K.gguf", "quantization": "Q2_K", "size": 300 * MB},
    ]
    p = preview_load(w.s, info, hub_files=files)
    kinds = {o.kind: o for o in p.options}
    assert kinds["parallel"].parallel == 3 and kinds["parallel"].total == 1000 * MB
    assert kinds["quantization"].quantization == "Q4_K_M"  # the best that fits, not the least
    assert "Q4_K_M from the hub" in kinds["quantization"].describe()
    apply_option(w.config, "big", kinds["parallel"])
    assert w.s.estimate_for(info).parallel == 3
    again = preview_load(w.s, info)
    assert again.fits_alone and again.options == ()
    with pytest.raises(ValueError):
        apply_option(w.config, "big", kinds["quantization"])


def test_hub_repo_of_a_model_in_the_hf_cache(tmp_path: Path) -> None:
    snap = tmp_path / "models--Org--Name-GGUF" / "snapshots" / "abc" / "m.gguf"
    assert hub_repo(ModelInfo("org/name-gguf/m", snap, "hf-cache", 1)) == "Org/Name-GGUF"
    assert hub_repo(ModelInfo("m", tmp_path / "m.gguf", "dir", 1)) is None
