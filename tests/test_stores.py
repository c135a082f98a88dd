"""Models users already have: Ollama's store and LM Studio's folders, used in place."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ollama

from server.discovery import discover
from server.runner import ServerThread
from server.runtime import Runtime
from tests.conftest import make_config


def ollama_store(root: Path, smollm2: Path) -> None:
    """The layout `ollama pull` leaves: manifests naming sha256 blobs."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    digest = "sha256:" + hashlib.sha256(b"smollm2").hexdigest()
    (blobs / digest.replace(":", "-")).symlink_to(smollm2)
    template = "sha256:" + hashlib.sha256(b"template").hexdigest()
    (blobs / template.replace(":", "-")).write_text("{{ .Prompt }}")

    def manifest(path: str, layers: list[dict[str, object]]) -> None:
        p = root / "manifests" / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))

    model = {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": 1}
    tmpl = {"mediaType": "application/vnd.ollama.image.template", "digest": template}
    manifest("registry.ollama.ai/library/smollm2/135m", [model, tmpl])
    manifest("hf.co/someone/tiny-gguf/q4_1", [model])
    manifest(
        "registry.ollama.ai/library/halfpulled/latest",
        [
            {
                "mediaType": "application/vnd.ollama.image.model",
                "digest": "sha256:" + "0" * 64,
                "size": 5,
            }
        ],
    )
    manifest("registry.ollama.ai/library/notamodel/latest", [tmpl])
    (root / "manifests/registry.ollama.ai/library/garbage").mkdir(parents=True)
    (root / "manifests/registry.ollama.ai/library/garbage/latest").write_text("{not json")


def test_ollama_and_lmstudio_stores_are_found(
    tmp_path: Path, smollm2_path: Path, gemma_path: Path
) -> None:
    ollama_store(tmp_path / "ollama", smollm2_path)
    lms = tmp_path / "lmstudio"
    (lms / "google" / "gemma-3-270m-GGUF").mkdir(parents=True)
    (lms / "google" / "gemma-3-270m-GGUF" / "gemma-3-270m-Q4_K_M.gguf").symlink_to(
        gemma_path.resolve()
    )
    (lms / "google" / "gemma-3-270m-GGUF" / "partial.gguf").write_bytes(b"GGUF\x03\x00")
    found = {
        m.id: m
        for m in discover(
            include_default=False,
            include_hf_cache=False,
            ollama_dir=tmp_path / "ollama",
            lmstudio=[lms],
        )
    }
    assert found["smollm2:135m"].usable and found["smollm2:135m"].source == "ollama"
    assert found["smollm2:135m"].path.resolve() == smollm2_path.resolve()  # used in place
    assert found["hf.co/someone/tiny-gguf:q4_1"].usable
    assert "blob missing" in (found["halfpulled:latest"].error or "")
    assert "no model layer" in (found["notamodel:latest"].error or "")
    assert "bad manifest" in (found["garbage:latest"].error or "")
    gemma = found["google/gemma-3-270m-gguf/gemma-3-270m-q4_k_m"]
    assert gemma.usable and gemma.source == "lmstudio" and gemma.architecture == "gemma3"
    assert not found["google/gemma-3-270m-gguf/partial"].usable


def test_ollama_clients_use_ollama_names_for_store_models(
    tmp_path: Path, smollm2_path: Path
) -> None:
    ollama_store(tmp_path / "ollama", smollm2_path)
    reg = Runtime(
        make_config(
            include_default_model=False,
            user_stores=True,
            ollama_dir=tmp_path / "ollama",
            lmstudio_dirs=(),
        )
    )
    try:
        with ServerThread(reg) as srv:
            client = ollama.Client(host=srv.url, timeout=60)
            names = {m.model for m in client.list().models}
            assert names == {"smollm2:135m", "hf.co/someone/tiny-gguf:q4_1"}
            r = client.chat(
                model="smollm2:135m",
                options={"num_predict": 4},
                messages=[{"role": "user", "content": "hi"}],
            )
            assert r.message.content and reg.scheduler.loaded()[0].info.source == "ollama"
    finally:
        reg.close()
