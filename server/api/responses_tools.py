"""The Responses API's tools as the model sees them, and its calls as the client expects them.

Codex CLI sends more than function tools: `namespace` tools (functions grouped under a name),
`custom` (freeform) tools whose input is raw text in a grammar (its `apply_patch`), and
tools the server would run itself (`web_search`, `image_generation`, ...). A namespace is
flattened into its functions, and a call of one says its `namespace`; a custom tool is offered
as a function with one string argument, and its call comes back as a `custom_tool_call` with
that string as `input`; a tool lmx cannot run is left out of the prompt (said once in the log
for each client and kind).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from server.chat_output import ToolCall
from server.errors import InvalidRequest
from server.toolcalls import ToolSpec, parse_responses_tools

log = logging.getLogger(__name__)

CUSTOM_ARGUMENT = "input"  # the one string argument a custom tool is offered with
# The longest grammar written into a custom tool's description (Codex's apply_patch: ~1.5 kB).
MAX_GRAMMAR_CHARS = 4000
# Input items for calls a hosted tool made: nothing in them is for a local model to read.
HOSTED_CALL_ITEMS = frozenset(
    {
        "web_search_call",
        "image_generation_call",
        "file_search_call",
        "code_interpreter_call",
        "computer_call",
        "computer_call_output",
        "tool_search_call",
        "tool_search_output",
        "mcp_list_tools",
    }
)

_said: set[tuple[str, str]] = set()  # (client, tool type) already logged
_MAX_SAID = 1024


@dataclass(frozen=True)
class ResponsesTools:
    """What the model is offered, and how each of its calls goes back to the client."""

    specs: list[ToolSpec]
    custom: frozenset[str] = frozenset()  # freeform tools: the call's `input` is a string
    namespaces: dict[str, str] = field(default_factory=dict)  # a flattened name -> namespace
    dropped: tuple[str, ...] = ()  # the kinds left out (the server would have run them)

    def item(self, call: ToolCall, item_id: str, status: str) -> dict[str, Any]:
        """The output item for `call`: a function_call, or a custom tool's custom_tool_call."""
        if call.name in self.custom:
            return {
                "type": "custom_tool_call",
                "id": item_id,
                "call_id": call.id,
                "name": call.name,
                "input": custom_input(call.arguments),
                "status": status,
            }
        out = {
            "type": "function_call",
            "id": item_id,
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments,
            "status": status,
        }
        if call.name in self.namespaces:
            out["namespace"] = self.namespaces[call.name]
        return out


def custom_input(arguments: str) -> str:
    """A custom tool's raw input, from the arguments of the function it was offered as."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments  # cut off by the limit: the text as it came
    text = value.get(CUSTOM_ARGUMENT) if isinstance(value, dict) else None
    return text if isinstance(text, str) else ""


def custom_arguments(text: str) -> str:
    """A custom tool call's `input` as the arguments of the function the model saw."""
    return json.dumps({CUSTOM_ARGUMENT: text}, ensure_ascii=False)


def _custom_function(t: dict[str, Any], where: str) -> dict[str, Any]:
    description = t.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequest("A tool's description must be a string.", param=f"{where}.description")
    fmt = t.get("format")
    what = "The tool's input, as plain text."
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        definition = fmt.get("definition")
        syntax = fmt.get("syntax") or "grammar"
        if isinstance(definition, str) and len(definition) <= MAX_GRAMMAR_CHARS:
            what = f"The tool's input, as text in this {syntax} grammar:\n{definition}"
        else:
            what = f"The tool's input, as text in the tool's {syntax} grammar."
    return {
        "type": "function",
        "name": t.get("name"),
        "description": description,
        "parameters": {
            "type": "object",
            "properties": {CUSTOM_ARGUMENT: {"type": "string", "description": what}},
            "required": [CUSTOM_ARGUMENT],
        },
    }


def parse_tools(raw: Any, client: str = "") -> ResponsesTools:
    """The request's `tools`: functions as they are, namespaces flattened, custom tools as a
    function of one string, and the kinds a server runs itself left out."""
    if raw is None:
        return ResponsesTools([])
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be an array of tools.", param="tools")
    functions: list[dict[str, Any]] = []
    custom: set[str] = set()
    namespaces: dict[str, str] = {}
    dropped: list[str] = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise InvalidRequest(f"'{where}' must be an object.", param=where)
        kind = t.get("type")
        if kind == "function":
            functions.append(t)
        elif kind == "custom":
            functions.append(_custom_function(t, where))
            if isinstance(t.get("name"), str):
                custom.add(t["name"])
        elif kind == "namespace":
            inner = t.get("tools")
            ns = t.get("name")
            if not isinstance(inner, list) or not isinstance(ns, str) or not ns:
                raise InvalidRequest(
                    f"Invalid '{where}': a namespace tool needs a 'name' and a list of 'tools'.",
                    param=where,
                )
            for j, f in enumerate(inner):
                if not isinstance(f, dict) or f.get("type") not in ("function", None):
                    kind_j = f.get("type") if isinstance(f, dict) else type(f).__name__
                    raise InvalidRequest(
                        f"Unsupported tool type '{kind_j}' in namespace '{ns}': only 'function' "
                        "tools can be in a namespace.",
                        param=f"{where}.tools[{j}].type",
                    )
                functions.append({**f, "type": "function"})
                if isinstance(f.get("name"), str):
                    namespaces[f["name"]] = ns
        elif isinstance(kind, str) and kind:
            dropped.append(kind)
        else:
            raise InvalidRequest(
                f"Missing required parameter: '{where}.type'.", param=f"{where}.type"
            )
    specs = parse_responses_tools(functions)
    for kind in dropped:
        _say_dropped(client, kind)
    return ResponsesTools(specs, frozenset(custom), namespaces, tuple(dropped))


def _say_dropped(client: str, kind: str) -> None:
    if (client, kind) in _said:
        return
    if len(_said) >= _MAX_SAID:
        _said.clear()
    _said.add((client, kind))
    log.info(
        "tools of type %r are left out of the prompt: lmx cannot run them (client %s)",
        kind,
        client or "unknown",
    )


def echo_tools(raw: Any) -> list[dict[str, Any]]:
    """The request's tools as a response echoes them: function tools say `strict`."""
    out = []
    for t in raw or []:
        if isinstance(t, dict) and t.get("type") == "function":
            t = {**t, "strict": t.get("strict", True)}
        out.append(t)
    return out
