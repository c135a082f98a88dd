"""Sampling a token under a grammar the way llama.cpp's own server does: the sampler chain
picks from the whole vocabulary first, and the grammar checks only that one token. Only a
token the grammar rejects makes it filter every candidate (and the chain pick again).

Applying a grammar to every one of a vocabulary's 49k-262k tokens at every step costs more than
the model's decode: with Codex's tools offered on `auto` (the reply held to the tool-call
shape by a grammar), decoding ran at a third of its plain rate.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import llama_cpp
import numpy as np

# llama_token_data as numpy sees it: id (int32), logit (float32), p (float32).
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
_DATA_P = ctypes.POINTER(llama_cpp.llama_token_data)
# A rejected pick is made again among this many of the most likely tokens (a grammar's check
# of each costs about as much as of any other: the whole vocabulary is 100-500x this).
BEST = 512


class GrammarSampler:
    """Samples one engine's tokens under a grammar (the decode thread's alone: its buffers
    are reused from step to step)."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self._cands = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._top = np.zeros(BEST, dtype=_TOKEN_DATA)
        self.rejected = 0  # tokens the grammar turned down (the whole vocabulary was filtered)

    def _all(self, ctx: Any, i: int) -> llama_cpp.llama_token_data_array:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), (self.n_vocab,))
        self._cands["id"] = self._ids
        self._cands["logit"] = logits
        self._cands["p"] = 0.0
        return llama_cpp.llama_token_data_array(
            data=self._cands.ctypes.data_as(_DATA_P),
            size=self.n_vocab,
            selected=-1,
            sorted=False,
        )

    def _best(self, ctx: Any, i: int) -> llama_cpp.llama_token_data_array:
        """The BEST most likely tokens only: the grammar filters these, not the vocabulary.
        The chain's own top-k keeps at most 40 (llama.cpp's default), so while the grammar
        allows any of these, the pick is the one the whole vocabulary would give (greedy: the
        same token; sampled: the same candidates, but for ones too unlikely to matter)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), (self.n_vocab,))
        best = np.argpartition(logits, -BEST)[-BEST:]
        self._top["id"] = best
        self._top["logit"] = logits[best]
        self._top["p"] = 0.0
        return llama_cpp.llama_token_data_array(
            data=self._top.ctypes.data_as(_DATA_P), size=BEST, selected=-1, sorted=False
        )

    def sample(self, chain: Any, grammar: Any, ctx: Any, i: int) -> int:
        """The token at batch row `i`: the chain's pick if the grammar allows it, else the
        chain's pick among the tokens the grammar allows. Both samplers accept it."""
        arr = self._all(ctx, i)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
        tok = int(arr.data[arr.selected].id)
        one = self._one
        one[0].id, one[0].logit, one[0].p = tok, 1.0, 0.0  # type: ignore[assignment]
        single = llama_cpp.llama_token_data_array(
            data=ctypes.cast(one, _DATA_P), size=1, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(single))
        if one[0].logit == -math.inf:
            self.rejected += 1
            arr = self._best(ctx, i)
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr))
            if not np.isfinite(self._top["logit"]).any():  # none of the best is allowed
                arr = self._all(ctx, i)
                llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr))
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(arr))
            tok = int(arr.data[arr.selected].id)
        llama_cpp.llama_sampler_accept(grammar, tok)
        llama_cpp.llama_sampler_accept(chain, tok)
        return tok
