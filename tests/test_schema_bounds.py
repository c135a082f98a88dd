"""No schema a client sends can crash, stall or exhaust the server.

Bounds (`maxLength: 524288`, as Claude Code's Workflow tool has it; `maxItems`, nesting,
`$ref` recursion, long enums, patterns) become grammars whose size does not grow with the
bound, or are left to a check of the finished reply. Every route that takes a schema or tools
is fuzzed with them through a real `lmx --no-ui` (a subprocess: a native crash fails the test
with its exit status and faulthandler's stack, instead of taking pytest down), and the server
answers /health after each request.
"""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import InvalidRequest
from server.grammar import check_grammar, json_constraint, tool_call_constraint
from server.grammar.gbnf import MAX_BYTES
from server.toolcalls import ToolChoice, parse_tools
from tests.conftest import serving_url

MODEL = "smollm2-135m-instruct.q4_1"
WORKFLOW = {"type": "string", "maxLength": 524288}  # Claude Code's Workflow tool
ISSUE_SCHEMA = {"type": "object", "properties": {"s": WORKFLOW}, "required": ["s"]}


class Lmx:
    """`lmx --no-ui` in a subprocess, its output kept (the last lines tell a crash)."""

    def __init__(self, proc: subprocess.Popen[str], url: str, out: collections.deque[str]):
        self.proc, self.url, self.out = proc, url, out

    def assert_alive(self, after: str) -> None:
        code = self.proc.poll()
        tail = "".join(list(self.out)[-40:])
        assert code is None, f"lmx exited with {code} after {after}:\n{tail}"
        r = httpx.get(self.url + "/health", timeout=30)
        assert r.status_code == 200, (after, r.text)


@pytest.fixture(scope="module")
def lmx() -> Iterator[Lmx]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--no-ui", "--port", "0", "--ctx", "8192"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    out: collections.deque[str] = collections.deque(maxlen=400)
    lines: list[str] = []

    def first_lines() -> Iterator[str]:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            yield line

    url = serving_url(first_lines())
    out.extend(lines)
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    try:
        yield Lmx(proc, url, out)
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the strategy -------------------------------------------------------------------------

# Bounds as clients send them: small ones a grammar writes out, and the huge ones that used to
# expand into a grammar nested as deep as the number.
BOUNDS = st.sampled_from([0, 1, 2, 3, 7, 64, 1999, 2000, 2001, 65536, 524288, 10**9])
PATTERNS = st.sampled_from(
    [
        "^[a-z]+$",
        "^\\d{3}-\\d{4}$",
        "^(a|b)*c{2,5}$",
        "[A-Z]{3}",  # unanchored: anything around it
        "^(?=a).*$",  # a lookahead: no grammar, checked on the reply
        "^a{3000}$",  # past llama.cpp's repetition limit
        "^(((((((((((a)))))))))))$",
        '^[^"\\\\]{1,524288}$',
        "(",  # not a regular expression
    ]
)
LEAVES = st.one_of(
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": hi}, BOUNDS, BOUNDS),
    st.builds(lambda hi: {"type": "string", "maxLength": hi}, BOUNDS),
    st.builds(lambda p: {"type": "string", "pattern": p}, PATTERNS),
    st.builds(
        lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi},
        st.integers(-(10**12), 10**12),
        st.integers(-(10**12), 10**12),
    ),
    st.builds(lambda lo: {"type": "number", "exclusiveMinimum": lo}, st.floats(-1e6, 1e6)),
    st.builds(lambda n: {"enum": [f"v{i}" for i in range(n)]}, st.sampled_from([1, 3, 5000])),
    st.just({"type": "string", "format": "date-time"}),
    st.just({"description": "any value"}),
    st.just({"type": ["string", "null"]}),
)


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.builds(
            lambda item, lo, hi: {"type": "array", "items": item, "minItems": lo, "maxItems": hi},
            children,
            BOUNDS,
            BOUNDS,
        ),
        st.builds(
            lambda props, req: {
                "type": "object",
                "properties": props,
                "required": list(props)[:req],
            },
            st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), children, max_size=4),
            st.integers(0, 4),
        ),
        st.builds(lambda alts: {"anyOf": alts}, st.lists(children, min_size=1, max_size=3)),
    )


SCHEMAS = st.one_of(
    st.recursive(LEAVES, _extend, max_leaves=8),
    # Nesting, $ref recursion and width, at sizes no client needs.
    st.builds(lambda d: _nested(d), st.sampled_from([10, 63, 65, 400])),
    st.just(
        {
            "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
            "$ref": "#/$defs/n",
        }
    ),
    st.just({"$ref": "#"}),
    st.builds(
        lambda n: {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}},
        st.sampled_from([65, 3000]),
    ),
)


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "maxLength": 524288}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


def _as_object(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type") == "object" or "$ref" in schema:
        return schema
    return {"type": "object", "properties": {"v": schema}, "required": ["v"]}


# -- the converter alone ------------------------------------------------------------------


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(schema=SCHEMAS)
def test_any_schema_is_a_bounded_checked_grammar_or_a_400(schema: dict[str, Any]) -> None:
    """What llama.cpp gets was checked (repetitions within its limit, no deep nesting, no left
    recursion) and is bounded in size whatever the bounds' values."""
    try:
        grammar, check = json_constraint(_as_object(schema))
    except InvalidRequest as e:
        assert e.param == "response_format" and e.message
        return
    check_grammar(grammar)
    assert len(grammar) < MAX_BYTES
    assert "{524288" not in grammar and "{2001" not in grammar
    if check is not None:
        assert check.relaxed and check.param == "response_format"


def test_claude_codes_workflow_bound_is_a_repetition_not_a_nesting() -> None:
    grammar, check = json_constraint(ISSUE_SCHEMA)
    check_grammar(grammar)
    assert len(grammar) < 1000 and grammar.count("(") < 10
    # Past llama.cpp's limit the bound is not in the grammar: the reply is checked instead.
    assert check is not None and check.relaxed == ("maxLength 524288 at $.s",)
    assert check.problem({"s": "x" * 10}) is None
    assert "maxLength 524288 fails at $.s" in (check.problem({"s": "x" * 524289}) or "")
    exact, none = json_constraint(
        {"type": "object", "properties": {"s": {"maxLength": 30, "type": "string"}}}
    )
    assert none is None and "char{0,30}" in exact


def test_tool_grammar_errors_name_tools() -> None:
    tools = parse_tools(
        [{"type": "function", "function": {"name": "t", "parameters": {"$ref": "http://x/y"}}}]
    )
    with pytest.raises(InvalidRequest) as e:
        tool_call_constraint(tools, ToolChoice("required"), True)
    assert e.value.param == "tools" and "'t'" in e.value.message


@pytest.mark.parametrize(
    "grammar, why",
    [
        ("root ::= " + "(" * 5000 + '"a"' + ")" * 5000, "nested deeper"),
        ('root ::= x{0,2000}\nx ::= y{0,2000}\ny ::= "a"?', "deeper than"),
        ('root ::= x*\nx ::= "a"?', "can be empty"),
        ('root ::= root "a" | "b"', "left-recursive"),
        ('root ::= "a"{5000}', "at least 5000"),
        ("root ::= missing", "undefined rule 'missing'"),
        ('item ::= "a"', "no root"),
        ('root ::= "a', "end of input"),
        ("root ::= [\\q]", "unknown escape"),
    ],
)
def test_grammars_llama_cpp_would_refuse_or_recurse_on_are_400s(grammar: str, why: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        check_grammar(grammar)
    assert why in e.value.message and e.value.param == "grammar"


def test_grammars_people_write_pass() -> None:
    for g in [
        'root ::= "yes" | "no"',
        'root ::= item+\nitem ::= "- " [^\\n]+ "\\n"',
        'root ::= ("a" | "b"){2,2000} ws\nws ::= [ \\t\\n]*  # comment',
        'root ::= "<think>" [^<]* "</think>" answer\nanswer ::= [a-z ]{1,100}',
        'root ::= x x?\nx ::= "(" root? ")"',
    ]:
        check_grammar(g)


# -- through a running server, every route --------------------------------------------------


def _routes(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    obj = _as_object(schema)
    ask = [{"role": "user", "content": "Fill it in."}]
    fn = {"type": "function", "function": {"name": "f", "parameters": obj}}
    return [
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "max_tokens": 6,
                "messages": ask,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": obj},
                },
            },
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "max_tokens": 6,
                "messages": ask,
                "tools": [fn],
                "tool_choice": "auto",
            },
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "max_tokens": 6,
                "messages": ask,
                "tools": [fn],
                "tool_choice": "required",
                "stream": True,
            },
        ),
        (
            "/v1/responses",
            {
                "model": MODEL,
                "max_output_tokens": 16,
                "input": "Fill it in.",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": obj}},
            },
        ),
        (
            "/v1/responses",
            {
                "model": MODEL,
                "max_output_tokens": 16,
                "input": "Fill it in.",
                "tools": [{"type": "function", "name": "f", "parameters": obj}],
                "tool_choice": "required",
            },
        ),
        (
            "/v1/messages",
            {
                "model": MODEL,
                "max_tokens": 6,
                "messages": ask,
                "tools": [{"name": "f", "input_schema": obj}],
                "tool_choice": {"type": "any"},
                "stream": True,
            },
        ),
    ]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("route", range(6))
def test_the_issue_request_on_every_route_keeps_the_server_up(lmx: Lmx, route: int) -> None:
    path, body = _routes(ISSUE_SCHEMA)[route]
    r = httpx.post(lmx.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    lmx.assert_alive(f"{path} {json.dumps(body)[:200]}")


@pytest.mark.timeout(1200)
def test_fuzzed_schema_bounds_on_every_route(lmx: Lmx) -> None:
    seen: collections.Counter[int] = collections.Counter()

    @settings(
        max_examples=12,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(schema=SCHEMAS, route=st.integers(0, 5))
    def one(schema: dict[str, Any], route: int) -> None:
        path, body = _routes(schema)[route]
        r = httpx.post(lmx.url + path, json=body, timeout=120)
        seen[r.status_code] += 1
        assert r.status_code < 500, (r.status_code, r.text[:300], json.dumps(body)[:300])
        if r.status_code >= 400:
            err = r.json()
            text = json.dumps(err)
            assert "error" in err and (
                "tools" in text or "response_format" in text or "text" in text or "schema" in text
            ), text
        lmx.assert_alive(f"{path} {json.dumps(body)[:300]}")

    one()
    assert seen[200] > 0, seen


def test_a_reply_the_grammar_could_not_hold_is_checked(lmx: Lmx) -> None:
    """`not` has no grammar: the reply is validated, and a mismatch is an error in the
    client's dialect naming the field, not a reply that breaks the client's schema."""
    client = openai.OpenAI(base_url=lmx.url + "/v1", api_key="x", max_retries=0)
    impossible = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 3}},
        "required": ["a"],
        "additionalProperties": False,
        "not": {"required": ["a"]},
    }
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": impossible}}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=40,
            temperature=0,
            response_format=fmt,
        )
    assert "does not match the schema: not " in e.value.message, e.value.message
    assert "fails at $ " in e.value.message and "could not hold not at $" in e.value.message
    assert e.value.body["param"] == "response_format"  # type: ignore[index]
    # A relaxed bound the reply keeps to is a plain 200.
    fine: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": ISSUE_SCHEMA}}
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=40,
        temperature=0,
        response_format=fine,
    )
    assert r.choices[0].finish_reason == "stop" and "s" in json.loads(
        r.choices[0].message.content or ""
    )
    lmx.assert_alive("a checked reply")


def test_a_client_grammar_that_would_crash_llama_cpp_is_a_400(lmx: Lmx) -> None:
    deep = "root ::= " + "(" * 20000 + '"a"' + ")" * 20000
    r = httpx.post(
        lmx.url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "max_tokens": 4,
            "grammar": deep,
            "messages": [{"role": "user", "content": "hi"}],
        },
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar", r.text
    r = httpx.post(
        lmx.url + "/api/generate",
        json={
            "model": MODEL,
            "prompt": "hi",
            "stream": False,
            "options": {"num_predict": 20},
            "format": {"type": "object", "properties": {"s": WORKFLOW}},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    lmx.assert_alive("a deep grammar")


def test_claude_codes_own_tools_stream(lmx: Lmx) -> None:
    """Claude Code's 25 tools (captured from `claude -p` 2.1.197 on the wire; descriptions cut
    to their first line, schemas whole: Workflow's `maxLength: 524288` among them), through
    the Anthropic SDK, streamed as Claude Code streams it."""
    tools = json.loads((Path(__file__).parent / "claude_code_tools.json").read_text())
    assert any(t["name"] == "Workflow" for t in tools) and len(tools) == 25
    claude = anthropic.Anthropic(base_url=lmx.url, api_key="x", max_retries=0, timeout=600)
    with claude.messages.stream(
        model=MODEL,
        max_tokens=8,
        system=[{"type": "text", "text": "You are a coding agent."}],
        messages=[{"role": "user", "content": "hi"}],
        tools=tools,
    ) as stream:
        kinds = [e.type for e in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    lmx.assert_alive("Claude Code's tools")


# -- found in review: each was silently loose, impossible, or a hang ------------------------


def _rules(grammar: str) -> dict[str, str]:
    return dict(line.split(" ::= ", 1) for line in grammar.splitlines())


def test_a_property_called_root_is_not_the_root() -> None:
    rules = _rules(
        json_constraint({"type": "object", "properties": {"root": {"type": "string"}}})[0]
    )
    assert rules["root"].startswith('"{"') and '"\\"root\\""' in rules["root-kv"]


def test_required_keys_are_kept_where_the_grammar_used_to_drop_them() -> None:
    # No properties: the key is still required.
    rules = _rules(json_constraint({"type": "object", "required": ["a"]})[0])
    assert rules["root"] == '"{" space a-kv "}" space'
    # A oneOf alternative adds its own required key to the parent's, and is checked.
    grammar, check = json_constraint(
        {
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"type": "string"}},
            "oneOf": [{"required": ["a"], "properties": {"a": {}}}],
        }
    )
    assert '"\\"id\\""' in grammar and '"\\"a\\""' in grammar
    assert check is not None and check.problem({"a": 1}) is not None


def test_defs_whose_names_clean_up_alike_keep_their_own_rules() -> None:
    schema = {
        "type": "object",
        "$defs": {"a.b": {"type": "string"}, "a_b": {"type": "integer"}},
        "properties": {"x": {"$ref": "#/$defs/a.b"}, "y": {"$ref": "#/$defs/a_b"}},
    }
    rules = _rules(json_constraint(schema)[0])
    assert rules[rules["x"]] != rules[rules["y"]]


@pytest.mark.parametrize(
    "schema, relaxed",
    [
        ({"maximum": 10}, "keywords without a type"),
        ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "beside pattern"),
        ({"$ref": "#/$defs/s", "maxLength": 2}, "beside $ref"),
        ({"type": "integer", "oneOf": [{"minimum": 1}, {"maximum": 5}]}, "oneOf"),
    ],
)
def test_what_a_grammar_cannot_hold_is_checked_not_dropped(
    schema: dict[str, Any], relaxed: str
) -> None:
    doc = {"type": "object", "$defs": {"s": {"type": "string"}}, "properties": {"v": schema}}
    _grammar, check = json_constraint(doc)
    assert check is not None and any(relaxed in r for r in check.relaxed), check


def test_every_tool_keeps_its_check_past_twenty_relaxations() -> None:
    big = {"type": "object", "properties": {f"p{i}": {"maximum": 10} for i in range(25)}}
    small = {"type": "object", "properties": {"s": WORKFLOW}}
    tools = parse_tools(
        [
            {"type": "function", "function": {"name": "big", "parameters": big}},
            {"type": "function", "function": {"name": "small", "parameters": small}},
        ]
    )
    _grammar, checks = tool_call_constraint(tools, ToolChoice("required"), True)
    assert sorted(checks) == ["big", "small"]


def test_a_pattern_python_cannot_read_skips_only_itself_in_the_check() -> None:
    from server.grammar import SchemaCheck

    schema = {"type": "object", "properties": {"a": {"pattern": "^\\p{L}+$"}, "b": WORKFLOW}}
    check = SchemaCheck(schema, ("x",), "response_format")
    assert check.problem({"a": "z", "b": "x" * 524289}) is not None
    assert check.problem({"a": "z", "b": "x"}) is None


def test_a_lone_surrogate_is_a_400_not_a_500() -> None:
    with pytest.raises(InvalidRequest, match="surrogate"):
        json_constraint({"type": "object", "properties": {"c": {"const": "\ud83d"}}})


@pytest.mark.parametrize(
    "grammar",
    ['root ::= "a"{2}{3}', 'root ::= "x" [0-9]+?', "root ::= [a\\-z]", 'root ::= ("a"){0,50}'],
)
def test_repetitions_of_repetitions_are_checked_not_looped_on(grammar: str) -> None:
    check_grammar(grammar)  # (this used to never return)


def test_grammars_llama_cpp_would_walk_exponentially_are_400s() -> None:
    # llama.cpp's left-recursion check walks a rule again each way it is reached.
    doubling = "root ::= a0\n" + "".join(f"a{i} ::= a{i + 1} | a{i + 1}\n" for i in range(60))
    with pytest.raises(InvalidRequest, match="branches too much"):
        check_grammar(doubling + 'a60 ::= "x"')
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 3} for i in range(30)}
    defs["d30"] = {"type": "string"}
    schema = {"$defs": defs, "type": "object", "properties": {"x": {"$ref": "#/$defs/d0"}}}
    with pytest.raises(InvalidRequest, match="branches too much"):
        json_constraint(schema)
    # A long chain of rules that may be empty is fine (and checked in linear time).
    chain = "root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(3000))
    check_grammar(chain + 'r3000 ::= ""')
