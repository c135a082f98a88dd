"""The chat-template renderer: Hugging Face's behaviour, and limits a hostile template hits."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from server.chat_template import ChatTemplate, TemplateCaps, TemplateLimits
from server.discovery import describe_file
from server.engines.base import EngineOptions
from server.engines.llamacpp import LlamaCppEngine
from server.errors import ChatTemplateBroken, InvalidRequest
from tests.chat_templates import HERMES

USER = [{"role": "user", "content": "Hello"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": 'Weather <now> & "here"',
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22C"},
    {"role": "assistant", "content": "It is 22C."},
    {"role": "user", "content": "Thanks!"},
]

# What HF templates lean on: tojson (unescaped, indented), loop controls, namespace, string
# methods, format, %, filters, {% generation %}, strftime_now, extra variables.
FEATURES = """\
{{- bos_token -}}
{%- set ns = namespace(n=0, sys='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  [{{ loop.index }}/{{ loop.length }} {{ m.role|upper }}{{ ' last' if loop.last }}]
  {%- if m.content and m.content.startswith('Weather') %} W:{{ m.content.split(' ')[-1]|trim('?') }}
  {%- endif %} {{ '{}-{}'.format(m.role, ns.n) }} {{ '%s|%05.1f' % (m.role, 2.5) }}
  {%- if m.tool_calls %}{% for c in m.tool_calls %} CALL {{ c.function|tojson }}{% endfor %}
  {%- endif %}
  {%- if m.role == 'assistant' %}{% generation %} {{ m.content }}{% endgeneration %}{% endif %}
  {%- if ns.n > 3 %}{% break %}{% endif %}
{%- endfor %}
SYS={{ ns.sys|default('none') }} TOOLS={{ tools|tojson(indent=2) if tools else '' }}
{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(', ') }}
{{ {'b': 1, 'a': 2}|dictsort }} {{ [3, 1, 2]|sort|list }} {{ 'x'|center(5) }}
{{ 'a b'|replace('a', 'A') }}
{{ enable_thinking }} {{ (strftime_now('%Y')|int) > 2000 }}
{%- if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}"""


def hf_render(source: str, messages: list[dict[str, Any]], **kw: Any) -> str:
    """llama-cpp-python's renderer, which follows transformers: the reference."""
    return Jinja2ChatFormatter(source, eos_token="</s>", bos_token="<s>")(
        messages=messages, **kw
    ).prompt


@pytest.mark.parametrize("source", [FEATURES, HERMES], ids=["features", "hermes"])
@pytest.mark.parametrize("with_tools", [False, True])
def test_renders_like_hugging_face(source: str, with_tools: bool) -> None:
    tools = TOOLS if with_tools else None
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(
        HISTORY, tools=tools, enable_thinking=False
    )
    assert ours == hf_render(source, HISTORY, tools=tools, enable_thinking=False)
    if source is FEATURES:
        assert "[2/6 USER] W:Paris" in ours and "user|002.5" in ours  # it really ran
        assert '"description": "Weather <now> & \\"here\\""' in ours or not with_tools


def test_the_smollm2_template_matches(smollm2_path: Path) -> None:
    source = describe_file("m", smollm2_path, "test").chat_template
    assert source is not None
    messages = [*HISTORY[:2], {"role": "assistant", "content": "Hi"}]
    ours = ChatTemplate(source).render(messages)
    assert ours == Jinja2ChatFormatter(source, "", "")(messages=messages).prompt


def test_raise_exception_is_the_callers_error_and_leaves_the_template_usable() -> None:
    t = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Roles must alternate') }}"
        "{% endif %}{{ messages[0].content }}"
    )
    with pytest.raises(InvalidRequest, match="Roles must alternate") as err:
        t.render([{"role": "assistant", "content": "x"}])
    assert not isinstance(err.value, ChatTemplateBroken) and err.value.param == "messages"
    assert t.broken is None
    assert t.render(USER) == "Hello"


def test_undefined_data_is_the_callers_error() -> None:
    t = ChatTemplate("{{ messages[0].content.upper() }}")
    with pytest.raises(InvalidRequest, match="rejected the messages"):
        t.render([{"role": "user"}])
    assert t.broken is None


HOSTILE = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "loops over a long string": "{% set s = 'x' * 1000000 %}{% for a in s %}{% for b in s %}"
    "{% endfor %}{% endfor %}",
    "string times 10**10": "{{ 'x' * 10**10 }}",
    "a huge power": "{{ 7 ** (2 ** 40) }}",
    "a huge range": "{{ range(10**10)|list|length }}",
    "unbounded recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "exponential recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
    "{% endmacro %}{{ f(60) }}",
    "billion laughs": "{% set a = ['xxxxxxxxxx'] %}"
    + "".join(
        f"{{% set {n} = [{p},{p},{p},{p},{p},{p},{p},{p},{p},{p}] %}}"
        for p, n in zip("abcdefg", "bcdefgh", strict=True)
    )
    + "{{ h }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "doubling nested dicts": "{% set ns = namespace(d={}) %}{% for i in range(64) %}"
    "{% set ns.d = {'l': ns.d, 'r': ns.d} %}{% endfor %}{{ ns.d }}",
    "center filter": "{{ 'x'|center(10**10) }}",
    "ljust method": "{{ 'x'.ljust(10**10) }}",
    "format width": "{{ '{:>9999999999}'.format(1) }}",
    "percent width": "{{ '%9999999999s' % 'x' }}",
    "percent mapping": "{% set s = '%(a)s' * 100000 %}{{ s % {'a': 'y' * 1000000} }}",
    "replace blowup": "{% set s = 'x' * 100000 %}{{ s|replace('x', 'y' * 100000) }}",
    "macro buffer": "{% macro m() %}{% for i in range(100000) %}{{ 'y' * 1000000 }}{% endfor %}"
    "{% endmacro %}{{ m() }}",
    "output": "{% for i in range(100000) %}{{ 'y' * 1000000 }}{% endfor %}",
    "shared list": "{% set a = [range(100000)|list] * 100000 %}{{ a|tojson }}",
    "fromkeys": "{{ {}.fromkeys(range(100000), 'x' * 1000000) }}",
    "batch padding": "{{ [1]|batch(10**10, 'x')|list }}",
    "indent": "{% set s = '\\n' * 1000000 %}{{ s|indent(100000) }}",
    "join": "{% set a = ['y' * 1000000] * 100 %}{{ a|join('') }}",
    "sandbox escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "syntax error": "{% for %}",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_template_fails_and_is_marked_broken(source: str) -> None:
    t = ChatTemplate(source, name="evil-model")
    with pytest.raises(ChatTemplateBroken, match="chat template of 'evil-model' is unusable"):
        t.render(USER)
    assert t.broken
    # Later requests fail at once, with the same reason.
    with pytest.raises(ChatTemplateBroken, match=t.broken.split("(")[0][:30]):
        t.render(USER)


def test_the_step_budget() -> None:
    loop = "{% for i in range(n) %}.{% endfor %}"
    limits = TemplateLimits(max_steps=1000)
    assert ChatTemplate(loop, limits=limits).render(USER, n=500) == "." * 500
    t = ChatTemplate(loop, limits=limits)
    with pytest.raises(ChatTemplateBroken, match="more than 1,000 steps"):
        t.render(USER, n=5000)


def test_the_size_budget() -> None:
    out = "{{ 'y' * n }}"
    limits = TemplateLimits(max_chars=1000)
    assert ChatTemplate(out, limits=limits).render(USER, n=900) == "y" * 900
    with pytest.raises(ChatTemplateBroken, match="past 1,000 characters"):
        ChatTemplate(out, limits=limits).render(USER, n=1001)
    many = "{% for i in range(n) %}{{ 'y' * 100 }}{% endfor %}"
    with pytest.raises(ChatTemplateBroken, match="output would grow past 1,000"):
        ChatTemplate(many, limits=limits).render(USER, n=11)


@pytest.mark.timeout(60)
def test_the_time_limit() -> None:
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    t = ChatTemplate(slow, limits=TemplateLimits(seconds=0.2, max_steps=10**12))
    with pytest.raises(ChatTemplateBroken, match=r"ran longer than 0\.2 s"):
        t.render(USER)


@pytest.mark.timeout(60)
def test_a_hostile_render_does_not_block_other_templates() -> None:
    hostile = ChatTemplate(
        HOSTILE["exponential recursion"], limits=TemplateLimits(seconds=3, max_steps=10**12)
    )
    errors: list[Exception] = []

    def run() -> None:
        try:
            hostile.render(USER)
        except Exception as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    good = ChatTemplate(HERMES)
    renders = [good.render(HISTORY, tools=TOOLS) for _ in range(20)]
    assert thread.is_alive()  # the hostile render was still running all along
    thread.join(60)
    assert len(set(renders)) == 1 and "<tool_call>" in renders[0]
    assert len(errors) == 1 and isinstance(errors[0], ChatTemplateBroken)


def test_capabilities_are_found_by_rendering(smollm2_path: Path) -> None:
    smol = describe_file("m", smollm2_path, "test").chat_template
    assert smol is not None
    # SmolLM2's template prints any role's content, tools it ignores.
    assert ChatTemplate(smol).caps == TemplateCaps(
        system_role=True, tools=False, tool_calls=False, tool_responses=True
    )
    assert ChatTemplate(HERMES).caps == TemplateCaps(True, True, True, True)
    no_system = "{% for m in messages %}{% if m.role != 'system' %}{{ m.content }}{% endif %}"
    assert not ChatTemplate(no_system + "{% endfor %}").caps.system_role
    assert ChatTemplate(HOSTILE["nested loops"]).caps == TemplateCaps()


def test_the_engine_renders_with_the_limited_renderer(smollm2_path: Path) -> None:
    info = describe_file("smollm2", smollm2_path, "test")
    evil = LlamaCppEngine(
        info, EngineOptions(n_ctx=512, parallel=1, chat_template=HOSTILE["billion laughs"])
    )
    evil.load()
    try:
        with pytest.raises(ChatTemplateBroken, match="of 'smollm2' is unusable"):
            evil.format_chat(USER)
        assert evil.chat_template is not None and evil.chat_template.broken
    finally:
        evil.close()
    engine = LlamaCppEngine(info, EngineOptions(n_ctx=512, parallel=1, chat_template=HERMES))
    engine.load()
    try:
        prompt = engine.render_chat(USER, tools=TOOLS, template_kwargs={"enable_thinking": True})
        assert "<tools>" in prompt and prompt.endswith("<|im_start|>assistant\n")
        assert (
            engine.format_chat(USER)[:1] == engine.tokenize("<|im_start|>", add_special=False)[:1]
        )
    finally:
        engine.close()
