"""The llama.cpp engine: one decode thread per model running continuous batching.

Each slot owns one llama.cpp sequence id. Every step the thread puts one token per decoding
slot and a chunk of any pending prompt into a single `llama_batch`, calls `llama_decode`, and
samples each slot with its own sampler chain (so sampling settings and grammars never leak
between requests). New requests join at the next step. A request reuses the longest prefix of
its prompt already in the KV cache, its own slot's or another slot's (`llama_memory_seq_cp`).
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from server.chat_template import ChatTemplate
from server.discovery import ModelInfo
from server.engines.base import (
    EngineOptions,
    Finished,
    Generation,
    GenerationRequest,
    Offload,
    Sink,
    Timings,
    emit_text,
    finish_job,
)
from server.engines.llama_sampling import GrammarSampler
from server.engines.prefix_store import PrefixMatch
from server.engines.rerank import (
    JUDGE_TEMPLATE_KWARGS,
    RERANK_CTX,
    RERANK_SEQS,
    judge_messages,
    judge_score,
)
from server.engines.rerank import answer_tokens as rerank_answers
from server.engines.rerank import check_lengths as check_rerank_lengths
from server.engines.rerank import pack as rerank_pack
from server.errors import ContextOverflow, EngineFailure, InvalidRequest, QueueFull

log = logging.getLogger(__name__)

# For a GGUF without a chat template: llama.cpp's built-in template for its family.
BUILTIN_TEMPLATES = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "phi3": "phi3",
    "llama": "chatml",
    "qwen2": "chatml",
    "qwen3": "chatml",
}
PENALTY_LAST_N = 64
# ggml's CPU flash attention has three kernels: per row, a tiled one for 64 or more rows of a
# sequence in a ubatch, and one that splits a lone row's cells over the threads (one row of one
# sequence, 512 cells or more). They round differently, so which one computes a row must not
# depend on what else is in the batch: under 64 rows per sequence per ubatch and never a lone
# row, every row takes the per-row kernel, and a temperature-0 answer is identical alone,
# batched, and from a cached prefix. The price is prefill speed on long prompts: the tiled
# kernel prefills 2000 tokens ~1.4x faster (batch_invariant=False: llama-server's ubatch).
BATCH_INVARIANT_UBATCH = 63
# Rows per decode call of a reranking judge: under 64 and a multiple of 4 (see rerank).
RERANK_STEP = 60
# A prompt waits for another slot's prefill only when that saves at least this many tokens.
MIN_SHARED_WAIT = 32
# The prefix store: a slot's tokens are saved when at least this many would be lost, and a
# stored prefix is restored when it beats what the slots hold by this many tokens (restoring
# copies bytes; prefilling 32 tokens costs a pass over the weights).
MIN_SAVE_TOKENS = 64
MIN_STORE_GAIN = 32
KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}

_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            # Silence llama.cpp's own logging: our logs say what matters, in one place.
            llama_cpp.llama_log_set(_quiet_logger, ctypes.c_void_p(0))
            _backend_ready = True


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU (CUDA, Metal, Vulkan, ...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def _set_offload(mparams: Any, opts: EngineOptions) -> Any:
    """Put the scheduler's choice (layers, one GPU or a split) into llama.cpp's model params.
    Returns the tensor_split array, which must live as long as the load."""
    off: Offload | None = opts.offload
    if off is None:  # no NVIDIA GPU measured: llama.cpp decides (Metal, Vulkan)
        mparams.n_gpu_layers = opts.gpu_layers
        return None
    mparams.n_gpu_layers = off.layers
    if off.layers and off.tensor_split:
        n = int(llama_cpp.llama_max_devices())
        shares = (list(off.tensor_split) + [0.0] * n)[:n]
        split = (ctypes.c_float * n)(*shares)
        mparams.split_mode = llama_cpp.LLAMA_SPLIT_MODE_LAYER
        mparams.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        return split
    if off.layers and off.main_gpu is not None:
        mparams.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
        mparams.main_gpu = off.main_gpu
    return None


_GGML_LOG_ERROR = 4


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _quiet_logger(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp's errors go to our log; its chatter only when LMX_LLAMA_LOG is set.
    if level == _GGML_LOG_ERROR or os.environ.get("LMX_LLAMA_LOG"):
        log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def _free_samplers(job: _Job) -> None:
    llama_cpp.llama_sampler_free(job.sampler)
    if job.grammar is not None:
        llama_cpp.llama_sampler_free(job.grammar)


@dataclass
class _Job:
    gen: Generation
    sampler: Any  # llama_sampler_p: the chain (penalties, bias, top-k ... dist)
    queued_at: float
    grammar: Any = None  # llama_sampler_p: checked on the chain's pick (see llama_sampling)
    started_at: float = 0.0
    first_token_at: float = 0.0
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    next_token: int | None = None  # sampled, to be decoded next step
    n_gen: int = 0
    cached: int = 0
    text_held: str = ""
    stopped_by: str | None = None  # the stop string that matched
    decoder: Any = None
    # Another slot is prefilling a prefix this prompt shares: wait for it, then copy it.
    waiting_on: _Slot | None = None
    wait_until: int = 0


@dataclass
class _Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)  # what this sequence holds in the KV cache
    job: _Job | None = None
    last_used: float = 0.0
    # The shortest length these cells may be cut to. A state restored into a sliding-window
    # cache holds only the window before its end, so it can be extended but not cut shorter.
    floor: int = 0
    prompt_len: int = 0  # the last request's prompt, the first part of `tokens`
    owner: str | None = None  # the affinity of the request that left these cells


def _slot_state(slot: _Slot) -> str:
    job = slot.job
    if job is None:
        return "idle"
    return "prefill" if job.pending or job.waiting_on is not None else "decode"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _seq(slot: _Slot) -> int:
    return slot.seq


def _slot_rank(slot: _Slot, prompt: list[int], affinity: str | None) -> tuple[float, ...]:
    """Which free slot a prompt takes (the highest rank). Without an affinity: the longest
    usable prefix among the slots no conversation claims, then the least recently used. With
    one: its own slot with the longest usable prefix; else an empty slot, else the least
    recently used, whatever prefix the others hold (a subagent that shares its parent's
    system prompt does not take over the parent's cached conversation)."""
    if affinity is None:
        return (slot.owner is None, _usable(slot, prompt), -slot.last_used)
    mine = slot.owner == affinity
    return (mine, _usable(slot, prompt) if mine else 0, not slot.tokens, -slot.last_used)


def _usable(slot: _Slot, prompt: list[int]) -> int:
    """How many of `prompt`'s tokens the slot's cells can serve."""
    n = _common_prefix(slot.tokens, prompt)
    return n if n >= slot.floor else 0


class LlamaCppEngine:
    """A loaded GGUF model serving many requests at once through llama.cpp."""

    takes_text = False  # the pipeline renders and tokenizes for it

    def __init__(self, info: ModelInfo, options: EngineOptions | None = None) -> None:
        self.info = info
        self.options = options or EngineOptions()
        self._store = self.options.prefix_store
        self._store_key: str | None = None
        self._model: Any = None
        self._ctx: Any = None
        self._embed_ctx: Any = None
        self._rank_ctx: Any = None  # reranking's own context (rank pooling or logits)
        self._embed_lock = threading.Lock()  # the side contexts: embedding and reranking
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._slots: list[_Slot] = []
        self.requests_total = 0
        self.tokens_generated = 0
        self.finished: Counter[str] = Counter()  # by reason, for metrics and tests
        self.steps = 0
        self.last_timings: Timings | None = None
        self.failure: str | None = None  # why the decode loop died
        self.on_failure: Callable[[str], None] | None = None  # told once, from that thread

    # ----- loading -------------------------------------------------------------------------

    def load(self) -> None:
        """Load weights and create the context (blocking; call from a worker thread)."""
        _init_backend()
        opts = self.options
        mparams = llama_cpp.llama_model_default_params()
        self._tensor_split = _set_offload(mparams, opts)
        model = llama_cpp.llama_model_load_from_file(str(self.info.path).encode(), mparams)
        if not model:
            raise EngineFailure(f"llama.cpp could not load {self.info.path}")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        n_train = llama_cpp.llama_model_n_ctx_train(model)
        self.n_ctx_slot = max(64, min(opts.n_ctx, n_train) if n_train > 0 else opts.n_ctx)
        self._threads = opts.threads or _physical_cores()
        self._recurrent = bool(
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_slot * opts.parallel
        cparams.n_batch = opts.n_batch
        cparams.n_ubatch = (
            min(opts.n_batch, BATCH_INVARIANT_UBATCH) if opts.batch_invariant else opts.n_batch
        )
        # Logits are read for at most one row per slot: llama.cpp then reserves its output
        # buffer for those rows, not for every row of a ubatch (Gemma-3's 262k vocabulary
        # would take 537 MB at a 512-row ubatch).
        cparams.n_outputs_max = opts.parallel
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.n_seq_max = opts.parallel
        cparams.n_threads = self._threads
        cparams.n_threads_batch = self._threads
        # One KV stream per slot: a sequence's cells stay in position order, so attention sums
        # them in the same order whatever else is cached (see BATCH_INVARIANT_UBATCH).
        cparams.kv_unified = False
        # A sliding-window cache forgets old positions; a prefix copied from another slot
        # would then be incomplete, so keep the full cache for such models.
        cparams.swa_full = True
        cparams.no_perf = True
        for name, kind in (("type_k", opts.cache_type_k), ("type_v", opts.cache_type_v)):
            if kind.lower() not in KV_TYPES:
                llama_cpp.llama_model_free(model)
                self._model = None
                raise EngineFailure(
                    f"unknown KV cache type {kind!r} (choose from {', '.join(KV_TYPES)})"
                )
            setattr(cparams, name, KV_TYPES[kind.lower()])
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            self._model = None
            raise EngineFailure(f"llama.cpp could not create a context for {self.info.id}")
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(opts.n_batch, 0, 1)
        self._slots = [_Slot(seq=i) for i in range(opts.parallel)]
        self._swa = int(llama_cpp.llama_model_n_swa(model)) > 0
        self._store_key = self._make_store_key()
        self._piece_buf = ctypes.create_string_buffer(256)
        template = opts.chat_template or self.info.chat_template
        self.chat_template = self._make_template(template) if template else None
        self._builtin = BUILTIN_TEMPLATES.get(self.info.architecture or "", "chatml")
        self._bos_text = self._token_text(llama_cpp.llama_vocab_bos(self._vocab))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)]
        self._grammar_sampler: GrammarSampler | None = None  # its buffers: on the first grammar
        self._thread = threading.Thread(
            target=self._run, name=f"decode:{self.info.id}", daemon=True
        )
        self._thread.start()

    def _make_template(self, template: str) -> ChatTemplate:
        eos = self._token_text(llama_cpp.llama_vocab_eos(self._vocab))
        bos = self._token_text(llama_cpp.llama_vocab_bos(self._vocab))
        return ChatTemplate(template, eos_token=eos, bos_token=bos, name=self.info.id)

    def _apply_builtin(self, messages: list[dict[str, Any]]) -> str:
        msgs = (llama_cpp.llama_chat_message * len(messages))()
        keep = []
        for i, m in enumerate(messages):
            role, content = str(m["role"]).encode(), str(m.get("content") or "").encode()
            keep += [role, content]
            msgs[i].role, msgs[i].content = role, content
        name = self._builtin.encode()
        size = sum(len(b) for b in keep) * 2 + 256
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(name, msgs, len(messages), True, buf, size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = llama_cpp.llama_chat_apply_template(name, msgs, len(messages), True, buf, n)
        if n < 0:
            raise InvalidRequest(
                f"llama.cpp's '{self._builtin}' template rejected the messages", param="messages"
            )
        return buf.raw[:n].decode("utf-8", "replace")

    def _token_text(self, tok: int) -> str:
        if tok < 0:
            return ""
        return self._piece(tok, special=True).decode("utf-8", "replace")

    def _piece(self, tok: int, special: bool = False) -> bytes:
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, special)
        return bytes(buf.raw[:n])

    # ----- the model's text side ------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return int(self.n_ctx_slot)

    def tokenize(self, text: str, *, add_special: bool = True, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, special)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buf, n_max, add_special, special
            )
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", "replace")

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if self.chat_template is None:
            return self._apply_builtin(messages)
        # Sandboxed and bounded in time and size; raises InvalidRequest or ChatTemplateBroken.
        return self.chat_template.render(messages, tools=tools, **(template_kwargs or {}))

    def format_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        prompt = self.render_chat(messages, tools=tools, template_kwargs=template_kwargs)
        # Templates that write the BOS text themselves must not get a second one.
        add_special = not (self._bos_text and prompt.startswith(self._bos_text))
        return self.tokenize(prompt, add_special=add_special, special=True)

    # ----- requests ------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink) -> Generation:
        """Queue a request; events go to `sink` from the decode thread."""
        gen = Generation(request, sink)
        sampler, grammar = self._make_sampler(request)
        job = _Job(gen=gen, sampler=sampler, grammar=grammar, queued_at=time.perf_counter())
        with self._cond:
            if self._closing:
                _free_samplers(job)
                raise EngineFailure(f"{self.info.id} is unloading")
            busy = sum(1 for s in self._slots if s.job is not None)
            if busy >= len(self._slots) and len(self._pending) >= self.options.max_queue:
                _free_samplers(job)
                raise QueueFull(
                    f"{self.info.id}: all {len(self._slots)} slots are busy and "
                    f"{len(self._pending)} requests are waiting; retry shortly."
                )
            self._pending.append(job)
            self.requests_total += 1
            self._cond.notify()
        return gen

    def _make_sampler(self, req: GenerationRequest) -> tuple[Any, Any]:
        """The sampler chain, and the grammar (None: none) checked apart from it."""
        sp = req.sampling
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        if (sp.repeat_penalty, sp.frequency_penalty, sp.presence_penalty) != (1.0, 0.0, 0.0):
            add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    PENALTY_LAST_N,
                    sp.repeat_penalty,
                    sp.frequency_penalty,
                    sp.presence_penalty,
                ),
            )
        bias = dict(req.logit_bias)
        if req.ignore_eos:
            bias.update({t: float("-inf") for t in self._eog})
        if bias:
            if any(not 0 <= t < n_vocab for t in bias):
                llama_cpp.llama_sampler_free(chain)
                raise InvalidRequest(
                    f"logit_bias names a token outside 0..{n_vocab - 1}.", param="logit_bias"
                )
            arr = (llama_cpp.llama_logit_bias * len(bias))()
            for k, (tok, b) in enumerate(bias.items()):
                arr[k].token, arr[k].bias = tok, b  # type: ignore[assignment]
            add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
        grammar = None
        if req.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(
                self._vocab, req.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise InvalidRequest(
                    f"llama.cpp could not parse the grammar made from {req.grammar_param}.",
                    param=req.grammar_param,
                )
        if sp.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            seed = sp.seed if sp.seed is not None else random.getrandbits(32)
            if sp.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(sp.top_k))
            add(chain, llama_cpp.llama_sampler_init_top_p(sp.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(sp.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(sp.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain, grammar

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "slots": len(self._slots),
                "slots_busy": sum(1 for s in self._slots if s.job is not None),
                "queue_depth": len(self._pending),
                "requests_total": self.requests_total,
                "tokens_generated": self.tokens_generated,
                "finished": dict(self.finished),
                # Per slot: idle, prefill or decode, and the tokens its cache holds.
                "slot_states": [(_slot_state(s), len(s.tokens)) for s in self._slots],
            }

    def cancel_all(self) -> None:
        with self._cond:
            for job in self._pending:
                job.gen.cancel()
            for s in self._slots:
                if s.job:
                    s.job.gen.cancel()
            self._cond.notify()

    def close(self) -> None:
        """Cancel everything, stop the decode thread and free llama.cpp's memory."""
        with self._cond:
            self._closing = True
        self.cancel_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                # Freeing the context under a thread still inside llama_decode would crash the
                # process; leaking one model's memory is the lesser harm.
                log.error("decode thread of %s did not stop; its memory is not freed", self.info.id)
                return
            self._thread = None
        if self.failure is None and self._ctx:
            for slot in self._slots:  # the next load of this model starts from these
                try:
                    self._save_slot(slot, slot.prompt_len)
                except Exception:  # a full disk must not keep the model's memory held
                    log.exception("could not keep the prompt cache of %s", self.info.id)
        with self._embed_lock:
            for name in ("_embed_ctx", "_rank_ctx"):
                if getattr(self, name):
                    llama_cpp.llama_free(getattr(self, name))
                    setattr(self, name, None)
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # ----- the decode loop -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while (
                        not self._closing
                        and not self._pending
                        and not any(s.job for s in self._slots)
                    ):
                        self._cond.wait()
                    if self._closing and not any(s.job for s in self._slots):
                        for job in self._pending:
                            self._finish_unstarted(job)
                        self._pending.clear()
                        return
                    self._admit()
                self._step()
        except Exception as e:  # never leave a client waiting on a dead thread
            log.exception("decode loop of %s failed", self.info.id)
            self.failure = f"engine failure: {e}"
            self._fail_all(self.failure)
            if self.on_failure is not None:
                self.on_failure(self.failure)

    @property
    def alive(self) -> bool:
        """False once the decode loop has died: the model must be unloaded and loaded again."""
        return self.failure is None

    def _finish_unstarted(self, job: _Job) -> None:
        _free_samplers(job)
        self.finished["cancelled"] += 1
        job.gen.emit(Finished("cancelled", len(job.gen.request.prompt_tokens), 0))

    def _admit(self) -> None:
        """Move waiting jobs into free slots, reusing cached prefixes. Holds the lock."""
        while self._pending:
            job = self._pending[0]
            if job.gen.cancelled:
                self._pending.popleft()
                self._finish_unstarted(job)
                continue
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            self._pending.popleft()
            prompt = job.gen.request.prompt_tokens
            affinity = job.gen.request.affinity
            slot = max(free, key=lambda s: _slot_rank(s, prompt, affinity))
            self._attach(slot, job, prompt)

    def _attach(self, slot: _Slot, job: _Job, prompt: list[int]) -> None:
        slot.job = job
        slot.owner = job.gen.request.affinity
        job.gen.progress.slot = slot.seq
        if not job.started_at:
            job.started_at = time.perf_counter()
            job.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot_prompt_len = slot.prompt_len
        slot.prompt_len = len(prompt)
        stored = self._store_match(prompt)
        if self._wait_for_shared_prefill(slot, job, prompt, stored.usable if stored else 0):
            return
        own = _usable(slot, prompt)
        src, best = slot, own
        if not self._recurrent:
            for other in self._slots:
                if other is not slot:
                    n = _usable(other, prompt)
                    if n > best:
                        src, best = other, n
        else:
            best = 0
        # At least one prompt token must be decoded to get logits to sample from.
        limit = len(prompt) - 1
        if self._store_key is not None and limit - best >= MIN_STORE_GAIN:
            n = min(stored.usable, limit) if stored is not None else 0
            if stored is not None and n >= best + MIN_STORE_GAIN and n >= stored.min_keep:
                self._save_slot(slot, slot_prompt_len)
                if self._restore(slot, stored, n):
                    job.cached = n
                    job.pending = prompt[n:]
                    job.gen.progress.cached = job.gen.progress.prompt_done = n
                    return
                if src is slot:
                    best = _usable(slot, prompt)
            else:
                self._store.record(hit=False)  # type: ignore[union-attr]
        best = min(best, limit)
        if best < src.floor:
            best = 0
        mem = self._mem
        if src is not slot and best > 0:
            self._save_slot(slot, slot_prompt_len)
            # Streams copy whole: take the other slot's cache, then cut it to the shared prefix.
            llama_cpp.llama_memory_seq_rm(mem, slot.seq, -1, -1)
            llama_cpp.llama_memory_seq_cp(mem, src.seq, slot.seq, -1, -1)
            llama_cpp.llama_memory_seq_rm(mem, slot.seq, best, -1)
            slot.tokens = src.tokens[:best]
            slot.floor = src.floor
        elif best > 0:
            if len(slot.tokens) - best >= MIN_STORE_GAIN:
                self._save_slot(slot, slot_prompt_len if slot_prompt_len >= best else 0)
            llama_cpp.llama_memory_seq_rm(mem, slot.seq, best, -1)
            slot.tokens = slot.tokens[:best]
        else:
            self._save_slot(slot, slot_prompt_len)
            llama_cpp.llama_memory_seq_rm(mem, slot.seq, -1, -1)
            slot.tokens = []
            slot.floor = 0
            best = 0
        job.cached = best
        job.pending = prompt[best:]
        job.gen.progress.cached = job.gen.progress.prompt_done = best

    # ----- the prefix store ----------------------------------------------------------------

    def _make_store_key(self) -> str | None:
        """Entries restore only into a context whose KV bytes mean the same: the same model file
        (path, size, mtime), KV cache types, stream count and llama.cpp build."""
        store = self._store
        if store is None or not store.enabled or self._recurrent:
            return None
        try:
            st = self.info.path.resolve().stat()
        except OSError:
            return None
        o = self.options
        ident = [
            str(self.info.path.resolve()),
            st.st_size,
            st.st_mtime_ns,
            o.cache_type_k.lower(),
            o.cache_type_v.lower(),
            o.parallel,  # llama.cpp writes the stream count into a sequence's state
            llama_cpp.__version__,
            "fa",
            "swa_full",
        ]
        return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:16]

    def _store_match(self, prompt: list[int]) -> PrefixMatch | None:
        if self._store is None or self._store_key is None or len(prompt) <= MIN_STORE_GAIN:
            return None
        return self._store.lookup(self._store_key, prompt)

    def _save_slot(self, slot: _Slot, prompt_len: int = 0) -> None:
        """Copy a slot's KV state into the store before its cells are overwritten.

        A sliding-window state restores only whole, so the last request's prompt alone is
        saved too (`prompt_len`, when the caller no longer needs the cells after it): the same
        prompt asked again after a swap then finds it.
        """
        self._save_state(slot)
        if (
            self._swa
            and MIN_SAVE_TOKENS <= prompt_len < len(slot.tokens)
            and prompt_len >= slot.floor
            and self._store_key is not None
        ):
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, prompt_len, -1)
            slot.tokens = slot.tokens[:prompt_len]
            self._save_state(slot)

    def _save_state(self, slot: _Slot) -> None:
        store, key = self._store, self._store_key
        toks = slot.tokens
        if store is None or key is None or len(toks) < MIN_SAVE_TOKENS:
            return
        if store.covers(key, toks):
            return
        for other in self._slots:  # another slot holds it all: that one is saved when reused
            if (
                other is not slot
                and len(other.tokens) >= len(toks)
                and other.floor <= len(toks)
                and (not self._swa or len(other.tokens) == len(toks))
                and _common_prefix(other.tokens, toks) == len(toks)
            ):
                return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq)
        if size <= 0:
            return
        buf = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(buf)
        got = llama_cpp.llama_state_seq_get_data(self._ctx, view, size, slot.seq)
        del view
        if got <= 0:
            log.warning("%s: llama.cpp could not save sequence %d", self.info.id, slot.seq)
            return
        if got < size:
            del buf[got:]
        # A sliding-window cache saves only the window before the end: restorable whole only.
        min_keep = len(toks) - 1 if self._swa else 0
        store.put(key, list(toks), buf, min_keep=min_keep)

    def _restore(self, slot: _Slot, match: PrefixMatch, n: int) -> bool:
        """Load a stored prefix into `slot` and cut it to `n` tokens. False: nothing restored
        (the slot is then empty)."""
        assert self._store is not None
        state = self._store.load(match)
        if state is None:
            self._store.record(hit=False)
            return False
        view = (ctypes.c_uint8 * len(state)).from_buffer(state)
        got = llama_cpp.llama_state_seq_set_data(self._ctx, view, len(state), slot.seq)
        del view
        if got == 0:
            log.warning("%s: a stored prompt prefix did not restore; dropped", self.info.id)
            self._store.discard(match)
            self._store.record(hit=False)
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
            slot.tokens = []
            slot.floor = 0
            return False
        slot.tokens = list(match.tokens)
        slot.floor = match.min_keep
        if n < len(slot.tokens):
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, n, -1)
            slot.tokens = slot.tokens[:n]
        self._store.record(hit=True, tokens=n)
        return True

    def _wait_for_shared_prefill(
        self, slot: _Slot, job: _Job, prompt: list[int], stored: int = 0
    ) -> bool:
        """Requests that arrive together with one long system prompt: the first computes it,
        the others wait for those cells and copy them instead of computing it again."""
        if self._recurrent:
            return False
        have = max([stored] + [_usable(s, prompt) for s in self._slots])
        for other in self._slots:
            oj = other.job
            if other is slot or oj is None or not oj.pending or oj.waiting_on is not None:
                continue
            n = min(_common_prefix(other.tokens + oj.pending, prompt), len(prompt) - 1)
            if n - have >= MIN_SHARED_WAIT and n > len(other.tokens) and n >= other.floor:
                job.waiting_on, job.wait_until = other, n
                job.pending = []
                return True
        return False

    def _resume_waiters(self) -> None:
        for slot in self._slots:
            job = slot.job
            if job is None or job.waiting_on is None:
                continue
            src = job.waiting_on
            if len(src.tokens) >= job.wait_until or src.job is None or not src.job.pending:
                job.waiting_on = None
                self._attach(slot, job, job.gen.request.prompt_tokens)

    def _put(self, tok: int, pos: int, seq: int, logits: bool) -> int:
        batch = self._batch
        i = int(batch.n_tokens)
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
        batch.n_tokens = i + 1
        return i

    def _decode(self, samples: list[tuple[_Slot, int]]) -> None:
        """Run the batch built with `_put`, then sample the rows in `samples` from it."""
        if self._batch.n_tokens == 0:
            return
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        self._batch.n_tokens = 0
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        now = time.perf_counter()
        for slot, i in samples:
            self._sample(slot, i, now)

    def _step(self) -> None:
        self._resume_waiters()
        active: list[_Slot] = []
        for slot in self._slots:
            job = slot.job
            if job is None:
                continue
            if job.gen.cancelled:
                self._finish(slot, "cancelled")
                continue
            active.append(slot)
        if not active:
            return
        self.steps += 1
        if self.options.batch_invariant:
            self._step_invariant(active)
        else:
            self._step_merged(active)

    def _step_merged(self, active: list[_Slot]) -> None:
        """One llama_decode for everything; llama.cpp splits it into ubatches as it likes."""
        samples: list[tuple[_Slot, int]] = []
        budget = self.options.n_batch
        # Decoding slots first: one token each keeps every running stream moving.
        for slot in active:
            job = slot.job
            assert job is not None
            if job.next_token is not None:
                i = self._put(job.next_token, len(slot.tokens), slot.seq, True)
                slot.tokens.append(job.next_token)
                job.next_token = None
                samples.append((slot, i))
                budget -= 1
        # Then prompt chunks, oldest request first, in what is left of the batch.
        for slot in sorted(active, key=lambda s: s.job.queued_at if s.job else 0.0):
            job = slot.job
            if job is None or not job.pending or budget <= 0:
                continue
            chunk = job.pending[:budget]
            job.pending = job.pending[len(chunk) :]
            job.gen.progress.prompt_done += len(chunk)
            last = not job.pending
            for k, tok in enumerate(chunk):
                i = self._put(tok, len(slot.tokens), slot.seq, last and k == len(chunk) - 1)
                slot.tokens.append(tok)
            if last:
                samples.append((slot, i))
            budget -= len(chunk)
        self._decode(samples)

    def _step_invariant(self, active: list[_Slot]) -> None:
        """Decode so that every row is computed by the same kernel whatever shares its batch.

        Rows stay under BATCH_INVARIANT_UBATCH per sequence in every ubatch (llama.cpp gives
        each sequence the same number of rows in a ubatch), and no ubatch holds a single row of
        a single sequence once it sees 256 cells or more: ggml then splits that row's attention
        over the threads and sums the parts in another order. So the generating rows go in one
        llama_decode, with a throwaway second row for a sequence that would sit alone in its
        ubatch, and each prompt chunk in its own, cut so that no ubatch gets just one row.
        """
        samples: list[tuple[_Slot, int]] = []
        dummies: list[tuple[_Slot, int]] = []
        gen = sorted((s for s in active if s.job and s.job.next_token is not None), key=_seq)
        for k, slot in enumerate(gen):
            job = slot.job
            assert job is not None and job.next_token is not None
            pos = len(slot.tokens)
            i = self._put(job.next_token, pos, slot.seq, True)
            samples.append((slot, i))
            # llama.cpp puts sequences with consecutive ids in one ubatch; a sequence without
            # a neighbour on either side is alone in its own.
            alone = (k == 0 or _seq(gen[k - 1]) != slot.seq - 1) and (
                k == len(gen) - 1 or _seq(gen[k + 1]) != slot.seq + 1
            )
            if alone and self._needs_second_row(pos):
                self._put(job.next_token, pos + 1, slot.seq, False)
                dummies.append((slot, pos + 1))
            slot.tokens.append(job.next_token)
            job.next_token = None
        self._decode(samples)
        for slot, pos in dummies:
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, pos, -1)
        # Then prompt chunks, oldest request first, each in its own llama_decode.
        budget = self.options.n_batch
        for slot in sorted(active, key=lambda s: s.job.queued_at if s.job else 0.0):
            job = slot.job
            if job is None or not job.pending or budget <= 0:
                continue
            n = min(len(job.pending), budget)
            last = n == len(job.pending)
            ub = BATCH_INVARIANT_UBATCH
            if n % ub == 1 and not last and n > 1:
                n -= 1  # the next chunk starts with this row instead of it sitting alone
            chunk = job.pending[:n]
            job.pending = job.pending[n:]
            job.gen.progress.prompt_done += n
            pos = len(slot.tokens)
            for k, tok in enumerate(chunk):
                i = self._put(tok, pos + k, slot.seq, last and k == n - 1)
            slot.tokens.extend(chunk)
            second = n % ub == 1 and self._needs_second_row(pos + n - 1)
            if second:
                self._put(chunk[-1], pos + n, slot.seq, False)
            self._decode([(slot, i)] if last else [])
            if second:
                llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, pos + n, -1)
            budget -= n

    def _needs_second_row(self, pos: int) -> bool:
        # ggml splits a lone row's attention only over 512 cells or more (llama.cpp pads the
        # cells it shows to 256), and a second row needs a free cell.
        return pos + 2 > 256 and pos + 2 <= self.n_ctx_slot

    def _sample(self, slot: _Slot, i: int, now: float) -> None:
        job = slot.job
        assert job is not None
        if job.grammar is not None:
            if self._grammar_sampler is None:
                self._grammar_sampler = GrammarSampler(self.n_vocab)
            tok = self._grammar_sampler.sample(job.sampler, job.grammar, self._ctx, i)
        else:
            tok = llama_cpp.llama_sampler_sample(job.sampler, self._ctx, i)
        if not job.first_token_at:
            job.first_token_at = job.gen.progress.first_token_at = now
        if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
            self._finish(slot, "stop")
            return
        job.n_gen += 1
        job.gen.progress.generated = job.n_gen
        self.tokens_generated += 1
        special = tok in job.gen.request.preserved_tokens
        if emit_text(job, self._piece(tok, special)):
            self._finish(slot, "stop")
        elif job.n_gen >= job.gen.request.max_tokens or (len(slot.tokens) + 1 >= self.n_ctx_slot):
            self._finish(slot, "length")
        else:
            job.next_token = tok

    def _finish(self, slot: _Slot, reason: str, error: str | None = None) -> None:
        job = slot.job
        assert job is not None
        slot.job = None
        slot.last_used = time.perf_counter()
        _free_samplers(job)
        if job.pending:  # cancelled mid-prefill: drop the partial prompt from the cache
            keep = len(slot.tokens)
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, keep, -1)
        # Bytes of a character cut in half by the limit are not in text_held: dropped rather
        # than sent as U+FFFD.
        finish_job(job, reason, error, self._record)

    def _record(self, reason: str, timings: Timings) -> None:
        self.last_timings = timings
        self.finished[reason] += 1

    def _fail_all(self, message: str) -> None:
        with self._cond:
            for slot in self._slots:
                if slot.job:
                    self._finish(slot, "error", message)
            for job in self._pending:
                _free_samplers(job)
                job.gen.emit(
                    Finished("error", len(job.gen.request.prompt_tokens), 0, error=message)
                )
            self._pending.clear()
            self._closing = True

    # ----- embeddings ----------------------------------------------------------------------

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One mean-pooled, L2-normalised vector per text, and the tokens read."""
        with self._embed_lock:
            if self._embed_ctx is None:
                self._embed_ctx = self._make_embed_ctx()
            ctx = self._embed_ctx
            n_ctx = llama_cpp.llama_n_ctx(ctx)
            n_embd = llama_cpp.llama_model_n_embd(self._model)
            batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
            try:
                out: list[list[float]] = []
                total = 0
                for text in texts:
                    toks = self.tokenize(text, add_special=True, special=False)
                    if not toks:
                        raise InvalidRequest("Cannot embed an empty string.", param="input")
                    if len(toks) > n_ctx:
                        raise ContextOverflow(len(toks), n_ctx, what="input")
                    total += len(toks)
                    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                    batch.n_tokens = len(toks)
                    for i, t in enumerate(toks):
                        batch.token[i] = t
                        batch.pos[i] = i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = True
                    rc = llama_cpp.llama_decode(ctx, batch)
                    if rc != 0:
                        raise EngineFailure(f"llama_decode returned {rc} while embedding")
                    ptr = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                    vec = [float(ptr[k]) for k in range(n_embd)]
                    norm = sum(v * v for v in vec) ** 0.5 or 1.0
                    out.append([v / norm for v in vec])
                return out, total
            finally:
                llama_cpp.llama_batch_free(batch)

    def _make_embed_ctx(self) -> Any:
        n = min(self.n_ctx_slot, 2048)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n
        p.n_batch = n
        p.n_ubatch = n
        p.n_seq_max = 1
        p.embeddings = True
        p.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        p.n_threads = self._threads
        p.n_threads_batch = self._threads
        p.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, p)
        if not ctx:
            raise EngineFailure(f"could not create an embedding context for {self.info.id}")
        return ctx

    # ----- reranking -----------------------------------------------------------------------

    @property
    def is_reranker(self) -> bool:
        """A model with a classification head for (query, document) pairs: pooling type rank."""
        h = self.info.header
        return h is not None and h.arch_value("pooling_type") == llama_cpp.LLAMA_POOLING_TYPE_RANK

    def rerank(
        self, query: str, documents: list[str], instruction: str | None = None
    ) -> tuple[list[float], int]:
        """A relevance score in [0, 1] per document, and the tokens read (server.engines.rerank):
        pairs decoded together, several sequences to a batch, in a context of their own."""
        rank = self.is_reranker
        prompts = [self._rerank_prompt(query, d, instruction, rank) for d in documents]
        with self._embed_lock:
            if self._rank_ctx is None:
                self._rank_ctx = self._make_rank_ctx(rank)
            ctx = self._rank_ctx
            n_ctx = int(llama_cpp.llama_n_ctx(ctx))
            check_rerank_lengths([len(p) for p in prompts], n_ctx)
            yes, no = rerank_answers(lambda w: self.tokenize(w, add_special=False, special=False))
            if not rank and (not yes or not no):
                raise InvalidRequest(
                    f"{self.info.id} has no single token for yes and no, so it cannot rerank.",
                    param="model",
                )
            scores = [0.0] * len(prompts)
            invariant = self.options.batch_invariant
            batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
            try:
                # Alone or with others, a pair gets the same score when batch_invariant: a
                # reranker's pairs are decoded one at a time; a judge's in calls of under 64
                # rows (BATCH_INVARIANT_UBATCH), padded with rows of a throw-away sequence to a
                # multiple of 4, since ggml's repacked K-quant kernels (Gemma's Q4_K) compute
                # rows in fours and the rest apart, which rounds differently.
                seqs = 1 if rank and invariant else RERANK_SEQS
                mem = llama_cpp.llama_get_memory(ctx)
                for group in rerank_pack([len(p) for p in prompts], n_ctx, seqs):
                    llama_cpp.llama_memory_clear(mem, True)
                    rows = [
                        (seq, pos, tok)
                        for seq, i in enumerate(group)
                        for pos, tok in enumerate(prompts[i])
                    ]
                    judged = invariant and not rank
                    step = RERANK_STEP if judged else len(rows)
                    for at in range(0, len(rows), step):
                        chunk = rows[at : at + step]
                        pad = -len(chunk) % 4 if judged else 0
                        for n, (seq, pos, tok) in enumerate(chunk):
                            batch.token[n] = tok
                            batch.pos[n] = pos
                            batch.n_seq_id[n] = 1
                            batch.seq_id[n][0] = seq
                            batch.logits[n] = rank or pos == len(prompts[group[seq]]) - 1
                        for k in range(pad):
                            n = len(chunk) + k
                            batch.token[n] = chunk[0][2]
                            batch.pos[n] = k
                            batch.n_seq_id[n] = 1
                            batch.seq_id[n][0] = RERANK_SEQS  # the padding's own sequence
                            batch.logits[n] = False
                        batch.n_tokens = len(chunk) + pad
                        rc = llama_cpp.llama_decode(ctx, batch)
                        if rc != 0:
                            raise EngineFailure(f"llama_decode returned {rc} while reranking")
                        if pad:
                            llama_cpp.llama_memory_seq_rm(mem, RERANK_SEQS, -1, -1)
                        for n, (seq, pos, _) in enumerate(chunk):
                            if pos != len(prompts[group[seq]]) - 1:
                                continue
                            if rank:
                                ptr = llama_cpp.llama_get_embeddings_seq(ctx, seq)
                                scores[group[seq]] = float(ptr[0])
                            else:
                                ptr = llama_cpp.llama_get_logits_ith(ctx, n)
                                scores[group[seq]] = judge_score(ptr, yes, no)
            finally:
                llama_cpp.llama_batch_free(batch)
        return scores, sum(len(p) for p in prompts)

    def _rerank_prompt(
        self, query: str, document: str, instruction: str | None, rank: bool
    ) -> list[int]:
        if not rank:
            messages = judge_messages(query, document, instruction)
            return self.format_chat(messages, template_kwargs=JUDGE_TEMPLATE_KWARGS)
        # As llama-server writes a pair for a reranker (format_prompt_rerank).
        template = llama_cpp.llama_model_chat_template(self._model, b"rerank")
        if template:
            text = template.decode("utf-8", "replace")
            text = text.replace("{query}", query).replace("{document}", document)
            return self.tokenize(text, add_special=False, special=True)
        v = self._vocab
        eos = llama_cpp.llama_vocab_eos(v)
        if eos < 0:
            eos = llama_cpp.llama_vocab_sep(v)
        out = [llama_cpp.llama_vocab_bos(v)] if llama_cpp.llama_vocab_get_add_bos(v) else []
        out += self.tokenize(query, add_special=False, special=False)
        out += [eos] if llama_cpp.llama_vocab_get_add_eos(v) else []
        out += [llama_cpp.llama_vocab_sep(v)] if llama_cpp.llama_vocab_get_add_sep(v) else []
        out += self.tokenize(document, add_special=False, special=False)
        out += [eos] if llama_cpp.llama_vocab_get_add_eos(v) else []
        return out

    def _make_rank_ctx(self, rank: bool) -> Any:
        n = min(self.n_ctx_slot, RERANK_CTX)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n
        p.n_batch = n
        # A non-causal reranker (BERT) must see each pair in one ubatch.
        invariant = self.options.batch_invariant
        p.n_ubatch = n if rank else min(n, RERANK_STEP if invariant else 512)
        p.n_seq_max = RERANK_SEQS + 1  # and the padding's
        p.kv_unified = True  # the pairs of a batch share the context's cells
        if rank:
            p.embeddings = True
            p.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_RANK
        else:
            p.n_outputs_max = RERANK_SEQS + 1  # one row of logits per pair (and the padding)
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.n_threads = self._threads
        p.n_threads_batch = self._threads
        p.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._model, p)
        if not ctx:
            raise EngineFailure(f"could not create a rerank context for {self.info.id}")
        return ctx


def _physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:
        n = None
    return max(1, n or os.cpu_count() or 1)
