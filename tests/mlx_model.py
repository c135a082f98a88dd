"""A real MLX model for the tests: the bundled SmolLM2-135M GGUF rewritten as an MLX directory.

The GGUF's Q4_1 and Q8_0 blocks are MLX's affine quantization in another layout (a group of 32
values shares a scale and an offset), so the weights move over bit for bit: Q4_1 becomes
4-bit, Q8_0 8-bit, group size 32, and `gguf.quants.dequantize` checks every tensor against the
result. llama.cpp's converter permutes the Q and K rows of llama models for its RoPE layout;
that is undone here. The tokenizer is rebuilt from the GGUF vocabulary and merges (SmolLM2 is
GPT-2 style byte-level BPE, digits split one by one), the chat template is the GGUF's own.

The directory is cached next to the Gemma test model, keyed by the source file's size and
modification time, so it is built once per machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1  # bump when the output changes, so stale caches are rebuilt
GROUP = 32


def mlx_dir_for(gguf_path: Path, cache: Path) -> Path:
    """The MLX directory converted from `gguf_path`, built in `cache` on first use."""
    st = gguf_path.stat()
    key = f"v{FORMAT_VERSION}-{st.st_size}-{int(st.st_mtime)}"
    target = cache / f"{gguf_path.stem.lower()}-mlx-{key}"
    if not (target / "config.json").exists():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        convert(gguf_path, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


# ----- weights --------------------------------------------------------------------------------

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """llama.cpp's tensor name -> the Hugging Face Llama name mlx-lm loads."""
    base, _, kind = gguf_name.rpartition(".")
    if base == "token_embd":
        return f"model.embed_tokens.{kind}"
    if base == "output_norm":
        return f"model.norm.{kind}"
    if base == "output":
        return f"lm_head.{kind}"
    blk, n, part = base.split(".", 2)
    assert blk == "blk", gguf_name
    return f"model.layers.{n}.{_LAYER_NAMES[part]}.{kind}"


def unpermute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (it interleaves the two RoPE halves per head).

    Works on any array whose first axis is the output rows (weights, packed blocks, scales).
    """
    rows = a.shape[0]
    half = rows // n_head // 2
    return a.reshape(n_head, half, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-wide values [rows, cols] -> MLX's uint32 words, lowest bits first."""
    per = 32 // bits
    rows, cols = q.shape
    q = q.astype(np.uint32).reshape(rows, cols // per, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    return np.bitwise_or.reduce(q << shifts, axis=2).astype(np.uint32)


def _q4_1(raw: np.ndarray, rows: int, cols: int) -> dict[str, np.ndarray]:
    """Q4_1 blocks (f16 d, f16 m, 16 bytes of nibbles) -> 4-bit affine: w = d * q + m."""
    blocks = raw.reshape(rows, cols // GROUP, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:20]
    # Byte j holds value j in its low nibble and value j + 16 in its high one.
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
    return {"weight": _pack(q, 4), "scales": d, "biases": m}


def _q8_0(raw: np.ndarray, rows: int, cols: int) -> dict[str, np.ndarray]:
    """Q8_0 blocks (f16 d, 32 signed bytes) -> 8-bit affine: w = d * (q + 128) - 128 d."""
    blocks = raw.reshape(rows, cols // GROUP, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8).astype(np.int16) + 128
    return {"weight": _pack(q.reshape(rows, cols), 8), "scales": d, "biases": -128.0 * d}


def _dequantized(parts: dict[str, np.ndarray], bits: int) -> np.ndarray:
    """What MLX will compute from `parts` (to check the conversion against gguf's own)."""
    w = parts["weight"]
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    q = ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)
    s = np.repeat(parts["scales"], GROUP, axis=1)
    b = np.repeat(parts["biases"], GROUP, axis=1)
    return (s * q.astype(np.float32) + b).astype(np.float32)


# ----- the whole conversion ---------------------------------------------------------------------


def convert(gguf_path: Path, out: Path) -> None:
    """Write config.json, model.safetensors and the tokenizer files for a llama GGUF."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(gguf_path)
    meta = {k: _field(f) for k, f in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"only llama GGUFs are converted here, not {arch}")

    def a(key: str) -> Any:
        return meta[f"{arch}.{key}"]

    n_head, n_head_kv = int(a("attention.head_count")), int(a("attention.head_count_kv"))
    tensors: dict[str, np.ndarray] = {}
    quant: dict[str, Any] = {"group_size": GROUP, "bits": 4}
    for t in reader.tensors:
        name = hf_name(t.name)
        module = name.rsplit(".", 1)[0]
        cols, rows = (int(t.shape[0]), int(t.shape[1])) if len(t.shape) == 2 else (0, 0)
        ttype = t.tensor_type
        if ttype in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
            bits = 4 if ttype == GGMLQuantizationType.Q4_1 else 8
            raw = np.asarray(t.data, dtype=np.uint8)
            parts = (_q4_1 if bits == 4 else _q8_0)(raw, rows, cols)
            expect = dequantize(raw, ttype).reshape(rows, cols)
            got = _dequantized(parts, bits)
            if not np.allclose(got, expect, rtol=0, atol=1e-6 * float(np.abs(expect).max())):
                raise AssertionError(f"{t.name}: repacked blocks do not match gguf's values")
            if bits != quant["bits"]:
                quant[module] = {"group_size": GROUP, "bits": bits}
            for k, v in parts.items():
                tensors[f"{module}.{k}"] = v
        elif ttype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            arr = np.asarray(t.data).astype(np.float32)
            tensors[name] = arr.reshape(rows, cols) if cols else arr.reshape(-1)
        else:
            raise ValueError(f"{t.name}: {ttype.name} blocks are not converted here")
        heads = {"self_attn.q_proj": n_head, "self_attn.k_proj": n_head_kv}
        for part, nh in heads.items():
            if module.endswith(part):
                for k in [k for k in tensors if k.startswith(module + ".")]:
                    tensors[k] = np.ascontiguousarray(unpermute_rows(tensors[k], nh))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "mlx"})

    n_embd = int(a("embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": n_embd,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": n_embd // n_head,
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(a("rope.freq_base")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": int(a("context_length")),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "torch_dtype": "float32",
        "quantization": quant,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(meta, out)


def _field(f: Any) -> Any:
    try:
        return f.contents()
    except Exception:  # array fields of odd types: not needed here
        return None


def _write_tokenizer(meta: dict[str, Any], out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError("only GPT-2 style BPE vocabularies are rebuilt here")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # llama.cpp's "smollm" pre-tokenizer: each digit apart, then GPT-2's byte-level split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    control = [i for i, t in enumerate(types) if t == 3]  # llama.cpp's CONTROL type
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    tok.save(str(out / "tokenizer.json"))

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None else None

    tcfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "unk_token": name("unknown"),
        "pad_token": name("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta[f"{meta['general.architecture']}.context_length"]),
        "chat_template": meta.get("tokenizer.chat_template"),
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i],
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i in control
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    special = {k: tcfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def f32_gguf_for(gguf_path: Path, cache: Path) -> Path:
    """The same GGUF with every tensor dequantized to F32 (llama.cpp then multiplies in plain
    float, as MLX does, instead of quantizing activations to 8 bits), built on first use."""
    st = gguf_path.stat()
    target = cache / f"{gguf_path.stem.lower()}-f32-v{FORMAT_VERSION}-{st.st_size}.gguf"
    if not target.exists():
        partial = target.with_name(target.name + ".partial")
        write_f32_gguf(gguf_path, partial)
        partial.replace(target)
    return target


def write_f32_gguf(src: Path, out: Path) -> None:
    """Copy `src` with its metadata unchanged and its tensors dequantized."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize

    reader = GGUFReader(src)
    writer = GGUFWriter(out, arch=str(reader.fields["general.architecture"].contents()))
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    writer.add_file_type(LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]
        writer.add_tensor(t.name, data.reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
