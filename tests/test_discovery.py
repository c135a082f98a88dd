"""Model discovery: packaged default, model dirs, the Hugging Face cache, id resolution."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.discovery import discover, resolve_name, scan_hf_cache


def test_default_model_is_found() -> None:
    models = discover(include_hf_cache=False)
    assert [m.id for m in models] == ["smollm2-135m-instruct.q4_1"]
    m = models[0]
    assert m.usable and m.source == "default" and "default" in m.aliases
    assert m.size_bytes == m.path.stat().st_size


def test_model_dir_is_searched_recursively_and_bad_files_listed(
    smollm2_path: Path, gemma_path: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "Gemma-3.gguf").symlink_to(gemma_path.resolve())
    (root / "small.gguf").symlink_to(smollm2_path)
    (root / "notes.txt").write_text("ignored")
    (root / "broken.gguf").write_bytes(smollm2_path.read_bytes()[:50_000])
    (root / "empty.gguf").write_bytes(b"")
    models = {m.id: m for m in discover([root], include_default=False, include_hf_cache=False)}
    assert set(models) == {"a/b/gemma-3", "small", "broken", "empty"}
    assert models["a/b/gemma-3"].architecture == "gemma3"
    assert models["small"].quantization == "Q4_1"
    assert not models["broken"].usable and "truncated" in (models["broken"].error or "")
    assert not models["empty"].usable and "too short" in (models["empty"].error or "")


def test_same_file_twice_is_listed_once_and_ids_stay_unique(
    smollm2_path: Path, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "m.gguf").write_bytes(smollm2_path.read_bytes()[:10])
    (b / "m.gguf").write_bytes(smollm2_path.read_bytes()[:20])
    ids = [m.id for m in discover([a, b, a], include_default=False, include_hf_cache=False)]
    assert ids == ["m", "m~2"]


def _fake_hf_cache(root: Path, repo: str, files: dict[str, Path]) -> None:
    """The layout huggingface_hub writes: blobs, snapshots of symlinks, refs."""
    base = root / ("models--" + repo.replace("/", "--"))
    commit = "a" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for i, (name, src) in enumerate(files.items()):
        blob = base / "blobs" / f"{i:064x}"
        blob.symlink_to(src)
        os.symlink(os.path.relpath(blob, snap), snap / name)


def test_hf_cache_models_are_used_in_place(smollm2_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    _fake_hf_cache(
        cache,
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        {"smollm2-135m-instruct-q4_1.gguf": smollm2_path, "README.md": smollm2_path},
    )
    models = scan_hf_cache(cache)
    assert [m.id for m in models] == [
        "huggingfacetb/smollm2-135m-instruct-gguf/smollm2-135m-instruct-q4_1"
    ]
    assert models[0].usable and models[0].source == "hf-cache"
    assert models[0].path.resolve() == smollm2_path.resolve()


def test_missing_hf_cache_is_empty(tmp_path: Path) -> None:
    assert scan_hf_cache(tmp_path / "nothing") == []


def test_resolution_by_alias_prefix_and_ambiguity(tmp_path: Path, smollm2_path: Path) -> None:
    for name in ("qwen-a.gguf", "qwen-b.gguf"):
        (tmp_path / name).write_bytes(b"x")
    models = {m.id: m for m in discover([tmp_path])}
    assert resolve_name("default", models).id == "smollm2-135m-instruct.q4_1"  # type: ignore[union-attr]
    assert resolve_name("SmolLM2", models).id == "smollm2-135m-instruct.q4_1"  # type: ignore[union-attr]
    assert resolve_name("qwen-a", models).id == "qwen-a"  # type: ignore[union-attr]
    assert resolve_name("nothing-like-it", models) is None
    with pytest.raises(LookupError, match="qwen-a, qwen-b"):
        resolve_name("qwen", models)


def test_ollama_style_names() -> None:
    models = {m.id: m for m in discover(include_hf_cache=False)}
    for name in ("smollm2:135m", "smollm2-135m-instruct.q4_1:latest", "smollm2:latest"):
        assert resolve_name(name, models).id == "smollm2-135m-instruct.q4_1"  # type: ignore[union-attr]
    assert resolve_name("smollm2:7b", models) is None
