"""Chat templates rendered as untrusted code: sandboxed, and bounded in time and size.

A downloaded GGUF carries its chat template, a Jinja program somebody else wrote. Jinja's
`ImmutableSandboxedEnvironment` stops it reaching Python internals, but not from looping for
minutes or expanding to gigabytes. This renderer adds a per-render budget, checked wherever a
template can spend time or build data:

- every `{% for %}` iterates through a guard (a rewrite of the parsed template) and every call,
  filter, operator and `~` concatenation counts a step; the steps and a wall-clock deadline are
  checked at each one;
- operators and calls that can multiply sizes in one C call (`"x" * n`, `**`, `%`, `center`,
  `replace`, `join`, `format`...) are checked *before* they run, and every value a call,
  filter, operator or literal builds is measured after (nested lists count in full, so a
  "billion laughs" of shared references is refused);
- output is streamed from `generate()` and counted, and text written into macro and block
  buffers is counted as it is emitted.

A template that trips a limit (or a syntax or sandbox error) is marked broken: later renders
fail at once with the same reason, and only that model is affected.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.filters import FILTERS
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from server.errors import ChatTemplateBroken, InvalidRequest

# A template source longer than this is not a chat template (the largest known are ~30 KB).
MAX_SOURCE_CHARS = 1_000_000
# A big integer operation cost grows with its size; no chat template needs numbers this big.
MAX_INT_BITS = 65_536


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may spend."""

    seconds: float = 2.0
    # The rendered prompt, and any one string or structure built while rendering.
    max_chars: int = 8_000_000
    # Loop iterations, calls, filters and operators.
    max_steps: int = 5_000_000

    @property
    def max_emitted(self) -> int:
        """All text written to output and to macro/block buffers (each may be re-emitted)."""
        return 4 * self.max_chars


@dataclass(frozen=True)
class TemplateCaps:
    """What a template does with the inputs OpenAI-style requests carry."""

    system_role: bool = False  # renders a system message's text
    tools: bool = False  # renders `tools` (tool definitions)
    tool_calls: bool = False  # renders an assistant message's `tool_calls`
    tool_responses: bool = False  # renders `role: tool` messages


class TemplateLimitExceeded(Exception):
    """A render ran out of its budget (raised inside the template's code)."""


class TemplateRaised(Exception):
    """The template called `raise_exception(...)`: it rejects these messages."""


class _Budget:
    """The running totals of one render, checked at every step."""

    __slots__ = ("deadline", "emitted", "limits", "memo", "memo_size", "steps")

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.steps = 0
        self.emitted = 0
        # Sizes of containers already measured (kept alive so that ids stay unique).
        self.memo: dict[int, tuple[Any, int]] = {}
        self.memo_size = 0

    def tick(self) -> None:
        self.steps += 1
        # The clock is read every 32 steps: no single step can run long (sizes are bounded).
        if not self.steps & 31:
            if self.steps > self.limits.max_steps:
                raise TemplateLimitExceeded(
                    f"it took more than {self.limits.max_steps:,} steps (loop iterations and calls)"
                )
            if time.monotonic() > self.deadline:
                raise TemplateLimitExceeded(f"it ran longer than {self.limits.seconds:g} s")

    def too_big(self, what: str = "a value") -> TemplateLimitExceeded:
        return TemplateLimitExceeded(f"{what} would grow past {self.limits.max_chars:,} characters")

    def check_chars(self, n: int, what: str = "a value") -> None:
        if n > self.limits.max_chars:
            raise self.too_big(what)

    def check_value(self, value: Any) -> Any:
        if isinstance(value, str):
            if len(value) > self.limits.max_chars:
                raise self.too_big()
        elif isinstance(value, (list, tuple, dict, set, frozenset, Namespace)):
            self.check_chars(self.size_of(value))
        return value

    def emit(self, n: int) -> None:
        self.emitted += n
        if self.emitted > self.limits.max_emitted:
            raise self.too_big("its output")

    def size_of(self, value: Any) -> int:
        """About the length of `str(value)`, counting shared references in full."""
        if isinstance(value, str):
            return len(value) + 2
        if isinstance(value, (list, tuple, set, frozenset, dict)):
            hit = self.memo.get(id(value))
            if hit is not None and hit[0] is value:
                return hit[1]
            if isinstance(value, dict):
                n = 2 + sum(self.size_of(k) + self.size_of(v) + 4 for k, v in value.items())
            else:
                n = 2 + sum(self.size_of(v) + 2 for v in value)
            if n > self.limits.max_chars:
                raise self.too_big()
            if self.memo_size + n > 2 * self.limits.max_chars:
                self.memo.clear()  # bound what the memo keeps alive
                self.memo_size = 0
            self.memo[id(value)] = (value, n)
            self.memo_size += n
            return n
        if isinstance(value, Namespace):  # mutable: never memoized
            attrs = object.__getattribute__(value, "_Namespace__attrs")
            return 16 + sum(self.size_of(v) + len(k) + 4 for k, v in attrs.items())
        return 4


class _Guard(NodeTransformer):
    """Rewrites a parsed template so loops, literals and `~` pass through the budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _env_call("lmx_loop", node.iter, lineno=node.lineno)  # type: ignore[arg-type]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _env_call("lmx_concat", nodes.List(node.nodes), lineno=node.lineno)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        self.generic_visit(node)
        return _checked_literal(node, node.items)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return _checked_literal(node, node.items) if node.ctx == "load" else node

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        self.generic_visit(node)
        return _checked_literal(node, [x for p in node.items for x in (p.key, p.value)])


def _env_call(name: str, arg: nodes.Expr, *, lineno: int) -> nodes.Call:
    call = nodes.Call(nodes.EnvironmentAttribute(name), [arg], [], None, None)
    call.set_lineno(lineno)
    return call


def _checked_literal(node: nodes.Expr, items: Sequence[nodes.Node]) -> nodes.Expr:
    # A literal of constants is bounded by the source; one holding variables can nest them.
    if all(isinstance(i, nodes.Const) for i in items):
        return node
    return _env_call("lmx_value", node, lineno=node.lineno or 1)


class _GenerationTag(jinja2.ext.Extension):
    """Hugging Face's `{% generation %}...{% endgeneration %}` marks text; render it as is."""

    tags = {"generation"}  # noqa: RUF012 (jinja's own declaration style)

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


# %-format specs: width and precision are where "%999999999s" hides.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_DIGITS = re.compile(r"\d+")


class _LimitedFormatter(SandboxedFormatter):
    """`str.format` for templates: field widths and the total length are checked."""

    def __init__(self, env: _SandboxEnvironment) -> None:
        super().__init__(env)
        self._lenv = env
        self._total = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = self._lenv.budget()
        for digits in _DIGITS.findall(format_spec):
            budget.check_chars(int(digits) if len(digits) < 12 else 1 << 62)
        out = super().format_field(value, format_spec)
        self._total += len(out)
        budget.check_chars(self._total)
        return out


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with what HF chat templates use, and a budget on each render."""

    # Intercepting also stops Jinja from folding these at compile time ("x" * 10**10).
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
            finalize=self._finalize,
        )
        self._local = threading.local()
        self.concat = self._concat  # type: ignore[method-assign]  # macro and block buffers
        self.lmx_loop = self._loop
        self.lmx_concat = self._concat_values
        self.lmx_value = self._literal
        self.globals.pop("lipsum", None)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters.pop("pprint", None)
        self.filters.update(
            tojson=self._tojson,
            center=self._center,
            indent=self._indent,
            wordwrap=self._wordwrap,
            format=self._format,
            replace=self._replace,
            join=self._join,
            batch=self._batch,
            slice=self._slice,
            sum=self._sum,
        )
        self.filters = {name: self._guarded(f) for name, f in self.filters.items()}

    # ----- the budget of the render running on this thread ------------------------------

    def budget(self) -> _Budget:
        budget: _Budget | None = getattr(self._local, "budget", None)
        if budget is None:  # compile-time constant folding: no render yet, nothing to bound
            budget = _Budget(TemplateLimits())
        return budget

    def begin(self, limits: TemplateLimits) -> _Budget:
        budget = _Budget(limits)
        self._local.budget = budget
        return budget

    def end(self) -> None:
        self._local.budget = None

    # ----- parsing: every template goes through the guard -----------------------------

    def compile(
        self,
        source: str | nodes.Template,
        name: str | None = None,
        filename: str | None = None,
        raw: bool = False,
        defer_init: bool = False,
    ) -> Any:
        if isinstance(source, str):
            source = self.parse(source, name, filename)
        tree = _Guard().visit(source)
        return super().compile(tree, name, filename, raw, defer_init)  # type: ignore[call-overload]

    # ----- hooks the sandbox calls ---------------------------------------------------------

    def call(
        __self,
        __context: Any,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        budget = __self.budget()
        budget.tick()
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"{__obj!r} is not safely callable")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes)):
            _precheck_str_method(budget, owner, getattr(__obj, "__name__", ""), args, kwargs)
        return budget.check_value(__context.call(__obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget()
        budget.tick()
        if operator == "+" and type(left) is str and type(right) is str:  # the common case
            budget.check_chars(len(left) + len(right))
            return left + right
        if operator == "*":
            _precheck_repeat(budget, left, right)
        elif operator == "+":
            if isinstance(left, str) and isinstance(right, str):
                budget.check_chars(len(left) + len(right))
            elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                budget.check_chars(budget.size_of(left) + budget.size_of(right))
        elif operator == "**":
            ints = isinstance(left, int) and isinstance(right, int)
            if ints and right > 0 and right * abs(left).bit_length() > MAX_INT_BITS + 1:
                raise TemplateLimitExceeded("an integer power would be too large")
        elif operator == "%" and isinstance(left, str):
            _precheck_percent(budget, left, right)
        return budget.check_value(self.binop_table[operator](left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        name = getattr(value, "__name__", None)
        owner = getattr(value, "__self__", None)
        if name not in ("format", "format_map") or not isinstance(owner, str):
            return None
        kind = type(owner)

        def formatted(*args: Any, **kwargs: Any) -> str:
            if name == "format_map":
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                return kind(_LimitedFormatter(self).vformat(owner, (), args[0]))
            return kind(_LimitedFormatter(self).vformat(owner, args, kwargs))

        return formatted

    def _finalize(self, value: Any) -> Any:
        # Every `{{ expression }}`, at top level or inside a macro, passes here.
        budget = self.budget()
        text = value if isinstance(value, str) else str(value)
        budget.emit(len(text))
        return text

    def _concat(self, parts: Iterable[str]) -> str:
        budget = self.budget()
        kept: list[str] = []
        total = 0
        for p in parts:
            total += len(p)
            budget.check_chars(total, "its output")
            kept.append(p)
        return "".join(kept)

    def _loop(self, iterable: Any) -> Iterator[Any]:
        budget = self.budget()
        for item in iterable:
            budget.tick()
            yield item

    def _concat_values(self, values: list[Any]) -> str:
        budget = self.budget()
        texts = [v if isinstance(v, str) else str(v) for v in values]
        budget.check_chars(sum(len(t) for t in texts))
        return "".join(texts)

    def _literal(self, value: Any) -> Any:
        return value  # measured by `call`, which every literal with variables goes through

    def _guarded(self, f: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(f)  # keeps jinja's pass_context / pass_eval_context markers
        def guarded(*args: Any, **kwargs: Any) -> Any:
            budget = self.budget()
            budget.tick()
            return budget.check_value(f(*args, **kwargs))

        return guarded

    # ----- filters that could multiply sizes in one call ------------------------------

    def _tojson(
        self,
        value: Any,
        ensure_ascii: bool = False,
        indent: int | str | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Hugging Face's tojson: plain json.dumps, no HTML escaping (unlike Jinja's own).
        budget = self.budget()
        budget.check_chars(budget.size_of(value))
        if isinstance(indent, int):
            budget.check_chars(indent)
        if indent is None:
            return json.dumps(
                value, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
            )
        # Indented output is encoded in Python; stream it so the budget is checked as it goes.
        encoder = json.JSONEncoder(
            ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
        return self._concat(self._ticking(encoder.iterencode(value)))

    def _ticking(self, chunks: Iterable[str]) -> Iterator[str]:
        budget = self.budget()
        for i, chunk in enumerate(chunks):
            if not i & 1023:
                budget.tick()
            yield chunk

    def _center(self, value: Any, width: int = 80) -> str:
        self.budget().check_chars(width)
        return str(value).center(width)

    def _indent(
        self, s: Any, width: int | str = 4, first: bool = False, blank: bool = False
    ) -> str:
        text = str(s)
        pad = len(width) if isinstance(width, str) else int(width)
        self.budget().check_chars(len(text) + (text.count("\n") + 1) * max(pad, 0))
        return str(FILTERS["indent"](text, width, first, blank))

    def _wordwrap(
        self,
        s: str,
        width: int = 79,
        break_long_words: bool = True,
        wrapstring: str | None = None,
        break_on_hyphens: bool = True,
    ) -> str:
        sep = wrapstring if wrapstring is not None else "\n"
        lines = len(s) // max(width, 1) + s.count("\n") + 1
        self.budget().check_chars(len(s) + lines * len(sep))
        return str(FILTERS["wordwrap"](self, s, width, break_long_words, sep, break_on_hyphens))

    def _format(self, value: str, *args: Any, **kwargs: Any) -> str:
        if args and kwargs:
            raise TypeError("can't handle positional and keyword arguments at the same time")
        operand = kwargs or args
        _precheck_percent(self.budget(), str(value), operand)
        return str(value) % operand

    def _replace(self, s: Any, old: str, new: str, count: int | None = None) -> str:
        text = str(s)
        _precheck_replace(self.budget(), text, old, new, count)
        return text.replace(old, new, -1 if count is None else count)

    def _join(self, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
        items = list(value)
        if attribute is not None:
            items = [self.getitem(x, attribute) for x in items]
        texts = [x if isinstance(x, str) else str(x) for x in items]
        self.budget().check_chars(sum(len(t) for t in texts) + len(d) * len(texts))
        return d.join(texts)

    def _batch(self, value: Iterable[Any], linecount: int, fill_with: Any = None) -> Any:
        self.budget().check_chars(linecount)
        return FILTERS["batch"](value, linecount, fill_with)

    def _slice(self, value: Iterable[Any], slices: int, fill_with: Any = None) -> Any:
        self.budget().check_chars(slices)
        return FILTERS["slice"](value, slices, fill_with)

    def _sum(
        self, iterable: Iterable[Any], attribute: str | int | None = None, start: Any = 0
    ) -> Any:
        items = list(iterable)
        if attribute is not None:
            items = [self.getitem(x, attribute) for x in items]
        if not isinstance(start, (str, list, tuple)):
            return sum(items, start)
        # Adding sequences one by one is quadratic; build the result once, after a size check.
        budget = self.budget()
        budget.check_chars(budget.size_of(start) + sum(budget.size_of(x) for x in items))
        if isinstance(start, str):
            return start + "".join(items)
        out = list(start)
        for x in items:
            out.extend(x)
        return out if isinstance(start, list) else tuple(out)


def _precheck_repeat(budget: _Budget, left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateLimitExceeded("an integer product would be too large")
        return
    seq, n = (left, right) if isinstance(right, int) else (right, left)
    if isinstance(seq, (str, bytes)) and isinstance(n, int):
        budget.check_chars(len(seq) * n)
    elif isinstance(seq, (list, tuple)) and isinstance(n, int):
        budget.check_chars(budget.size_of(seq) * n)


def _precheck_percent(budget: _Budget, fmt: str, operand: Any) -> None:
    specs = _PERCENT_SPEC.findall(fmt)
    star = False
    for width, precision in specs:
        for part in (width, precision):
            if part == "*":
                star = True
            elif part:
                budget.check_chars(int(part) if len(part) < 12 else 1 << 62)
    values = list(operand) if isinstance(operand, tuple) else [operand]
    if star and any(isinstance(v, int) and abs(v) > budget.limits.max_chars for v in values):
        raise budget.too_big()
    if isinstance(operand, Mapping):  # "%(a)s%(a)s...": each spec may repeat any value
        biggest = max((budget.size_of(v) for v in operand.values()), default=0)
        budget.check_chars(len(fmt) + len(specs) * biggest)
    else:
        budget.check_chars(len(fmt) + sum(budget.size_of(v) for v in values))


def _precheck_replace(budget: _Budget, text: str, old: Any, new: Any, count: Any) -> None:
    if not isinstance(old, str) or not isinstance(new, str):
        return  # str.replace raises its own TypeError
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    budget.check_chars(len(text) + hits * max(len(new) - len(old), 0))


def _precheck_str_method(
    budget: _Budget, owner: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse a string method call whose result would be too big, before it allocates."""
    first = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill"):
        width = first if first is not None else kwargs.get("width")
        if isinstance(width, int):
            budget.check_chars(width)
    elif name == "expandtabs":
        size = first if first is not None else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            tabs = owner.count(b"\t") if isinstance(owner, bytes) else owner.count("\t")
            budget.check_chars(len(owner) + tabs * size)
    elif name == "replace" and isinstance(owner, str):
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        _precheck_replace(budget, owner, first, args[1] if len(args) > 1 else None, count)
    elif name == "join" and args:
        items = args[0]
        if isinstance(items, (list, tuple)):
            sized = sum(len(x) for x in items if isinstance(x, (str, bytes)))
            budget.check_chars(sized + len(owner) * len(items))
        elif not isinstance(items, (str, bytes)):
            raise TemplateLimitExceeded("join() of a lazy sequence is not allowed; use |join")
    elif name == "translate" and isinstance(first, Mapping):
        longest = max((len(v) for v in first.values() if isinstance(v, str)), default=1)
        budget.check_chars(len(owner) * max(longest, 1))


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


_ENVIRONMENT: _SandboxEnvironment | None = None
_ENVIRONMENT_LOCK = threading.Lock()


def _environment() -> _SandboxEnvironment:
    # One environment for every template: it holds no per-template state (budgets are
    # per thread), and building one costs more than a render.
    global _ENVIRONMENT
    with _ENVIRONMENT_LOCK:
        if _ENVIRONMENT is None:
            _ENVIRONMENT = _SandboxEnvironment()
        return _ENVIRONMENT


class ChatTemplate:
    """One model's chat template, rendered with a time and size budget per render.

    Never raises at construction; a template that does not compile, escapes the sandbox or
    runs past a limit is `broken`, and every render then raises `ChatTemplateBroken`.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        limits: TemplateLimits | None = None,
        name: str = "",
    ) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.limits = limits or TemplateLimits()
        self.name = name
        self.broken: str | None = None
        self._compiled: jinja2.Template | None = None
        self._caps: TemplateCaps | None = None
        self._lock = threading.Lock()

    def _template(self) -> jinja2.Template:
        with self._lock:
            if self.broken is not None:
                raise self._broken_error()
            if self._compiled is None:
                if len(self.source) > MAX_SOURCE_CHARS:
                    self._mark_broken(f"its source is longer than {MAX_SOURCE_CHARS:,} characters")
                    raise self._broken_error()
                try:
                    self._compiled = _environment().from_string(self.source)
                except TemplateSyntaxError as e:
                    self._mark_broken(f"it does not compile: {e.message} (line {e.lineno})")
                    raise self._broken_error() from e
                except (RecursionError, MemoryError) as e:
                    self._mark_broken(f"it does not compile: {type(e).__name__}")
                    raise self._broken_error() from e
            return self._compiled

    def _mark_broken(self, reason: str) -> None:
        self.broken = reason

    def _broken_error(self) -> ChatTemplateBroken:
        who = f"of '{self.name}' " if self.name else ""
        return ChatTemplateBroken(
            f"The chat template {who}is unusable: {self.broken}. "
            "Give the model a chat_template override."
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt for `messages` (and `tools`, OpenAI-shaped), as Hugging Face renders it.

        `template_kwargs` reach the template as variables (`enable_thinking`, ...).
        Raises `InvalidRequest` when the template rejects the messages and
        `ChatTemplateBroken` when the template itself is at fault.
        """
        template = self._template()
        env = _environment()
        context = {
            **template_kwargs,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        budget = env.begin(self.limits)
        try:
            parts: list[str] = []
            total = 0
            for chunk in template.generate(context):
                total += len(chunk)
                budget.check_chars(total, "its output")
                parts.append(chunk)
            return "".join(parts)
        except TemplateRaised as e:
            raise InvalidRequest(
                f"The chat template rejected the messages: {e}", param="messages"
            ) from e
        except TemplateLimitExceeded as e:
            self._mark_broken(str(e))
            raise self._broken_error() from e
        except SecurityError as e:
            self._mark_broken(f"it broke the sandbox's rules ({e})")
            raise self._broken_error() from e
        except (RecursionError, MemoryError, OverflowError) as e:
            # Unbounded recursion, or a range or number past the sandbox's limits.
            self._mark_broken(f"rendering failed with {type(e).__name__}: {e}")
            raise self._broken_error() from e
        except Exception as e:  # undefined values, type errors: what these messages trigger
            raise InvalidRequest(
                f"The chat template rejected the messages: {type(e).__name__}: {e}",
                param="messages",
            ) from e
        finally:
            env.end()

    @property
    def caps(self) -> TemplateCaps:
        """What this template renders, found by rendering probe messages (once)."""
        if self._caps is None:
            self._caps = self._probe()
        return self._caps

    def _renders(self, marker: str, messages: list[dict[str, Any]], **kw: Any) -> bool:
        try:
            return marker in self.render(messages, **kw)
        except Exception:  # rejected messages, or a broken template: not rendered either way
            return False

    def _probe(self) -> TemplateCaps:
        user = {"role": "user", "content": "Hi"}
        system = self._renders(
            "lmx-probe-system", [{"role": "system", "content": "lmx-probe-system"}, user]
        )
        tool = {
            "type": "function",
            "function": {
                "name": "lmx_probe_tool",
                "description": "A probe.",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
        tools = self._renders("lmx_probe_tool", [user], tools=[tool])
        call = {
            "id": "call_lmxprobe000000000000000",
            "type": "function",
            "function": {"name": "lmx_probe_call", "arguments": {"q": "x"}},
        }
        history: list[dict[str, Any]] = [
            user,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {
                "role": "tool",
                "tool_call_id": call["id"],
                "name": "lmx_probe_call",
                "content": "lmx-probe-result",
            },
        ]
        calls = self._renders("lmx_probe_call", history, tools=[tool])
        results = self._renders("lmx-probe-result", history, tools=[tool])
        return TemplateCaps(
            system_role=system, tools=tools, tool_calls=calls, tool_responses=results
        )
