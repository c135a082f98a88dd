"""Output constraints as GBNF grammars, built with the request (not inside an engine).

llama.cpp's sampler enforces GBNF. Schemas become grammars by our own converter
(`schema.py`), whose cost does not grow with a bound's value; every grammar, a client's own
too, is checked (`gbnf.py`) before llama.cpp's C parser sees it. What a grammar cannot hold
exactly is checked on the finished reply (`SchemaCheck`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.errors import InvalidRequest, LmxError
from server.grammar.gbnf import GrammarError, check_grammar
from server.grammar.schema import (
    ANNOTATIONS,
    Conversion,
    SchemaConverter,
    accepts_anything,
    literal,
)

if TYPE_CHECKING:
    from server.toolcalls import ToolChoice, ToolSpec

__all__ = [
    "ANNOTATIONS",
    "JSON_GBNF",
    "MAX_PARALLEL_CALLS",
    "GrammarError",
    "ReplyMismatch",
    "SchemaCheck",
    "check_grammar",
    "json_constraint",
    "json_grammar",
    "tool_call_constraint",
    "tool_call_grammar",
]

# Calls one reply may hold when parallel calls are allowed. A small model forced to call
# (`required`) tends to repeat the same call, and without a bound it does so until max_tokens
# or the end of the context; capable models rarely make more than a handful at once.
MAX_PARALLEL_CALLS = 8

# Any JSON object (llama.cpp's `json.gbnf`).
JSON_GBNF = r"""root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws
array  ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""


class ReplyMismatch(LmxError):
    """The reply does not match a schema the grammar could only hold in part."""

    status = 422
    code = "schema_mismatch"


@dataclass(frozen=True)
class SchemaCheck:
    """A schema the grammar holds only in part (`relaxed` says where): the finished reply is
    validated against it."""

    schema: Any
    relaxed: tuple[str, ...]
    param: str

    def problem(self, value: Any) -> str | None:
        """Why `value` does not match (None: it does, or the schema is one no validator
        reads)."""
        import jsonschema

        try:
            cls = jsonschema.validators.validator_for(
                self.schema, default=jsonschema.Draft202012Validator
            )
            # A pattern Python cannot compile (ECMA's \\p{L}) is skipped, not the whole check.
            cls = jsonschema.validators.extend(cls, {"pattern": _pattern})
            err = jsonschema.exceptions.best_match(cls(self.schema).iter_errors(value))
        except Exception:
            return None
        if err is None:
            return None
        where = "$" + "".join(f".{p}" for p in err.absolute_path)
        rule = f"{err.validator} {json.dumps(err.validator_value)[:100]}"
        return (
            f"The reply does not match the schema: {rule} fails at {where} "
            f"({err.message[:160]}). The grammar could not hold {'; '.join(self.relaxed)}."
        )

    def text_problem(self, text: str) -> str | None:
        try:
            value = json.loads(text)
        except ValueError:
            return None  # cut short (max_tokens): the reply says so by its finish reason
        return self.problem(value)


def _pattern(validator: Any, pattern: Any, instance: Any, schema: Any) -> Any:
    import re

    import jsonschema

    if not validator.is_type(instance, "string") or not isinstance(pattern, str):
        return
    try:
        found = re.search(pattern, instance)
    except re.error:
        return
    if found is None:
        yield jsonschema.ValidationError(f"{instance[:80]!r} does not match {pattern[:80]!r}")


def _object_root(schema: dict[str, Any]) -> dict[str, Any]:
    """A root with no constraints stays what it has always meant here: a JSON object."""
    return {**schema, "type": "object"} if accepts_anything(schema) else schema


def _convert(conv: Conversion, schema: Any, name: str, prefix: str) -> str:
    if not isinstance(schema, dict):
        raise InvalidRequest("The JSON schema must be an object.", param=conv.param)
    try:
        return SchemaConverter(conv, schema, prefix).visit(_object_root(schema), name)
    except RecursionError as e:
        raise InvalidRequest("The JSON schema nests too deeply.", param=conv.param) from e


def json_constraint(
    schema: dict[str, Any] | None, *, param: str = "response_format"
) -> tuple[str, SchemaCheck | None]:
    """GBNF for any JSON object (`schema` None) or for JSON matching `schema`, and the check
    the reply still needs (None: the grammar holds the whole schema)."""
    if schema is None:
        return JSON_GBNF, None
    conv = Conversion(param)
    _convert(conv, schema, "", "")
    grammar = conv.grammar()
    check_grammar(grammar, param=param)
    check = SchemaCheck(schema, tuple(conv.relaxed), param) if conv.relaxed else None
    return grammar, check


def json_grammar(schema: dict[str, Any] | None, *, param: str = "response_format") -> str:
    """GBNF for any JSON object (`schema` None), or for JSON matching `schema`."""
    return json_constraint(schema, param=param)[0]


def tool_call_grammar(tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
    """GBNF for a reply in the generic tool-call shape (see `tool_call_constraint`)."""
    return tool_call_constraint(tools, choice, parallel)[0]


def tool_call_constraint(
    tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool
) -> tuple[str, dict[str, SchemaCheck]]:
    """GBNF for a reply in the generic tool-call shape, arguments constrained by each schema,
    and the checks some calls' arguments still need (by tool name).

    `required`: `{"tool_calls": [call, ...]}` with any of `tools`; a named choice: only that
    one; `auto`: that, or `{"response": "<text>"}`. Without `parallel`, exactly one call;
    with it, up to MAX_PARALLEL_CALLS.
    The keys come in a fixed order (name, then arguments) so that a parser can stream the
    arguments as they are generated.
    """
    if choice.mode == "function":
        tools = [t for t in tools if t.name == choice.name]
    if not tools or choice.mode == "none":
        raise InvalidRequest("A tool-call grammar needs at least one tool.", param="tools")
    conv = Conversion("tools")
    checks: dict[str, SchemaCheck] = {}
    calls = []
    for i, tool in enumerate(tools):
        before, shown = conv.relax_count, len(conv.relaxed)
        try:
            args = _convert(conv, dict(tool.parameters), f"tool{i}-arguments", f"tool{i}-")
        except InvalidRequest as e:
            raise InvalidRequest(
                f"Unsupported JSON schema for tool '{tool.name}' (in tools): {e.message}",
                param="tools",
            ) from e
        if conv.relax_count > before:
            checks[tool.name] = SchemaCheck(
                dict(tool.parameters),
                tuple(conv.relaxed[shown:]) or ("some of its keywords",),
                "tools",
            )
        calls.append(
            conv.add(
                f"tool{i}-call",
                f'"{{" space {literal(json.dumps("name"))} space ":" space '
                f'{literal(json.dumps(tool.name))} space "," space '
                f'{literal(json.dumps("arguments"))} space ":" space {args} "}}" space',
            )
        )
    call = conv.add("tool-call", " | ".join(calls))
    more = ""
    if parallel:
        nxt = conv.add("tool-call-next", f'"," space {call}')
        more = f" {nxt}{{0,{MAX_PARALLEL_CALLS - 1}}}"
    calls_object = (
        f'"{{" space {literal(json.dumps("tool_calls"))} space ":" space '
        f'"[" space {call}{more} "]" space "}}" space'
    )
    if choice.mode == "auto":
        string = conv.primitive("string")
        response = (
            f'"{{" space {literal(json.dumps("response"))} space ":" space {string} "}}" space'
        )
        conv.rules["root"] = f"{calls_object} | {response}"
    else:
        conv.rules["root"] = calls_object
    grammar = conv.grammar()
    check_grammar(grammar, param="tools")
    return grammar, checks
