"""GGUF header parsing on the real models and on broken files."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.gguf import GGUFError, read_gguf


def test_reads_smollm2_metadata(smollm2_path: Path) -> None:
    h = read_gguf(smollm2_path)
    assert h.architecture == "llama"
    assert h.quantization == "Q4_1"
    assert h.context_length == 8192
    assert 130_000_000 < h.parameter_count < 140_000_000
    assert h.vocab_size == 49152
    assert "<|im_start|>" in (h.chat_template or "")
    assert len(h.tensors) == 272
    assert h.data_offset + sum(t.n_bytes or 0 for t in h.tensors) <= h.file_size


def test_reads_gemma3_metadata(gemma_path: Path) -> None:
    h = read_gguf(gemma_path)
    assert h.architecture == "gemma3"
    assert h.quantization == "Q4_K_M"
    assert h.context_length and h.context_length >= 8192
    assert 200_000_000 < h.parameter_count < 300_000_000
    assert h.chat_template is None  # this file carries none: the engine falls back to llama.cpp's


def test_truncated_file_names_the_problem(smollm2_path: Path, tmp_path: Path) -> None:
    data = smollm2_path.read_bytes()
    for cut in (2, 100, 2_000_000, len(data) - 1000):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=r"truncated|too short"):
            read_gguf(p)


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 10)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(p)


def test_corrupt_counts(smollm2_path: Path, tmp_path: Path) -> None:
    data = bytearray(smollm2_path.read_bytes()[:4096])
    data[8:16] = (2**62).to_bytes(8, "little")  # absurd tensor count
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="corrupt"):
        read_gguf(p)
