"""Coding agents' workloads on lmx, against llama-server in the same invocation.

    uv run python bench/agents.py --llama-server /path/to/llama-server
    uv run python bench/agents.py --scenarios tools          # lmx alone

Scenarios:
- `tools`: decoding with Codex's tools offered on `tool_choice: auto` against plain decoding
  on the same model and server (the reply is text either way): the tool grammar must cost
  little per token. Printed: decode tokens/s each way and their ratio (goal >= 0.7).
- `claude`: Claude-Code-shaped turns on /v1/messages, streamed: a ~1,500-word system prompt
  opened by the billing header with a new `cch` each turn, 12 tools, and each turn adds a tool
  call and its result. Printed: TTFT of turn 1, of turns 2..N, and their ratio (goal <= 0.15),
  for lmx and for llama-server, and lmx over llama-server.
- `codex`: Codex-shaped turns on /v1/responses, streamed, `store: false`, the whole input
  every turn (instructions, tools, the growing conversation). Same figures; llama-server has
  no Responses API, so its turns go to its chat completions with the same conversation.

Every server gets the same model, threads, slots and context. The machine is shared: before
each run the script waits until other processes leave the CPU idle (see bench.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import free_port, lmx_cmd, start, wait_idle

# Codex CLI's own tools on a plain profile (shapes from its Responses requests).
CODEX_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "shell",
        "description": "Runs a shell command and returns its output.",
        "parameters": {
            "type": "object",
            "properties": {
                "command": {"type": "array", "items": {"type": "string"}},
                "workdir": {"type": "string", "description": "The working directory."},
                "timeout_ms": {"type": "number", "description": "The timeout in ms."},
            },
            "required": ["command"],
        },
    },
    {
        "type": "custom",
        "name": "apply_patch",
        "description": "Use the `apply_patch` tool to edit files. This is a FREEFORM tool.",
        "format": {
            "type": "grammar",
            "syntax": "lark",
            "definition": "start: begin_patch hunk+ end_patch\n"
            'begin_patch: "*** Begin Patch" LF\nend_patch: "*** End Patch" LF?\n'
            "hunk: add_hunk | delete_hunk | update_hunk\n"
            'add_hunk: "*** Add File: " filename LF add_line+\n'
            'delete_hunk: "*** Delete File: " filename LF\n'
            'update_hunk: "*** Update File: " filename LF change?\n'
            'filename: /(.+)/\nadd_line: "+" /(.*)/ LF -> line\n',
        },
    },
    {
        "type": "function",
        "name": "update_plan",
        "description": "Updates the task plan.",
        "parameters": {
            "type": "object",
            "properties": {
                "explanation": {"type": "string"},
                "plan": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "step": {"type": "string"},
                            "status": {
                                "type": "string",
                                "enum": ["pending", "in_progress", "completed"],
                            },
                        },
                        "required": ["step", "status"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["plan"],
            "additionalProperties": False,
        },
    },
    {
        "type": "function",
        "name": "view_image",
        "description": "Attach a local image (by filesystem path) to the conversation.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
        },
    },
    {
        "type": "function",
        "name": "list_mcp_resources",
        "description": "Lists resources provided by MCP servers.",
        "parameters": {
            "type": "object",
            "properties": {"server": {"type": "string"}, "cursor": {"type": "string"}},
        },
    },
    {
        "type": "function",
        "name": "read_mcp_resource",
        "description": "Read a specific resource from an MCP server.",
        "parameters": {
            "type": "object",
            "properties": {"server": {"type": "string"}, "uri": {"type": "string"}},
            "required": ["server", "uri"],
        },
    },
    {
        "type": "function",
        "name": "request_user_input",
        "description": "Ask the user a question and wait for the answer.",
        "parameters": {
            "type": "object",
            "properties": {"question": {"type": "string"}},
            "required": ["question"],
        },
    },
]


def _words(n: int) -> str:
    base = (
        "You are a coding agent in a terminal. Read files before you change them, keep every "
        "change small, run the tests after each change, explain what you did in one short "
        "paragraph, never invent a file's contents, and ask before deleting anything. "
    )
    words = []
    while len(words) < n:
        words.extend(base.split())
    return " ".join(words[:n])


SYSTEM = _words(1500)


def claude_tools(n: int = 12) -> list[dict[str, Any]]:
    names = ["Bash", "Read", "Edit", "Write", "Glob", "Grep", "LS", "TodoWrite"]
    names += ["WebFetch", "NotebookEdit", "Task", "ExitPlanMode"]
    return [
        {
            "name": names[i],
            "description": f"The {names[i]} tool. " + _words(60),
            "input_schema": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "An absolute path."},
                    "command": {"type": "string", "description": "What to run or find."},
                },
                "required": ["path"],
            },
        }
        for i in range(n)
    ]


# ----- decoding with tools ------------------------------------------------------------------


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses tools in chat completions' shape (a custom tool as a function of one string)."""
    out = []
    for t in tools:
        params = t.get("parameters") or {
            "type": "object",
            "properties": {"input": {"type": "string"}},
            "required": ["input"],
        }
        fn = {"name": t["name"], "description": t["description"], "parameters": params}
        out.append({"type": "function", "function": fn})
    return out


def decode_rate(url: str, model: str, mode: str, n: int) -> float:
    """Decode tokens/s over `n` replies (weighted by tokens), from lmx's own timings. `mode`:
    plain (a one-line prompt), listed (the prompt lmx writes for the tools, as a system
    message, no tools: as long a context, no grammar), auto (the tools on `auto`)."""
    from server.api.responses_tools import parse_tools
    from server.toolcalls import AUTO, generic_tool_prompt

    tokens, seconds = 0, 0.0
    for k in range(n):
        user = {"role": "user", "content": f"Write a long story about a lighthouse, part {k}."}
        body: dict[str, Any] = {"model": model, "messages": [user], "max_tokens": 96}
        body["temperature"] = 0
        if mode == "listed":
            listing = generic_tool_prompt(parse_tools(CODEX_TOOLS).specs, AUTO, True)
            body["messages"] = [{"role": "system", "content": listing}, user]
        elif mode == "auto":
            body |= {"tools": chat_tools(CODEX_TOOLS), "tool_choice": "auto"}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()
        if not r.get("timings"):
            raise SystemExit(f"no timings in the response: {json.dumps(r)[:300]}")
        t = r["timings"][0]
        out = r["usage"]["completion_tokens"]
        if out > 1 and t["decode_tokens_per_s"] > 0:
            tokens += out - 1
            seconds += (out - 1) / t["decode_tokens_per_s"]
    return tokens / seconds if seconds else 0.0


def tools_scenario(url: str, model: str, n: int) -> None:
    plain = decode_rate(url, model, "plain", n)
    listed = decode_rate(url, model, "listed", n)
    auto = decode_rate(url, model, "auto", n)
    print(f"decode tok/s, {model}: one-line prompt {plain:.1f}; the tools' listing as the")
    print(f"  system prompt, no tools {listed:.1f}; Codex's 7 tools on auto {auto:.1f}")
    print(f"  auto / same prompt without tools {auto / listed:.2f} (goal >= 0.7)")


# ----- agent sessions -------------------------------------------------------------------------


PROMPT_TOKENS: list[int] = []  # each turn's prompt, as the server counted it


def _stream_ttft(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    first: float | None = None
    prompt = 0
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=900) as r:
        if r.status_code != 200:
            raise SystemExit(f"{path}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if first is None and _is_output(line[6:]):
                first = time.perf_counter()
            prompt = max(prompt, _prompt_tokens(json.loads(line[6:])))
    PROMPT_TOKENS.append(prompt)
    return (first or time.perf_counter()) - t0


def _prompt_tokens(ev: dict[str, Any]) -> int:
    usage = (
        ev.get("usage")
        or (ev.get("message") or {}).get("usage")
        or (ev.get("response") or {}).get("usage")
        or {}
    )
    n = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    n += usage.get("cache_read_input_tokens") or 0  # Anthropic counts the cached part apart
    return int(n)


def _is_output(data: str) -> bool:
    """Whether an SSE data line carries the reply's first output (text or a call)."""
    if data == "[DONE]":
        return False
    ev = json.loads(data)
    kind = ev.get("type", "")
    if kind in ("content_block_delta", "response.output_text.delta"):
        return True
    if kind.startswith("response.function_call") or kind == "content_block_start":
        return kind != "content_block_start" or ev["content_block"]["type"] == "tool_use"
    for c in ev.get("choices", []):
        d = c.get("delta", {})
        if d.get("content") or d.get("tool_calls") or d.get("reasoning_content"):
            return True
    return False


def claude_turns(url: str, model: str, turns: int, anthropic: bool) -> list[float]:
    """TTFT of each Claude-Code-shaped turn: /v1/messages (or chat completions for a server
    without the Messages API: llama-server has one, so `anthropic` is True for both)."""
    tools = claude_tools()
    messages: list[dict[str, Any]] = [{"role": "user", "content": "List the repository."}]
    out = []
    for turn in range(turns):
        cch = uuid.uuid4().hex[:5]
        system = [
            {
                "type": "text",
                "text": "x-anthropic-billing-header: cc_version=2.1.332.a1b; "
                f"cc_entrypoint=cli; cch={cch};",
            },
            {"type": "text", "text": SYSTEM},
        ]
        body = {
            "model": model,
            "max_tokens": 16,
            "stream": True,
            "temperature": 0,
            "system": system,
            "tools": tools,
            "messages": messages,
        }
        out.append(_stream_ttft(url, "/v1/messages", body, {"anthropic-version": "2023-06-01"}))
        tid = f"toolu_{turn:04d}"
        messages = [
            *messages,
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": tid, "name": "Bash", "input": {"path": f"/t{turn}"}}
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": tid,
                        "content": f"file_{turn}.py\n" * 20,
                    }
                ],
            },
        ]
    return out


def codex_turns(url: str, model: str, turns: int, responses: bool) -> list[float]:
    """TTFT of each Codex-shaped turn: the whole input every time, `store: false`."""
    instructions = _words(3000)
    items: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": "Find the failing test."}
    ]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": instructions},
        {"role": "user", "content": "Find the failing test."},
    ]
    fn_tools = [t for t in CODEX_TOOLS if t["type"] == "function"]
    out = []
    for turn in range(turns):
        if responses:
            body: dict[str, Any] = {
                "model": model,
                "instructions": instructions,
                "input": items,
                "tools": CODEX_TOOLS,
                "tool_choice": "auto",
                "store": False,
                "stream": True,
                "max_output_tokens": 16,
                "temperature": 0,
            }
            out.append(_stream_ttft(url, "/v1/responses", body, {}))
        else:
            body = {
                "model": model,
                "messages": messages,
                "tools": [
                    {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                    for t in fn_tools
                ],
                "tool_choice": "auto",
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 16,
                "temperature": 0,
            }
            out.append(_stream_ttft(url, "/v1/chat/completions", body, {}))
        cid = f"call_{turn:04d}"
        args = json.dumps({"command": ["pytest", "-x", f"tests/t{turn}.py"]})
        result = f"tests/t{turn}.py::test_{turn} FAILED\n" * 20
        items += [
            {"type": "function_call", "call_id": cid, "name": "shell", "arguments": args},
            {"type": "function_call_output", "call_id": cid, "output": result},
        ]
        messages += [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": cid,
                        "type": "function",
                        "function": {"name": "shell", "arguments": args},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": cid, "content": result},
        ]
    return out


def report(name: str, ttfts: list[float]) -> float:
    first, later = ttfts[0], statistics.median(ttfts[1:])
    tokens = PROMPT_TOKENS[-len(ttfts) :]
    print(
        f"  {name:13s} turn 1 {first:6.2f} s ({tokens[0]} tokens)   turns 2..{len(ttfts)} "
        f"median {later:6.2f} s (to {tokens[-1]} tokens)   later/first {later / first:.2f}"
    )
    return later


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-server", type=Path, help="path to a llama-server binary")
    ap.add_argument("--model", type=Path, help="GGUF file (default: Gemma 3 270M from the tests)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=16384, help="context per slot")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--replies", type=int, default=4, help="replies per decode measurement")
    ap.add_argument("--scenarios", default="tools,claude,codex")
    ap.add_argument("--max-waits", type=int, default=30)
    ap.add_argument("--lmx-args", default="", help="more lmx flags, e.g. --no-batch-invariant")
    args = ap.parse_args()
    model = args.model or _default_model()
    scenarios = args.scenarios.split(",")
    lmx_model = model.stem.lower()  # the id lmx's discovery gives the file
    port = free_port()
    cmd = lmx_cmd(
        port,
        model.parent,
        ctx=args.ctx,
        parallel=args.slots,
        threads=args.threads,
        extra=args.lmx_args.split(),
    )
    ttft: dict[str, dict[str, float]] = {}
    wait_idle(args.max_waits)
    with start("lmx", cmd, port, "/health") as url:
        if "tools" in scenarios:
            tools_scenario(url, lmx_model, args.replies)
        for sc in ("claude", "codex"):
            if sc in scenarios:
                print(f"{sc}-shaped turns ({args.turns}), {model.name}:")
                runs = claude_turns if sc == "claude" else codex_turns
                ttft.setdefault(sc, {})["lmx"] = report(
                    "lmx", runs(url, lmx_model, args.turns, True)
                )
    if args.llama_server and any(s in scenarios for s in ("claude", "codex")):
        port = free_port()
        cmd = [
            str(args.llama_server),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(args.threads),
            "-np",
            str(args.slots),
            "-c",
            str(args.ctx * args.slots),
            "--jinja",
        ]
        wait_idle(args.max_waits)
        with start("llama-server", cmd, port, "/health") as url:
            for sc in ("claude", "codex"):
                if sc in scenarios:
                    print(f"{sc}-shaped turns on llama-server:")
                    runs = claude_turns if sc == "claude" else codex_turns
                    later = report("llama-server", runs(url, "m", args.turns, sc == "claude"))
                    ttft[sc]["llama-server"] = later
        for sc, by in ttft.items():
            if "llama-server" in by:
                print(
                    f"{sc}: lmx / llama-server on turns 2..N: {by['lmx'] / by['llama-server']:.2f}"
                )


def _default_model() -> Path:
    gemma = Path.home() / ".cache" / "lmx-tests" / "gemma-3-270m-q4_k_m.gguf"
    if not gemma.exists():
        raise SystemExit(f"no model: pass --model (looked for {gemma})")
    return gemma


if __name__ == "__main__":
    main()
