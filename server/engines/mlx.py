"""The MLX engine: an MLX model directory served through mlx-lm's continuous batching.

One thread per model owns everything MLX touches (weights, KV caches, streams): it loads the
model, runs mlx-lm's `BatchGenerator` (new requests join at the next step, each with its own
sampler, seed and logits processors) and computes embeddings. MLX streams belong to the thread
that made them, and a thread that used one must clear them before it ends or the process can
abort at exit; keeping MLX on one thread makes both rules easy to keep.

Text is produced as llama.cpp does it: every token maps to its bytes (byte-level BPE and
SentencePiece vocabularies are read from tokenizer.json), an incremental UTF-8 decoder joins
them, and text that could start a stop string is held back. Structured output (a GBNF grammar)
is enforced with llguidance when it is installed: the grammar masks each step's logits.

Prompt caching: the KV cache of every finished sequence goes into mlx-lm's `LRUPromptCache`;
a new request starts from the entry sharing the longest prefix with its prompt (trimmed to
that prefix), so a chat's next turn computes only its new tokens. Kept caches plus running
sequences stay within the KV budget the memory estimate reserved.
"""

from __future__ import annotations

import codecs
import json
import logging
import random
import re
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from server.chat_template import ChatTemplate
from server.discovery import ModelInfo
from server.engines.base import (
    EngineOptions,
    Finished,
    Generation,
    GenerationRequest,
    Sink,
    Timings,
    emit_text,
    finish_job,
)
from server.engines.rerank import (
    JUDGE_TEMPLATE_KWARGS,
    answer_tokens,
    check_lengths,
    judge_messages,
    judge_score,
)
from server.errors import ContextOverflow, EngineFailure, InvalidRequest, QueueFull

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64  # as the llama.cpp engine
_CACHE_KEY = "model"  # LRUPromptCache keys entries by model; an engine has one
# For a model directory without a chat template (base models).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def grammar_supported() -> bool:
    """Whether this installation can enforce GBNF grammars on MLX models (llguidance)."""
    import importlib.util

    try:
        return importlib.util.find_spec("llguidance") is not None
    except (ImportError, ValueError):  # a broken install, or the module blocked on purpose
        return False


@dataclass
class _Job:
    gen: Generation
    queued_at: float
    uid: int = -1
    started_at: float = 0.0
    first_token_at: float = 0.0
    n_gen: int = 0
    text_held: str = ""
    stopped_by: str | None = None  # the stop string that matched
    decoder: Any = None
    grammar: Any = None  # llguidance matcher, compiled at submit
    cached: int = 0  # prompt tokens taken from the prompt cache
    slot: int = -1  # which of the engine's `parallel` places in the batch it holds


@dataclass
class _Call:
    """Work that must run on the MLX thread (embeddings); the caller waits for it."""

    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


_live: weakref.WeakSet[MlxEngine] = weakref.WeakSet()


def _close_live_engines() -> None:
    # An MLX thread still running when the interpreter exits can abort the process; close
    # whatever the program forgot to.
    for engine in list(_live):
        engine.close()


_atexit_registered = False


class MlxEngine:
    """A loaded MLX model directory serving many requests at once through mlx-lm."""

    takes_text = False  # the pipeline renders and tokenizes for it

    def __init__(self, info: ModelInfo, options: EngineOptions | None = None) -> None:
        self.info = info
        self.options = options or EngineOptions()
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._active: dict[int, _Job] = {}  # mlx-lm uid -> job
        self._slots: list[_Job | None] = [None] * max(1, self.options.parallel)
        self._calls: deque[_Call] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._model: Any = None
        self._tokenizer: Any = None  # mlx-lm's TokenizerWrapper
        self._generator: Any = None
        self._prompt_cache: Any = None  # mlx-lm's LRUPromptCache
        self._kv_budget = 0
        self._ll_tokenizer: Any = None
        self._ll_lock = threading.Lock()
        self._tok_lock = threading.Lock()  # the tokenizer's special-token switch is shared
        self.n_ctx_slot = self.options.n_ctx
        self.n_vocab = 0
        self.requests_total = 0
        self.tokens_generated = 0
        self.finished: Counter[str] = Counter()
        self.steps = 0
        self.last_timings: Timings | None = None
        self.failure: str | None = None
        self.on_failure: Callable[[str], None] | None = None
        # The model's Jinja template (None: it has none; then mlx-lm's own renderer or ChatML).
        self.chat_template: ChatTemplate | None = None
        self._fallback: ChatTemplate | None = None
        self._renderer: Any = None
        self.supports_grammar = grammar_supported()

    # ----- loading -------------------------------------------------------------------------

    def load(self) -> None:
        """Load weights and tokenizer on the engine's own thread and wait until it is ready."""
        global _atexit_registered
        if not _atexit_registered:
            import atexit

            atexit.register(_close_live_engines)
            _atexit_registered = True
        self._thread = threading.Thread(target=self._main, name=f"mlx:{self.info.id}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._thread.join()
            self._thread = None
            raise EngineFailure(
                f"mlx-lm could not load {self.info.path}: {self._load_error}"
            ) from self._load_error
        _live.add(self)

    def _load_model(self) -> None:
        from mlx_lm.utils import load_model, load_tokenizer

        model, config = load_model(self.info.path)
        eos = config.get("eos_token_id")
        tokenizer = load_tokenizer(self.info.path, eos_token_ids=eos)  # type: ignore[no-untyped-call]
        hf = tokenizer._tokenizer
        self._model = model
        self._tokenizer = tokenizer
        self._hf = hf
        backend = hf.backend_tokenizer
        self._backend = backend
        text_config = config.get("text_config") or {}
        self.n_vocab = int(
            config.get("vocab_size") or text_config.get("vocab_size") or len(tokenizer)
        )
        self._grammar_vocab = max(self.n_vocab, len(tokenizer))
        self._token_bytes = _token_bytes_table(backend, self._grammar_vocab)
        # Control tokens' own text, emitted only for a request's preserved tokens.
        self._special_bytes = {
            i: t.content.encode("utf-8")
            for i, t in backend.get_added_tokens_decoder().items()
            if t.special
        }
        self._eos = sorted(int(t) for t in tokenizer.eos_token_ids)
        n_train = self.info.context_length or 0
        opts = self.options
        self.n_ctx_slot = max(64, min(opts.n_ctx, n_train) if n_train > 0 else opts.n_ctx)
        self._bos_text = hf.bos_token or ""
        template = opts.chat_template or _default_template(hf.chat_template)
        template = template or self.info.chat_template
        if template:
            self.chat_template = self._make_template(template)
        elif tokenizer.has_chat_template:
            # A few models have no Jinja template but a renderer in mlx-lm (chat_template_type).
            self._renderer = tokenizer
        else:
            self._fallback = self._make_template(CHATML_TEMPLATE)

    def _make_template(self, source: str) -> ChatTemplate:
        hf = self._hf
        return ChatTemplate(
            source, bos_token=hf.bos_token or "", eos_token=hf.eos_token or "", name=self.info.id
        )

    def _make_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        n = max(1, self.options.parallel)
        return BatchGenerator(
            self._model,
            stop_tokens=[[t] for t in self._eos],
            completion_batch_size=n,
            prefill_batch_size=n,
            prefill_step_size=max(16, self.options.n_batch),
        )

    def _make_prompt_cache(self) -> Any:
        from mlx_lm.models.cache import LRUPromptCache

        from server.memory import estimate_mlx

        n = max(1, self.options.parallel)
        if self.info.mlx is not None:
            self._kv_budget = estimate_mlx(self.info.mlx, self.n_ctx_slot, n).kv_cache
        else:
            self._kv_budget = 1 << 62
        return LRUPromptCache(max_size=n)

    # ----- the model's text side ------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return int(self.n_ctx_slot)

    def tokenize(self, text: str, *, add_special: bool = True, special: bool = True) -> list[int]:
        backend = self._backend
        with self._tok_lock:
            # special=False: "<|im_start|>" in user text is plain characters, not a control
            # token. The switch lives on the shared tokenizer, hence the lock.
            backend.encode_special_tokens = not special
            try:
                return list(backend.encode(text, add_special_tokens=add_special).ids)
            finally:
                backend.encode_special_tokens = False

    def detokenize(self, tokens: list[int]) -> str:
        table = self._token_bytes
        return b"".join(table[t] if 0 <= t < len(table) else b"" for t in tokens).decode(
            "utf-8", "replace"
        )

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        kwargs = template_kwargs or {}
        template = self.chat_template or self._fallback
        if template is not None:
            # Sandboxed and bounded in time and size; raises InvalidRequest or ChatTemplateBroken.
            return template.render(messages, tools=tools, **kwargs)
        try:
            out = self._renderer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
            )
        except Exception as e:  # a renderer's errors are the messages' (it is mlx-lm's code)
            raise InvalidRequest(
                f"The chat template rejected the messages: {e}", param="messages"
            ) from e
        return str(out)

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
        """Queue a request; events go to `sink` from the MLX thread."""
        if any(not 0 <= t < self.n_vocab for t in request.logit_bias):
            raise InvalidRequest(
                f"logit_bias names a token outside 0..{self.n_vocab - 1}.", param="logit_bias"
            )
        gen = Generation(request, sink)
        job = _Job(gen=gen, queued_at=time.perf_counter())
        if request.grammar is not None:
            job.grammar = self._compile_grammar(request.grammar, request.grammar_param)
        with self._cond:
            if self._closing or self.failure is not None or self._thread is None:
                raise EngineFailure(f"{self.info.id} is not loaded")
            slots = max(1, self.options.parallel)
            if len(self._active) >= slots and len(self._pending) >= self.options.max_queue:
                raise QueueFull(
                    f"{self.info.id}: all {slots} slots are busy and "
                    f"{len(self._pending)} requests are waiting; retry shortly."
                )
            self._pending.append(job)
            self.requests_total += 1
            self._cond.notify()
        return gen

    def _compile_grammar(self, gbnf: str, param: str) -> Any:
        if not self.supports_grammar:
            raise InvalidRequest(
                f"'{self.info.id}' runs on MLX, which cannot enforce response_format (or a "
                "tool choice) without the llguidance package; install opta-lmx[mlx] or use "
                "a GGUF model.",
                param=param,
            )
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(gbnf))
        except Exception as e:
            raise InvalidRequest(
                f"The grammar made from {param} is invalid: {e}", param=param
            ) from e
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar)
        if matcher.is_error():
            raise InvalidRequest(
                f"The grammar made from {param} is invalid: {matcher.get_error()}",
                param=param,
            )
        return matcher

    def _llg_tokenizer(self) -> Any:
        with self._ll_lock:
            if self._ll_tokenizer is None:
                import llguidance

                with self._tok_lock:
                    spec = self._backend.to_str()
                self._ll_tokenizer = llguidance.LLTokenizer(
                    spec,
                    n_vocab=self._grammar_vocab,
                    eos_token=self._eos[0] if self._eos else None,
                )
            return self._ll_tokenizer

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "slots": max(1, self.options.parallel),
                "slots_busy": len(self._active),
                "queue_depth": len(self._pending),
                "requests_total": self.requests_total,
                "tokens_generated": self.tokens_generated,
                "finished": dict(self.finished),
                # Per slot: idle, prefill or decode, and the tokens its sequence holds.
                "slot_states": [_slot_state(j) for j in self._slots],
            }

    def cancel_all(self) -> None:
        with self._cond:
            for job in self._pending:
                job.gen.cancel()
            for job in self._active.values():
                job.gen.cancel()
            self._cond.notify()

    @property
    def alive(self) -> bool:
        """False once the MLX thread has died: the model must be unloaded and loaded again."""
        return self.failure is None

    def close(self) -> None:
        """Cancel everything, stop the MLX thread and free the model's memory."""
        with self._cond:
            self._closing = True
        self.cancel_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
            if thread.is_alive():
                log.error("MLX thread of %s did not stop; its memory is not freed", self.info.id)
                return
            self._thread = None
        _live.discard(self)

    # ----- embeddings ----------------------------------------------------------------------

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One mean-pooled, L2-normalised vector of the last hidden states per text."""
        tokenized: list[list[int]] = []
        for text in texts:
            toks = self.tokenize(text, add_special=True, special=False)
            if not toks:
                raise InvalidRequest("Cannot embed an empty string.", param="input")
            if len(toks) > self.n_ctx_slot:
                raise ContextOverflow(len(toks), self.n_ctx_slot, what="input")
            tokenized.append(toks)
        inner = getattr(self._model, "model", None)
        if inner is None or not callable(inner):
            raise InvalidRequest(
                f"'{self.info.id}' ({self.info.architecture}) does not expose its hidden "
                "states to mlx-lm, so it cannot embed.",
                param="model",
            )

        def run() -> list[list[float]]:
            import mlx.core as mx

            out = []
            for toks in tokenized:
                hidden = inner(mx.array([toks]))
                vec = mx.mean(hidden[0].astype(mx.float32), axis=0)
                vec = vec / mx.maximum(mx.linalg.norm(vec), 1e-12)
                out.append(cast(list[float], vec.tolist()))
            return out

        return self._call(run), sum(len(t) for t in tokenized)

    # ----- reranking -----------------------------------------------------------------------

    def rerank(
        self, query: str, documents: list[str], instruction: str | None = None
    ) -> tuple[list[float], int]:
        """The judge's P(yes) per document (server.engines.rerank), one forward pass each."""
        prompts = [
            self.format_chat(
                judge_messages(query, d, instruction), template_kwargs=JUDGE_TEMPLATE_KWARGS
            )
            for d in documents
        ]
        check_lengths([len(p) for p in prompts], self.n_ctx_slot)
        yes, no = answer_tokens(lambda w: self.tokenize(w, add_special=False, special=False))
        if not yes or not no:
            raise InvalidRequest(
                f"{self.info.id} has no single token for yes and no, so it cannot rerank.",
                param="model",
            )

        def run() -> list[float]:
            import mlx.core as mx

            out = []
            for toks in prompts:
                logits = self._model(mx.array([toks]))[0, -1].astype(mx.float32)
                out.append(judge_score(logits.tolist(), yes, no))
            return out

        return self._call(run), sum(len(p) for p in prompts)

    def _call(self, fn: Callable[[], Any]) -> Any:
        call = _Call(fn)
        with self._cond:
            if self._closing or self.failure is not None or self._thread is None:
                raise EngineFailure(f"{self.info.id} is not loaded")
            self._calls.append(call)
            self._cond.notify()
        call.done.wait()
        if call.error is not None:
            if isinstance(call.error, InvalidRequest | EngineFailure):
                raise call.error
            raise EngineFailure(f"MLX failed: {call.error}") from call.error
        return call.result

    # ----- the MLX thread ------------------------------------------------------------------

    def _main(self) -> None:
        import mlx.core as mx

        try:
            try:
                self._load_model()
                self._generator = self._make_generator()
                self._prompt_cache = self._make_prompt_cache()
            except Exception as e:
                self._load_error = e
                return
            finally:
                self._ready.set()
            self._loop()
        except Exception as e:  # never leave a client waiting on a dead thread
            log.exception("MLX loop of %s failed", self.info.id)
            self.failure = f"engine failure: {e}"
            self._fail_all(self.failure)
            if self.on_failure is not None:
                self.on_failure(self.failure)
        finally:
            if self._generator is not None:
                self._generator.close()
            self._generator = None
            self._prompt_cache = None
            self._model = None
            mx.clear_cache()
            # This thread's streams must go with it (see the module docstring).
            mx.clear_streams()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._closing and not self._pending and not self._active and not self._calls
                ):
                    self._cond.wait()
                calls = list(self._calls)
                self._calls.clear()
                if self._closing and not self._active:
                    for job in self._pending:
                        self._finish_unstarted(job)
                    self._pending.clear()
                    for call in calls:
                        call.error = EngineFailure(f"{self.info.id} is unloading")
                        call.done.set()
                    return
                cancelled = [j for j in self._active.values() if j.gen.cancelled]
                admitted: list[_Job] = []
                slots = max(1, self.options.parallel)
                while self._pending and len(self._active) + len(admitted) < slots:
                    job = self._pending.popleft()
                    if job.gen.cancelled:
                        self._finish_unstarted(job)
                    else:
                        admitted.append(job)
            for call in calls:
                try:
                    call.result = call.fn()
                except Exception as e:
                    call.error = e
                call.done.set()
            if cancelled:
                self._remove([j.uid for j in cancelled])
                for job in cancelled:
                    self._finish(job, "cancelled")
            for job in admitted:
                self._insert(job)
            if self._active:
                self._step()

    def _insert(self, job: _Job) -> None:
        from mlx_lm.generate import StopSequences
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        req = job.gen.request
        prompt = req.prompt_tokens
        job.started_at = time.perf_counter()
        job.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        room = self.n_ctx_slot - len(prompt)
        if not prompt or room <= 0:
            self._finish(job, "length")
            return
        cache, rest = self._prompt_cache.fetch_nearest_cache(_CACHE_KEY, prompt)
        if cache is not None and not rest:
            # All of it is cached, but the first token needs the last prompt token's logits.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        job.cached = len(prompt) - len(rest)
        job.slot = self._slots.index(None)  # admitted only while a slot is free
        self._slots[job.slot] = job
        progress = job.gen.progress
        progress.slot = job.slot
        progress.cached = progress.prompt_done = job.cached
        stops = StopSequences([] if req.ignore_eos else [[t] for t in self._eos])
        (uid,) = self._generator.insert(
            [rest],
            caches=[cache],
            all_tokens=[prompt[: job.cached]],
            max_tokens=[max(1, min(req.max_tokens, room))],
            samplers=[self._make_sampler(req)],
            logits_processors=[self._make_processors(req, job)],
            stop_sequences=[stops],
        )
        job.uid = uid
        with self._cond:
            self._active[uid] = job

    def _make_sampler(self, req: GenerationRequest) -> Any:
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

        sp = req.sampling
        if sp.temperature <= 0:
            return greedy_sampler  # shared: greedy rows of a batch are sampled in one call
        seed = sp.seed if sp.seed is not None else random.getrandbits(32)
        # A key of its own per request: a seed gives the same tokens whatever else runs.
        state = {"key": mx.random.key(seed & 0xFFFFFFFF)}
        inv_temp = 1.0 / sp.temperature

        def sample(logprobs: Any) -> Any:
            keys = mx.random.split(state["key"])
            state["key"] = keys[0]
            if sp.top_k > 0:
                logprobs = apply_top_k(logprobs, sp.top_k)
            if 0 < sp.top_p < 1:
                logprobs = apply_top_p(logprobs, sp.top_p)
            if sp.min_p > 0:
                logprobs = apply_min_p(logprobs, sp.min_p)
            return mx.random.categorical(logprobs * inv_temp, key=keys[1])

        return sample

    def _make_processors(self, req: GenerationRequest, job: _Job) -> list[Any]:
        from mlx_lm.sample_utils import make_logits_processors

        sp = req.sampling
        bias = dict(req.logit_bias)
        if req.ignore_eos:
            bias.update({t: float("-inf") for t in self._eos})
        procs: list[Any] = make_logits_processors(
            logit_bias=bias or None,
            repetition_penalty=sp.repeat_penalty if sp.repeat_penalty != 1.0 else None,
            repetition_context_size=PENALTY_LAST_N,
            presence_penalty=sp.presence_penalty or None,
            presence_context_size=PENALTY_LAST_N,
            frequency_penalty=sp.frequency_penalty or None,
            frequency_context_size=PENALTY_LAST_N,
        )
        if job.grammar is not None:
            procs.append(_GrammarMask(job.grammar, self._grammar_vocab))
        return procs

    def _step(self) -> None:
        _, responses = self._generator.next()
        self.steps += 1
        now = time.perf_counter()
        for r in responses:
            job = self._active.get(r.uid)
            if job is None:
                continue
            if not job.first_token_at:
                # mlx-lm prefills inside next(): the whole prompt is in by the first token.
                job.first_token_at = job.gen.progress.first_token_at = now
                job.gen.progress.prompt_done = len(job.gen.request.prompt_tokens)
            token = int(r.token)
            if r.finish_reason is not None:
                self._keep_cache(r.all_tokens, r.prompt_cache)
            if r.finish_reason == "stop":  # an end-of-generation token: not text
                self._finish(job, "stop")
                continue
            job.n_gen += 1
            job.gen.progress.generated = job.n_gen
            self.tokens_generated += 1
            if token in job.gen.request.preserved_tokens:
                piece = self._special_bytes.get(token) or self._token_bytes[token]
            else:
                piece = self._token_bytes[token] if token < len(self._token_bytes) else b""
            if emit_text(job, piece):
                if r.finish_reason is None:
                    self._remove([r.uid])
                self._finish(job, "stop")
            elif r.finish_reason is not None:
                self._finish(job, "length")

    def _remove(self, uids: list[int]) -> None:
        """Take sequences out of the batch, keeping their KV caches for later prompts."""
        for cache, tokens in self._generator.remove(uids, return_prompt_caches=True).values():
            self._keep_cache(tokens, cache)

    def _keep_cache(self, tokens: list[int] | None, cache: list[Any] | None) -> None:
        if not tokens or not cache:
            return
        self._prompt_cache.insert_cache(_CACHE_KEY, list(tokens), cache)
        room = self._kv_budget - self._generator.prompt_cache_nbytes
        self._prompt_cache.trim_to(n_bytes=max(0, room))

    def _finish_unstarted(self, job: _Job) -> None:
        self.finished["cancelled"] += 1
        job.gen.emit(Finished("cancelled", len(job.gen.request.prompt_tokens), 0))

    def _finish(self, job: _Job, reason: str, error: str | None = None) -> None:
        with self._cond:
            self._active.pop(job.uid, None)
            if 0 <= job.slot < len(self._slots) and self._slots[job.slot] is job:
                self._slots[job.slot] = None
        finish_job(job, reason, error, self._record)

    def _record(self, reason: str, timings: Timings) -> None:
        self.last_timings = timings
        self.finished[reason] += 1

    def _fail_all(self, message: str) -> None:
        with self._cond:
            active = list(self._active.values())
            pending = list(self._pending)
            self._pending.clear()
            calls = list(self._calls)
            self._calls.clear()
            self._closing = True
        for job in active:
            self._finish(job, "error", message)
        for job in pending:
            job.gen.emit(Finished("error", len(job.gen.request.prompt_tokens), 0, error=message))
        for call in calls:
            call.error = EngineFailure(message)
            call.done.set()


class _GrammarMask:
    """A logits processor letting through only the tokens the grammar allows next."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.calls = 0

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np

        # The first call sees the prompt's last token; later ones the token sampled last.
        if self.calls:
            self.matcher.consume_token(int(tokens[-1].item()))
        self.calls += 1
        words = (self.n_vocab + 31) // 32
        mask = np.full((1, words), -1, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        width = int(logits.shape[-1])
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:width]
        if len(bits) < width:  # logits wider than the vocabulary: padding rows, never allowed
            bits = np.pad(bits, (0, width - len(bits)))
        allowed = mx.array(bits.astype(np.bool_))
        return mx.where(allowed, logits, mx.array(float("-inf"), dtype=logits.dtype))


def _slot_state(job: _Job | None) -> tuple[str, int]:
    if job is None:
        return ("idle", 0)
    n_prompt = len(job.gen.request.prompt_tokens)
    return ("decode" if job.first_token_at else "prefill", n_prompt + job.n_gen)


def _default_template(template: Any) -> str | None:
    """The tokenizer's template; of several named ones (a dict), the default."""
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) and template else None


def _token_bytes_table(backend: Any, n: int) -> list[bytes]:
    """The bytes each token id stands for in generated text (special tokens: none)."""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = _decoder_kinds(decoder)
    added = backend.get_added_tokens_decoder()
    byte_of = _gpt2_byte_decoder() if "ByteLevel" in kinds else None
    spm = "Metaspace" in kinds or "Replace" in kinds or "ByteFallback" in kinds
    table: list[bytes] = []
    for i in range(n):
        tok = added.get(i)
        if tok is not None:
            table.append(b"" if tok.special else tok.content.encode("utf-8"))
            continue
        piece = backend.id_to_token(i)
        if piece is None:
            table.append(b"")
        elif byte_of is not None:
            table.append(bytes(byte_of.get(c, 0x3F) for c in piece))
        elif spm:
            m = _BYTE_TOKEN.match(piece)
            table.append(
                bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
            )
        else:  # WordPiece and others: the tokenizer's own decoding, token by token
            table.append(backend.decode([i], skip_special_tokens=True).encode("utf-8"))
    return table


def _decoder_kinds(decoder: dict[str, Any]) -> set[str]:
    kinds = {str(decoder.get("type", ""))}
    for d in decoder.get("decoders") or []:
        kinds |= _decoder_kinds(d)
    return kinds


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, reversed."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}
