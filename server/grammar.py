"""Output constraints as GBNF grammars, built with the request (not inside an engine).

llama.cpp's sampler enforces GBNF; the converter from JSON Schema is llama.cpp's own
(`llama_cpp.llama_grammar`, pure Python), imported lazily so that nothing here loads a model
library until a constrained request arrives.
"""

from __future__ import annotations

import json
from typing import Any

from server.errors import InvalidRequest


def json_grammar(schema: dict[str, Any] | None, *, param: str = "response_format") -> str:
    """GBNF for any JSON object (`schema` None), or for JSON matching `schema`."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if schema is None:
        return str(JSON_GBNF)
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as e:  # the converter raises plain exceptions on schemas it cannot map
        raise InvalidRequest(f"Unsupported JSON schema: {e}", param=param) from e
