"""Tool calling, request side: tool definitions, tool_choice, and how a model is asked.

Every dialect's tools become `ToolSpec`s (OpenAI chat and Ollama share a shape; Anthropic and
the Responses API have their own), and its tool_choice a `ToolChoice`. `plan_tool_calls`
then decides, for one request and one model's chat template, how calls are obtained:

- `none` (or no tools): plain content.
- `required` or a named function: a grammar forces the generic JSON shape
  (`{"tool_calls": [...]}`, see `server.toolcall_parsers`) with each tool's arguments
  constrained by its schema, so the arguments parse and validate with any model.
- `auto`, and the template takes `tools` and writes a known call format: the tools go through
  the template and that format is parsed (hermes, llama3, mistral).
- `auto` otherwise: a system text describes the tools and the generic JSON shape (as
  llama.cpp's generic handler does), and a grammar keeps the reply to that shape (a call, or
  `{"response": "..."}`).

History (assistant `tool_calls`, `role: tool` results) is converted to what the template can
render: HF-style calls with arguments as objects, or plain text turns for templates that know
no tools.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from server.chat_template import ChatTemplate
from server.errors import InvalidRequest
from server.toolcall_parsers import ToolCallParser, new_call_id, tool_call_parser

if TYPE_CHECKING:
    from server.grammar import SchemaCheck

ToolFormat = Literal["hermes", "llama3", "mistral", "generic"]
FORMAT_MARKERS: dict[ToolFormat, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    "generic": (),
}
# OpenAI's rule for function names (Anthropic allows up to 128 characters).
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ANTHROPIC_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call."""

    name: str
    description: str
    parameters: Mapping[str, Any]  # a JSON Schema of `type: object`

    def openai(self) -> dict[str, Any]:
        """The OpenAI chat shape, which is what HF chat templates take as `tools`."""
        return {"type": "function", "function": self.brief()}

    def brief(self) -> dict[str, Any]:
        """Name, description (when given) and parameters."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = dict(self.parameters)
        return out


def _check_schema(name: str, schema: Any, param: str) -> Mapping[str, Any]:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    if schema is None:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise InvalidRequest(
            f"Invalid schema for function '{name}': parameters must be a JSON Schema object, "
            f"got {type(schema).__name__}.",
            param=param,
        )
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        at = f" (at '{where}')" if where else ""
        raise InvalidRequest(
            f"Invalid schema for function '{name}': {e.message}{at}.", param=param
        ) from e
    kind = schema.get("type")
    if kind not in (None, "object"):
        raise InvalidRequest(
            f"Invalid schema for function '{name}': schema must be a JSON Schema of "
            f"'type: \"object\"', got 'type: {json.dumps(kind)}'.",
            param=param,
        )
    return schema


def _tool(
    name: Any, description: Any, schema: Any, param: str, pattern: re.Pattern[str]
) -> ToolSpec:
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise InvalidRequest(
            f"Invalid tool name {json.dumps(name)}: it must be 1 to {pattern.pattern[-3:-1]} "
            "letters, digits, underscores or dashes.",
            param=f"{param}.name",
        )
    if description is not None and not isinstance(description, str):
        raise InvalidRequest("A tool's description must be a string.", param=f"{param}.description")
    return ToolSpec(name, description or "", _check_schema(name, schema, f"{param}.parameters"))


def _unique(tools: list[ToolSpec], param: str) -> list[ToolSpec]:
    seen: set[str] = set()
    for t in tools:
        if t.name in seen:
            raise InvalidRequest(f"Duplicate tool name '{t.name}'.", param=param)
        seen.add(t.name)
    return tools


def _tool_list(raw: Any, param: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest(f"'{param}' must be an array of tools.", param=param)
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise InvalidRequest(f"'{param}[{i}]' must be an object.", param=f"{param}[{i}]")
    return raw


def parse_tools(raw: Any, *, param: str = "tools") -> list[ToolSpec]:
    """OpenAI chat (and Ollama) tools: `{"type": "function", "function": {...}}`."""
    out: list[ToolSpec] = []
    for i, t in enumerate(_tool_list(raw, param)):
        where = f"{param}[{i}]"
        kind = t.get("type", "function")  # Ollama clients may leave it out
        if kind != "function":
            raise InvalidRequest(
                f"Unsupported tool type '{kind}': only 'function' tools are supported.",
                param=f"{where}.type",
            )
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequest(
                f"Missing required parameter: '{where}.function'.", param=f"{where}.function"
            )
        out.append(
            _tool(
                fn.get("name"),
                fn.get("description"),
                fn.get("parameters"),
                f"{where}.function",
                _NAME,
            )
        )
    return _unique(out, param)


def parse_anthropic_tools(raw: Any, *, param: str = "tools") -> list[ToolSpec]:
    """Anthropic Messages tools: `{"name", "description", "input_schema"}`."""
    out: list[ToolSpec] = []
    for i, t in enumerate(_tool_list(raw, param)):
        where = f"{param}.{i}"
        kind = t.get("type", "custom")
        if kind != "custom":
            raise InvalidRequest(
                f"Unsupported tool type '{kind}': only custom (client) tools are supported.",
                param=f"{where}.type",
            )
        if "input_schema" not in t:
            raise InvalidRequest(f"{where}.input_schema: Field required", param=where)
        out.append(
            _tool(t.get("name"), t.get("description"), t["input_schema"], where, _ANTHROPIC_NAME)
        )
    return _unique(out, param)


def parse_responses_tools(raw: Any, *, param: str = "tools") -> list[ToolSpec]:
    """Responses API tools: `{"type": "function", "name", "description", "parameters"}`."""
    out: list[ToolSpec] = []
    for i, t in enumerate(_tool_list(raw, param)):
        where = f"{param}[{i}]"
        kind = t.get("type")
        if kind != "function":
            raise InvalidRequest(
                f"Unsupported tool type '{kind}': only 'function' tools are supported.",
                param=f"{where}.type",
            )
        out.append(_tool(t.get("name"), t.get("description"), t.get("parameters"), where, _NAME))
    return _unique(out, param)


# ----- tool_choice ---------------------------------------------------------------------


@dataclass(frozen=True)
class ToolChoice:
    """auto: the model decides; none: no calls; required: at least one; function: `name`."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None


AUTO = ToolChoice("auto")
NONE = ToolChoice("none")
REQUIRED = ToolChoice("required")


def _named(name: Any, tools: Sequence[ToolSpec], param: str) -> ToolChoice:
    if not isinstance(name, str) or not name:
        raise InvalidRequest("A named tool choice needs the function's name.", param=param)
    if name not in {t.name for t in tools}:
        raise InvalidRequest(
            f"Invalid value for '{param}': no function named '{name}' was given in 'tools'.",
            param=param,
        )
    return ToolChoice("function", name)


def _needs_tools(choice: ToolChoice, tools: Sequence[ToolSpec], param: str) -> ToolChoice:
    if choice.mode in ("required", "function") and not tools:
        raise InvalidRequest(
            f"Invalid value for '{param}': '{choice.mode}' is only allowed when 'tools' are "
            "specified.",
            param=param,
        )
    return choice


CHAT_NAMED_CHOICE = '{"type": "function", "function": {"name": ...}}'
RESPONSES_NAMED_CHOICE = '{"type": "function", "name": ...}'


def parse_tool_choice(
    raw: Any,
    tools: Sequence[ToolSpec],
    *,
    param: str = "tool_choice",
    named: str = CHAT_NAMED_CHOICE,
) -> ToolChoice:
    """OpenAI chat and Responses tool_choice: a mode string, `{"type": "function",
    "function": {"name"}}` (chat) or `{"type": "function", "name"}` (Responses); `named` is
    the caller's dialect's shape, shown when `raw` is neither."""
    if raw is None:
        return AUTO if tools else NONE
    if isinstance(raw, str):
        modes = {"auto": AUTO, "none": NONE, "required": REQUIRED}
        if raw not in modes:
            raise InvalidRequest(
                f"Invalid value for '{param}': '{raw}'. Supported values are: 'none', 'auto' "
                "and 'required', or a named function.",
                param=param,
            )
        return _needs_tools(modes[raw], tools, param)
    if isinstance(raw, dict) and raw.get("type") == "function":
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else raw.get("name")
        return _needs_tools(_named(name, tools, param), tools, param)
    raise InvalidRequest(
        f"Invalid value for '{param}': expected 'none', 'auto', 'required' or {named}.",
        param=param,
    )


def parse_anthropic_tool_choice(
    raw: Any, tools: Sequence[ToolSpec], *, param: str = "tool_choice"
) -> tuple[ToolChoice, bool]:
    """Anthropic's tool_choice (`auto`, `any`, `tool` + name, `none`), and whether parallel
    calls are allowed (`disable_parallel_tool_use`)."""
    if raw is None:
        return (AUTO if tools else NONE), True
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{param}: Input should be an object", param=param)
    parallel = not raw.get("disable_parallel_tool_use", False)
    kind = raw.get("type")
    if kind == "auto":
        return (AUTO if tools else NONE), parallel
    if kind == "none":
        return NONE, parallel
    if kind == "any":
        return _needs_tools(REQUIRED, tools, param), parallel
    if kind == "tool":
        return _needs_tools(_named(raw.get("name"), tools, param), tools, param), parallel
    raise InvalidRequest(
        f"{param}.type: Input should be 'auto', 'any', 'tool' or 'none'", param=param
    )


# ----- what a template does with tools -------------------------------------------------


def detect_tool_format(template_source: str | None) -> ToolFormat:
    """The call format a chat template teaches its model, from the template's text."""
    src = template_source or ""
    if "[TOOL_CALLS]" in src:
        return "mistral"
    if "<tool_call>" in src and not ("<function=" in src and "<parameter=" in src):
        return "hermes"  # (Qwen3-Coder's XML arguments also sit in <tool_call>: not this)
    if "<|start_header_id|>" in src and (
        "<|python_tag|>" in src or '"parameters"' in src or "ipython" in src
    ):
        return "llama3"
    return "generic"


def template_takes_tools(template: str | ChatTemplate) -> bool:
    """Whether a chat template renders the `tools` it is given."""
    t = template if isinstance(template, ChatTemplate) else ChatTemplate(template)
    return t.caps.tools


# Schema keys that tell a model nothing the grammar does not already hold it to.
_NOISE = ("$schema", "$id", "$comment")


def _lean(value: Any) -> Any:
    """A tool's brief without the schema noise: `$schema`, and `additionalProperties: false`
    (the grammar writes only the listed keys)."""
    if isinstance(value, dict):
        return {
            k: _lean(v)
            for k, v in value.items()
            if k not in _NOISE and not (k == "additionalProperties" and v is False)
        }
    if isinstance(value, list):
        return [_lean(v) for v in value]
    return value


def generic_tool_prompt(tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
    """System text for a model whose template knows no tools: the tools and the reply shape."""
    # One line of compact JSON per tool: Claude Code's tools as indented JSON cost more tokens
    # than the rest of its prompt; the grammar, not the listing, holds the exact shape.
    listing = "\n".join(
        json.dumps(_lean(t.brief()), ensure_ascii=False, separators=(",", ":")) for t in tools
    )
    call = '{"name": "<function name>", "arguments": {<arguments as JSON>}}'
    calls = f'{{"tool_calls": [{call}{", ..." if parallel else ""}]}}'
    lines = [
        "You can call these functions (each one's arguments follow its JSON Schema):",
        listing,
        "",
    ]
    if choice.mode == "function":
        lines.append(f"Call the function '{choice.name}'. Reply with only this JSON object:")
        lines.append(calls)
    elif choice.mode == "required":
        lines.append("Call one of the functions. Reply with only this JSON object:")
        lines.append(calls)
    else:
        lines.append("Reply in JSON. To call functions, reply with:")
        lines.append(calls)
        lines.append('To answer directly, reply with: {"response": "<your answer>"}')
    if parallel and choice.mode != "function":
        lines.append("Several calls may go in the list when they do not depend on each other.")
    return "\n".join(lines)


# ----- history ---------------------------------------------------------------------------


def text_of(content: Any) -> str:
    """A message's content as plain text (OpenAI content parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, str):
                parts.append(p)
        return "".join(parts)
    return json.dumps(content, ensure_ascii=False)


def mistral_call_id(call_id: str) -> str:
    """Mistral templates demand 9-character alphanumeric ids; map any id to one, stably."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(alphabet[b % len(alphabet)] for b in digest[:9])


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return arguments  # not JSON: the template gets the text as it was
    return {} if arguments is None else arguments


def _calls_of(message: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """(id, name, arguments) of an assistant message's calls, whatever the dialect's shape."""
    out = []
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict):
            continue
        fn: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else call
        out.append(
            (
                str(call.get("id") or new_call_id()),
                str(fn.get("name") or ""),
                _arguments_object(fn.get("arguments")),
            )
        )
    return out


def messages_for_template(
    messages: Sequence[Mapping[str, Any]],
    *,
    native: bool,
    tool_format: ToolFormat = "generic",
) -> list[dict[str, Any]]:
    """History in the shape a template renders.

    `native` (the template renders `tool_calls` and `role: tool`): calls as HF templates
    expect them (arguments as objects, ids kept; 9-character ids for Mistral), results with
    `tool_call_id` and the function's `name`. Otherwise calls become the assistant's text in
    the generic JSON shape and results user turns, and turns of the same role are merged
    (templates that know no tools often demand alternating roles).
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = _calls_of(m)
            for cid, name, _ in calls:
                names[cid] = name
            if native:
                msg = {k: v for k, v in m.items() if k != "tool_calls"}
                msg["content"] = text_of(m.get("content"))
                msg["tool_calls"] = [
                    {
                        "id": mistral_call_id(cid) if tool_format == "mistral" else cid,
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    }
                    for cid, name, args in calls
                ]
                out.append(msg)
            else:
                shape = {"tool_calls": [{"name": n, "arguments": a} for _, n, a in calls]}
                text = text_of(m.get("content")).strip()
                body = json.dumps(shape, ensure_ascii=False)
                out.append({"role": "assistant", "content": f"{text}\n{body}" if text else body})
        elif role == "tool":
            cid = str(m.get("tool_call_id") or "")
            name = str(m.get("name") or m.get("tool_name") or names.get(cid, ""))
            content = text_of(m.get("content"))
            if native:
                tid = mistral_call_id(cid) if tool_format == "mistral" and cid else cid
                out.append({"role": "tool", "content": content, "tool_call_id": tid, "name": name})
            else:
                result = {"tool_response": {"name": name, "content": content}}
                out.append({"role": "user", "content": json.dumps(result, ensure_ascii=False)})
        else:
            out.append(dict(m))
    return out if native else _merge_same_roles(out)


def messages_for_openai(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """History as OpenAI's chat API spells it, for an upstream server: an assistant's calls
    with ids, `type: function` and arguments as JSON text; results' content as text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        msg = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            msg["content"] = text_of(m.get("content")) or None
            msg["tool_calls"] = [
                {
                    "id": cid,
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": args
                        if isinstance(args, str)
                        else json.dumps(args, ensure_ascii=False),
                    },
                }
                for cid, name, args in _calls_of(m)
            ]
        elif m.get("role") == "tool":
            msg["content"] = text_of(m.get("content"))
        out.append(msg)
    return out


def _merge_same_roles(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.get("role") == m.get("role")
            and m.get("role") in ("user", "assistant")
            and isinstance(prev.get("content"), str)
            and isinstance(m.get("content"), str)
        ):
            prev["content"] = f"{prev['content']}\n\n{m['content']}"
        else:
            out.append(m)
    return out


def with_system_text(
    messages: Sequence[Mapping[str, Any]], text: str, *, system_role: bool = True
) -> list[dict[str, Any]]:
    """`messages` with `text` added to the system prompt (or, for templates that drop
    system messages, to the first user message)."""
    out = [dict(m) for m in messages]
    if out and out[0].get("role") in ("system", "developer"):
        first = text_of(out[0].get("content"))
        text = f"{first}\n\n{text}" if first else text
        if system_role:
            out[0]["content"] = text
            return out
        out.pop(0)
    elif system_role:
        return [{"role": "system", "content": text}, *out]
    for m in out:
        if m.get("role") == "user":
            m["content"] = f"{text}\n\n{text_of(m.get('content'))}"
            return out
    return [{"role": "user", "content": text}, *out]


# ----- the plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCallPlan:
    """How one request gets its tool calls from one model (see the module's docstring)."""

    tools: tuple[ToolSpec, ...]
    choice: ToolChoice
    parallel: bool
    parse_format: ToolFormat | None  # None: the reply is plain content
    native_tools: bool  # the template renders the tools (its own call format)
    native_history: bool  # the template renders assistant tool_calls and tool results
    history_format: ToolFormat
    grammar: str | None
    system_text: str | None
    system_role: bool = True
    # Tools whose arguments the grammar holds only in part: their calls are checked.
    checks: Mapping[str, SchemaCheck] = field(default_factory=dict)

    @property
    def markers(self) -> tuple[str, ...]:
        """The marker strings the parser reads. Where a model's vocabulary has them as special
        tokens, the engine must emit their text (llama-server's "preserved tokens")."""
        return FORMAT_MARKERS[self.parse_format] if self.parse_format else ()

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The `tools` argument for `Engine.render_chat` / `format_chat`."""
        return [t.openai() for t in self.tools] if self.native_tools else None

    def prepare_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The request's messages as the template should get them."""
        out = messages_for_template(
            messages, native=self.native_history, tool_format=self.history_format
        )
        if self.system_text:
            out = with_system_text(out, self.system_text, system_role=self.system_role)
        return out

    def new_parser(self) -> ToolCallParser | None:
        """A fresh streaming parser for one reply (None: no calls to look for)."""
        if self.parse_format is None:
            return None
        names = [t.name for t in self.tools]
        if self.choice.mode == "function":
            names = [self.choice.name or ""]
        return tool_call_parser(self.parse_format, names, parallel=self.parallel)


def plan_tool_calls(
    tools: Sequence[ToolSpec],
    choice: ToolChoice,
    *,
    parallel: bool = True,
    template: ChatTemplate | None = None,
) -> ToolCallPlan:
    """Decide how to ask `template`'s model for calls (None: a template that is not Jinja,
    such as llama.cpp's built-in ones, which know no tools)."""
    from server.grammar import tool_call_constraint

    caps = template.caps if template is not None else None
    fmt = detect_tool_format(template.source if template is not None else None)
    native = bool(caps and caps.tools and fmt != "generic")
    parse_format: ToolFormat | None = "generic"
    grammar: str | None = None
    checks: dict[str, SchemaCheck] = {}
    system_text: str | None = None
    if not tools or choice.mode == "none":
        parse_format, native = None, False
    elif choice.mode in ("required", "function"):
        grammar, checks = tool_call_constraint(tools, choice, parallel)
        if not native:
            system_text = generic_tool_prompt(tools, choice, parallel)
    elif native:
        parse_format = fmt
    else:
        grammar, checks = tool_call_constraint(tools, choice, parallel)
        system_text = generic_tool_prompt(tools, choice, parallel)
    return ToolCallPlan(
        tools=tuple(tools),
        choice=choice,
        parallel=parallel,
        parse_format=parse_format,
        native_tools=native,
        native_history=bool(caps and caps.tool_calls and caps.tool_responses),
        history_format=fmt,
        grammar=grammar,
        system_text=system_text,
        system_role=caps.system_role if caps else True,
        checks=checks,
    )
