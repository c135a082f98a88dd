"""Reranking: a relevance score in [0, 1] for each (query, document) pair.

Two ways, as peers do:
- A reranker model (GGUF pooling type `rank`: bge-reranker, jina-reranker, Qwen3-Reranker
  converted by llama.cpp) has a classification head; llama.cpp's rank pooling gives its score.
  The pair is written as llama-server writes it: the model's `rerank` template when it has
  one, else query and document with the model's separator tokens.
- Any other instruct model judges the pair: the chat template renders a yes/no question (the
  prompt Qwen3-Reranker was trained on), and the score is P(yes) / (P(yes) + P(no)) from the
  logits of the first reply token. No token is generated.

Engines share the prompt and the arithmetic here; each runs the model its own way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from server.errors import ContextOverflow

JUDGE_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# Sequences decoded together in one batch (and the most a rerank context holds at once).
RERANK_SEQS = 8
# The context of the separate rerank context: a query and one document together fit in it.
RERANK_CTX = 2048


def judge_messages(query: str, document: str, instruction: str | None) -> list[dict[str, Any]]:
    """The chat an instruct model answers "yes" or "no" to."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n"
            f"<Document>: {document}",
        },
    ]


# The reply must start right away: thinking templates (Qwen3) close their think block.
JUDGE_TEMPLATE_KWARGS = {"add_generation_prompt": True, "enable_thinking": False}


def answer_tokens(tokenize: Callable[[str], list[int]]) -> tuple[list[int], list[int]]:
    """The first token of each way the model may write yes, and no (the ids, deduplicated)."""
    yes = {t[0] for w in ("yes", "Yes", "YES") if (t := tokenize(w))}
    no = {t[0] for w in ("no", "No", "NO") if (t := tokenize(w))}
    return sorted(yes - no), sorted(no - yes)


def check_lengths(lengths: Sequence[int], limit: int) -> None:
    """Each (query, document) prompt fits `limit` tokens, else the context error naming it."""
    for i, n in enumerate(lengths):
        if n > limit:
            err = ContextOverflow(n, limit, what=f"query with documents[{i}]")
            err.param = "documents"
            raise err


def _logsumexp(values: Sequence[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def judge_score(logits: Any, yes: Sequence[int], no: Sequence[int]) -> float:
    """P(yes) / (P(yes) + P(no)) from the first reply token's logits (any indexable)."""
    ly = _logsumexp([float(logits[t]) for t in yes])
    ln = _logsumexp([float(logits[t]) for t in no])
    return 1.0 / (1.0 + math.exp(ln - ly))


def pack(lengths: Sequence[int], budget: int, seqs: int = RERANK_SEQS) -> list[list[int]]:
    """Indexes grouped into batches of at most `seqs` prompts and `budget` tokens each, in
    order (each length is at most `budget`)."""
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not groups or len(groups[-1]) >= seqs or used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups
