"""Output constraints as GBNF grammars, built with the request (not inside an engine).

llama.cpp's sampler enforces GBNF; the converter from JSON Schema is llama.cpp's own
(`llama_cpp.llama_grammar`, pure Python), imported lazily so that nothing here loads a model
library until a constrained request arrives.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from server.errors import InvalidRequest

if TYPE_CHECKING:
    from server.toolcalls import ToolChoice, ToolSpec

# Calls one reply may hold when parallel calls are allowed. A small model forced to call
# (`required`) tends to repeat the same call, and without a bound it does so until max_tokens
# or the end of the context; capable models rarely make more than a handful at once.
MAX_PARALLEL_CALLS = 8


# Keywords that describe a value without constraining it: a schema of only these (or `{}`)
# accepts any JSON value, as llama.cpp's C++ converter has it ("any"). The Python converter
# maps `{}` to an object and rejects `{"description": ...}`, which clients send for "any
# value" properties (Claude Code's tools do).
ANNOTATIONS = frozenset(
    {
        "description",
        "title",
        "default",
        "examples",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$schema",
        "$id",
        "markdownDescription",
    }
)


def _accepts_anything(schema: Any) -> bool:
    return isinstance(schema, dict) and not (schema.keys() - ANNOTATIONS)


def _object_root(schema: dict[str, Any]) -> dict[str, Any]:
    """A root with no constraints stays what it has always meant here: a JSON object."""
    return {**schema, "type": "object"} if _accepts_anything(schema) else schema


def json_grammar(schema: dict[str, Any] | None, *, param: str = "response_format") -> str:
    """GBNF for any JSON object (`schema` None), or for JSON matching `schema`."""
    from llama_cpp.llama_grammar import JSON_GBNF

    if schema is None:
        return str(JSON_GBNF)
    conv = _converter()
    try:
        conv.visit(conv.resolve_refs(_object_root(copy.deepcopy(schema)), "stdin"), "")
        return str(conv.format_grammar())
    except Exception as e:  # the converter raises plain exceptions on schemas it cannot map
        raise InvalidRequest(f"Unsupported JSON schema: {e}", param=param) from e


def tool_call_grammar(tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
    """GBNF for a reply in the generic tool-call shape, arguments constrained by each schema.

    `required`: `{"tool_calls": [call, ...]}` with any of `tools`; a named choice: only that
    one; `auto`: that, or `{"response": "<text>"}`. Without `parallel`, exactly one call;
    with it, up to MAX_PARALLEL_CALLS.
    The keys come in a fixed order (name, then arguments) so that a parser can stream the
    arguments as they are generated.
    """
    from llama_cpp.llama_grammar import PRIMITIVE_RULES

    if choice.mode == "function":
        tools = [t for t in tools if t.name == choice.name]
    if not tools or choice.mode == "none":
        raise InvalidRequest("A tool-call grammar needs at least one tool.", param="tools")
    conv = _converter()
    lit = conv._format_literal
    calls = []
    for i, tool in enumerate(tools):
        try:
            schema = conv.resolve_refs(
                _object_root(copy.deepcopy(dict(tool.parameters))), f"tool{i}"
            )
            args = conv.visit(schema, f"tool{i}-arguments")
        except Exception as e:  # the converter raises plain exceptions on what it cannot map
            raise InvalidRequest(
                f"Unsupported JSON schema for function '{tool.name}': {e}", param="tools"
            ) from e
        calls.append(
            conv._add_rule(
                f"tool{i}-call",
                f'"{{" space {lit(json.dumps("name"))} space ":" space '
                f'{lit(json.dumps(tool.name))} space "," space '
                f'{lit(json.dumps("arguments"))} space ":" space {args} "}}" space',
            )
        )
    call = conv._add_rule("tool-call", " | ".join(calls))
    more = f' ( "," space {call} ){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    calls_object = (
        f'"{{" space {lit(json.dumps("tool_calls"))} space ":" space '
        f'"[" space {call}{more} "]" space "}}" space'
    )
    if choice.mode == "auto":
        string = conv._add_primitive("string", PRIMITIVE_RULES["string"])
        response = f'"{{" space {lit(json.dumps("response"))} space ":" space {string} "}}" space'
        conv._add_rule("root", f"{calls_object} | {response}")
    else:
        conv._add_rule("root", calls_object)
    return str(conv.format_grammar())


def _converter() -> Any:
    """llama.cpp's schema converter, with `$ref` rules named per tool (two tools may both
    define `#/$defs/Item`, and the stock converter would give them one rule) and schemas
    without constraints taken as any value."""
    from llama_cpp.llama_grammar import (
        INVALID_RULE_CHARS_RE,
        PRIMITIVE_RULES,
        RESERVED_NAMES,
        SchemaConverter,
    )

    class PerToolRefs(SchemaConverter):
        def visit(self, schema: Any, name: str) -> Any:
            if _accepts_anything(schema):
                rule = self._add_primitive("value", PRIMITIVE_RULES["value"])
                # (rule names as the stock visit gives them)
                rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, rule)  # type: ignore[no-untyped-call]
            return super().visit(schema, name)  # type: ignore[no-untyped-call]

        def _resolve_ref(self, ref: str) -> str:
            base, _, pointer = ref.partition("#")
            name = INVALID_RULE_CHARS_RE.sub("-", f"{base}-ref-{pointer.split('/')[-1]}")
            if name not in self._rules and ref not in self._refs_being_resolved:
                self._refs_being_resolved.add(ref)
                name = self.visit(self._refs[ref], name)
                self._refs_being_resolved.remove(ref)
            return name

    return PerToolRefs(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
