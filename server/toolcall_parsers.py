"""Streaming parsers for the tool-call formats models write, one class per family.

Each parser takes the reply's content text in chunks of any size and gives `chat_output`
events: content passes through as soon as it cannot be the start of a call marker; a call
gives `ToolCallStart` once its name is complete, its arguments' JSON text as it arrives
(`ToolCallDelta`), and `ToolCallEnd`. A call that does not parse (bad JSON, an unknown
function, no name) falls back to plain content, never to an exception; one that is cut off
after it started ends with `complete=False` and its raw text.

Formats (what `detect_tool_format` in `server.toolcalls` names):
- hermes:  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen 2.5/3)
- llama3:  a reply that is `{"name": ..., "parameters": {...}}` (optionally after
           `<|python_tag|>`), several joined by `;` (Llama 3.1-3.3)
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers) or
           `[TOOL_CALLS]name[ARGS]{...}` / `[TOOL_CALLS]name{...}` (v11+)
- generic: the whole reply is `{"tool_calls": [{"name": ..., "arguments": {...}}]}`
           (or `"tool_call": {...}`) or `{"response": "text"}`; what lmx asks of models whose
           template knows no tools, and what its grammar forces for `required` / a named tool.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from server.chat_output import (
    ContentDelta,
    OutputEvent,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from server.reasoning import partial_suffix

_ALNUM = string.ascii_letters + string.digits
ARGUMENT_KEYS = ("arguments", "parameters")
# Keys a call object may have; any other first key means the JSON is not a call.
CALL_KEYS = frozenset({"name", "arguments", "parameters", "type", "id"})
MAX_DEPTH = 256


def new_call_id() -> str:
    """An OpenAI-style call id: `call_` and 24 letters or digits."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


# ----- an incremental JSON scanner ---------------------------------------------------------

Path = tuple[str | int, ...]
_WS = frozenset(" \t\n\r")
_STR_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NUM_CHARS = frozenset("0123456789+-.eE")
_HEX = frozenset("0123456789abcdefABCDEF")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_OBJ, _ARR = "{", "["
_KEY_OR_CLOSE, _KEY, _COLON, _VALUE, _COMMA_OR_CLOSE, _VALUE_OR_CLOSE = range(6)


@dataclass
class _Frame:
    kind: str
    path: Path
    state: int
    key: str = ""
    index: int = 0


@dataclass(frozen=True)
class ScanEvent:
    """`start`/`end` of the value at `path` (end: the offset just past it), or `key`."""

    kind: str
    path: Path
    pos: int
    key: str = ""


class JsonScanner:
    """Checks JSON syntax over a growing text, one root value, and reports where values
    start and end and which keys appear. Resumable: call `scan` again with more text."""

    def __init__(self) -> None:
        self.pos = 0
        self.done = False
        self.error = False
        self.end = -1
        self._stack: list[_Frame] = []
        self._tok: tuple[Any, ...] | None = None  # (kind, start, path, extra)
        self._esc = False
        self._hex = 0

    def scan(self, text: str) -> list[ScanEvent]:
        """Consume `text[self.pos:]` until the root value ends, an error, or the text ends."""
        ev: list[ScanEvent] = []
        i, n = self.pos, len(text)
        while i < n and not (self.done or self.error):
            tok = self._tok
            if tok is not None:
                i = self._in_token(tok, text, i, ev)
                continue
            c = text[i]
            if c in _WS:
                i += 1
                continue
            if not self._stack:
                i = self._begin_value(c, i, (), ev)
                continue
            f = self._stack[-1]
            if f.kind == _OBJ:
                if f.state in (_KEY_OR_CLOSE, _KEY) and c == '"':
                    self._tok = ("key", i, f.path, None)
                    i += 1
                elif f.state in (_KEY_OR_CLOSE, _COMMA_OR_CLOSE) and c == "}":
                    i = self._close(i, ev)
                elif f.state == _COLON and c == ":":
                    f.state = _VALUE
                    i += 1
                elif f.state == _VALUE:
                    i = self._begin_value(c, i, (*f.path, f.key), ev)
                elif f.state == _COMMA_OR_CLOSE and c == ",":
                    f.state = _KEY
                    i += 1
                else:
                    self.error = True
            else:
                if f.state in (_VALUE_OR_CLOSE, _COMMA_OR_CLOSE) and c == "]":
                    i = self._close(i, ev)
                elif f.state in (_VALUE_OR_CLOSE, _VALUE):
                    i = self._begin_value(c, i, (*f.path, f.index), ev)
                elif f.state == _COMMA_OR_CLOSE and c == ",":
                    f.index += 1
                    f.state = _VALUE
                    i += 1
                else:
                    self.error = True
        self.pos = i
        return ev

    def _begin_value(self, c: str, i: int, path: Path, ev: list[ScanEvent]) -> int:
        if c in "{[":
            if len(self._stack) >= MAX_DEPTH:
                self.error = True
                return i
            ev.append(ScanEvent("start", path, i))
            state = _KEY_OR_CLOSE if c == "{" else _VALUE_OR_CLOSE
            self._stack.append(_Frame(c, path, state))
            return i + 1
        if c == '"':
            self._tok = ("str", i, path, None)
        elif c == "-" or c.isdigit():
            self._tok = ("num", i, path, None)
        elif c in _LITERALS:
            self._tok = ("lit", i, path, _LITERALS[c])
        else:
            self.error = True
            return i
        ev.append(ScanEvent("start", path, i))
        return i + 1

    def _in_token(self, tok: tuple[Any, ...], text: str, i: int, ev: list[ScanEvent]) -> int:
        kind, start, path, word = tok
        c = text[i]
        if kind in ("str", "key"):
            if self._hex:
                if c not in _HEX:
                    self.error = True
                    return i
                self._hex -= 1
                return i + 1
            if self._esc:
                self._esc = False
                if c == "u":
                    self._hex = 4
                elif c not in '"\\/bfnrt':
                    self.error = True
                    return i
                return i + 1
            m = _STR_RUN.match(text, i)
            if m:
                return m.end()
            if c == "\\":
                self._esc = True
                return i + 1
            if c != '"':
                self.error = True  # a raw control character
                return i
            self._tok = None
            if kind == "key":
                f = self._stack[-1]
                f.key = json.loads(text[start : i + 1])
                f.state = _COLON
                ev.append(ScanEvent("key", f.path, i + 1, f.key))
            else:
                self._value_end(path, i + 1, ev)
            return i + 1
        if kind == "num":
            if c in _NUM_CHARS:
                return i + 1
            self._tok = None
            if not _NUMBER.fullmatch(text, start, i):
                self.error = True
                return i
            self._value_end(path, i, ev)
            return i  # the delimiter is read again, outside the number
        k = i - start  # a literal: true / false / null
        if c != word[k]:
            self.error = True
            return i
        if k + 1 == len(word):
            self._tok = None
            self._value_end(path, i + 1, ev)
        return i + 1

    def _close(self, i: int, ev: list[ScanEvent]) -> int:
        f = self._stack.pop()
        self._value_end(f.path, i + 1, ev)
        return i + 1

    def _value_end(self, path: Path, pos: int, ev: list[ScanEvent]) -> None:
        ev.append(ScanEvent("end", path, pos))
        if self._stack:
            self._stack[-1].state = _COMMA_OR_CLOSE
        else:
            self.done = True
            self.end = pos


# ----- calls found in a JSON value ---------------------------------------------------------

# Complete string units: a JSON string's text can be decoded up to the end of the last one.
_STRING_UNITS = re.compile(r'(?:[^"\\]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_HIGH_SURROGATE_END = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\Z")


@dataclass
class _Call:
    path: Path
    first_pos: int
    index: int = -1
    id: str = ""
    name: str | None = None
    name_start: int = -1
    args_kind: str = ""  # the first character of the arguments value
    args_start: int = -1
    args_end: int = -1
    sent: int = -1  # arguments text sent so far ends here
    done: bool = False  # the object closed
    end_pos: int = -1  # just past the object
    started: bool = False
    ended: bool = False
    ignored: bool = False
    fragments: list[str] = field(default_factory=list)


class _CallSink:
    """What a JSON region asks of its parser: ids, indexes and whether a name is a tool."""

    def __init__(self, tool_names: Collection[str] | None, max_calls: int | None) -> None:
        self.tool_names = frozenset(tool_names) if tool_names is not None else None
        self.max_calls = max_calls
        self.count = 0

    def known(self, name: str) -> bool:
        return self.tool_names is None or name in self.tool_names

    def take(self) -> int | None:
        """The next call's index, or None when the reply may make no more calls."""
        if self.max_calls is not None and self.count >= self.max_calls:
            return None
        self.count += 1
        return self.count - 1


class _JsonRegion:
    """One JSON value in the reply that holds calls (at paths `call_at` accepts), and for the
    generic format a `response` string streamed as content."""

    def __init__(
        self,
        sink: _CallSink,
        *,
        prefix: str,
        call_at: Callable[[Path], bool],
        root_keys: Collection[str] | None = None,
        response_at: Path | None = None,
        root_call_name: str | None = None,
    ) -> None:
        self.sink = sink
        self.prefix = prefix  # the marker that opened the region (part of the raw text)
        self.text = ""
        self.scanner = JsonScanner()
        self.call_at = call_at
        self.root_keys = frozenset(root_keys) if root_keys is not None else None
        self.response_at = response_at
        self.root_call_name = root_call_name  # the root value is this call's arguments
        self.calls: list[_Call] = []
        self.failed = False
        self.any_started = False
        self._resp_start = -1
        self._resp_end = -1
        self._resp_sent = -1
        self._resp_kind = ""

    @property
    def done(self) -> bool:
        return self.scanner.done and not self.failed

    @property
    def any_ignored(self) -> bool:
        return any(c.ignored for c in self.calls)

    @property
    def responded(self) -> bool:
        """Some `response` text was given as content."""
        return self._resp_sent > self._resp_start

    @property
    def rest(self) -> str:
        """Text after the value's end."""
        return self.text[self.scanner.end :] if self.scanner.done else ""

    def feed(self, text: str) -> list[OutputEvent]:
        self.text += text
        out: list[OutputEvent] = []
        if self.failed:
            return out
        for e in self.scanner.scan(self.text):
            self._on(e)
            if self.failed:
                break
        if self.scanner.error:
            self.failed = True
        self._progress(out)
        return out

    def _call_for(self, path: Path) -> _Call | None:
        for c in reversed(self.calls):
            if path[: len(c.path)] == c.path:
                return c
        return None

    def _on(self, e: ScanEvent) -> None:
        if self.root_call_name is not None:
            self._on_bare_arguments(e)
            return
        if e.kind == "key":
            if e.path == () and self.root_keys is not None and e.key not in self.root_keys:
                self.failed = True
            call = self._call_for(e.path)
            if call is not None and call.path == e.path and e.key not in CALL_KEYS:
                self.failed = True
            return
        if e.kind == "start" and self.call_at(e.path):
            self.calls.append(_Call(e.path, e.pos))
            if self.text[e.pos] != "{":
                self.failed = True
            return
        if self.response_at is not None and e.path == self.response_at:
            if e.kind == "start":
                self._resp_start, self._resp_sent = e.pos, e.pos
                self._resp_kind = self.text[e.pos]
                if self._resp_kind == '"':
                    self._resp_start = self._resp_sent = e.pos + 1
            else:
                self._resp_end = e.pos - (1 if self._resp_kind == '"' else 0)
            return
        call = self._call_for(e.path)
        if call is None or len(e.path) != len(call.path) + 1:
            if call is not None and e.kind == "end" and e.path == call.path:
                call.done = True
                call.end_pos = e.pos
            return
        key = e.path[-1]
        if key == "name":
            if e.kind == "start":
                call.name_start = e.pos
                if self.text[e.pos] != '"':
                    self.failed = True
            else:
                call.name = json.loads(self.text[call.name_start : e.pos])
        elif key in ARGUMENT_KEYS:
            if e.kind == "start":
                if call.args_kind:
                    self.failed = True  # both "arguments" and "parameters"
                call.args_kind = self.text[e.pos]
                call.args_start = call.sent = e.pos
                if call.args_kind not in '{"':
                    self.failed = True
            else:
                call.args_end = e.pos

    def _on_bare_arguments(self, e: ScanEvent) -> None:
        if e.path != () or e.kind == "key":
            return
        if e.kind == "start":
            call = _Call((), e.pos, name=self.root_call_name, args_kind=self.text[e.pos])
            call.args_start = call.sent = e.pos
            self.calls.append(call)
            if call.args_kind != "{":
                self.failed = True
        else:
            self.calls[-1].args_end = self.calls[-1].end_pos = e.pos
            self.calls[-1].done = True

    def _progress(self, out: list[OutputEvent]) -> None:
        # Response text decodable before a break is content either way, streamed or not.
        self._stream_response(out)
        if self.failed:
            return
        for call in self.calls:
            if call.ended or call.ignored:
                continue
            if not call.started:
                if call.name is None:
                    if call.done:
                        self.failed = True  # a call object without a name
                    return
                if not self.sink.known(call.name):
                    self.failed = True
                    return
                index = self.sink.take()
                if index is None:
                    call.ignored = True  # parallel calls were not asked for
                    continue
                call.index, call.id, call.started = index, new_call_id(), True
                self.any_started = True
                out.append(ToolCallStart(call.index, call.id, call.name))
            if call.args_kind == "{":
                upto = call.args_end if call.args_end >= 0 else self.scanner.pos
                if upto > call.sent:
                    self._fragment(call, self.text[call.sent : upto], out)
                    call.sent = upto
            if not call.done:
                return
            if call.args_kind == '"':  # arguments sent as a JSON string holding the object
                try:
                    args = json.loads(json.loads(self.text[call.args_start : call.args_end]))
                except ValueError:
                    args = None
                if not isinstance(args, dict):
                    self._end_incomplete(call, out, call.end_pos)
                    self.failed = True
                    return
                self._fragment(call, json.dumps(args, ensure_ascii=False), out)
            elif not call.args_kind:
                self._fragment(call, "{}", out)
            call.ended = True
            args_text = "".join(call.fragments)
            out.append(ToolCallEnd(call.index, call.id, call.name or "", args_text))

    def _fragment(self, call: _Call, text: str, out: list[OutputEvent]) -> None:
        call.fragments.append(text)
        out.append(ToolCallDelta(call.index, text))

    def _stream_response(self, out: list[OutputEvent]) -> None:
        if self._resp_kind != '"':
            return
        upto = self._resp_end if self._resp_end >= 0 else self.scanner.pos
        if upto <= self._resp_sent:
            return
        segment = self.text[self._resp_sent : upto]
        m = _STRING_UNITS.match(segment)
        whole = m.group(0) if m else ""
        if self._resp_end < 0 and (hs := _HIGH_SURROGATE_END.search(whole)):
            whole = whole[: hs.start()]  # decode a surrogate pair together
        if whole:
            out.append(ContentDelta(json.loads('"' + whole + '"')))
            self._resp_sent += len(whole)

    def _end_incomplete(self, call: _Call, out: list[OutputEvent], cut: int) -> None:
        call.ended = True
        # Its raw text runs from the end of the call before it (or the region's start).
        before = [c.end_pos for c in self.calls if c.end_pos >= 0 and c.first_pos < call.first_pos]
        raw = self.text[max(before) : cut] if before else self.prefix + self.text[:cut]
        out.append(
            ToolCallEnd(call.index, call.id, call.name or "", "".join(call.fragments), False, raw)
        )

    def close(self) -> tuple[list[OutputEvent], str, str]:
        """Wrap up a value that broke or was cut off by the end of the reply.

        Returns the events, the text to give back as content (verbatim) and the text after
        the point where it broke, which the parser reads again as ordinary output.
        """
        cut = self.scanner.pos if self.failed else len(self.text)
        if self.scanner.done:
            cut = self.scanner.end
        rest = self.text[cut:]
        out: list[OutputEvent] = []
        if not self.any_started:
            if self.responded:
                return out, self.text[self._resp_sent : cut], rest
            return out, self.prefix + self.text[:cut], rest
        for call in self.calls:
            if call.started and not call.ended:
                self._end_incomplete(call, out, cut)
                return out, "", rest
        last_end = max(c.end_pos for c in self.calls if c.ended)
        return out, self.text[last_end:cut], rest


# ----- the parsers ----------------------------------------------------------------------

_WAIT = "wait"  # `_open_region`: the text after the marker does not tell yet
_NOT_A_CALL = "no"  # `_open_region`: the marker is followed by something else


class ToolCallParser:
    """Base of the family parsers: content handling shared by all of them."""

    def __init__(self, tool_names: Collection[str] | None = None, *, parallel: bool = True) -> None:
        self._sink = _CallSink(tool_names, None if parallel else 1)
        self._space = ""  # trailing whitespace of content, held until more text comes
        self._after_call = False
        self._buf = ""
        self._region: _JsonRegion | None = None

    @property
    def calls_made(self) -> int:
        """Calls started so far."""
        return self._sink.count

    def feed(self, text: str) -> list[OutputEvent]:
        """Events that `text` completes; a possible marker start is held back."""
        self._buf += text
        out: list[OutputEvent] = []
        self._run(out)
        return out

    def finish(self) -> list[OutputEvent]:
        """The reply ended: close an open call, give back anything held as content."""
        out: list[OutputEvent] = []
        self._run(out)
        if self._region is not None:
            self._close_region(out)
        self._flush(out)
        if self._buf:
            self._content(self._buf, out)
            self._buf = ""
        if self._space and not self._sink.count:
            out.append(ContentDelta(self._space))
        self._space = ""
        return out

    def _run(self, out: list[OutputEvent]) -> None:
        raise NotImplementedError

    def _flush(self, out: list[OutputEvent]) -> None:
        """At the end of the reply: text a format held back while deciding."""

    def _content(self, text: str, out: list[OutputEvent]) -> None:
        # Whitespace around calls is not an answer: trailing whitespace is held until more
        # text comes, dropped when a call follows, and the text just after a call is
        # stripped.
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        if body:
            out.append(ContentDelta(body))

    def _feed_region(self, out: list[OutputEvent]) -> bool | None:
        """Give the buffer to the open region: None while it is open, then whether it
        closed as a well-formed value (True) or broke (False)."""
        region = self._region
        assert region is not None
        chunk, self._buf = self._buf, ""
        events = region.feed(chunk)
        if any(isinstance(e, ToolCallStart) for e in events):
            self._space = ""
        out += events
        if region.failed:
            self._close_region(out)
            return False
        if region.done:
            if not region.any_started and not region.any_ignored and not region.responded:
                # Well-formed JSON without a call in it (`[]`, `{"tool_calls": []}`): text.
                region.failed = True
                self._close_region(out)
                return False
            self._region = None
            self._buf = region.rest
            self._after_call = self._sink.count > 0
            return True
        return None

    def _close_region(self, out: list[OutputEvent]) -> None:
        region = self._region
        assert region is not None
        self._region = None
        events, verbatim, rest = region.close()
        out += events
        if verbatim:
            # Text that looked like a call and was not: given back as it was written.
            saved, self._after_call = self._after_call, False
            self._content(verbatim, out)
            self._after_call = saved and not verbatim.strip()
        self._buf = rest + self._buf
        self._region_failed()

    def _region_failed(self) -> None:
        """What the format does after a value that was no call (see Llama3JsonParser)."""


class _MarkedCallsParser(ToolCallParser):
    """Calls that follow a marker anywhere in the reply (`<tool_call>`, `[TOOL_CALLS]`)."""

    open_marker = ""
    close_marker = ""  # optional, after each call

    def __init__(self, tool_names: Collection[str] | None = None, *, parallel: bool = True) -> None:
        super().__init__(tool_names, parallel=parallel)
        self._after_marker = False
        self._closing = False  # after a call: the optional close marker may come

    def _open_region(self) -> _JsonRegion | str:
        raise NotImplementedError

    def _run(self, out: list[OutputEvent]) -> None:
        while self._buf:
            if self._region is not None:
                ok = self._feed_region(out)
                if ok is None:
                    return
                self._closing = ok and bool(self.close_marker)
                continue
            if self._after_marker:
                region = self._open_region()
                if region == _WAIT:
                    return
                self._after_marker = False
                if isinstance(region, _JsonRegion):
                    self._region = region
                else:
                    self._verbatim(self.open_marker, out)
                continue
            if self._closing:
                head = self._buf.lstrip()
                if head.startswith(self.close_marker):
                    self._buf = head[len(self.close_marker) :]
                    self._closing = False
                    continue
                if not head or self.close_marker.startswith(head):
                    return
                self._closing = False
            i = self._buf.find(self.open_marker)
            if i < 0:
                keep = partial_suffix(self._buf, self.open_marker)
                self._content(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep :]
                return
            self._content(self._buf[:i], out)
            self._buf = self._buf[i + len(self.open_marker) :]
            self._after_marker = True

    def _verbatim(self, text: str, out: list[OutputEvent]) -> None:
        saved, self._after_call = self._after_call, False
        self._content(text, out)
        self._after_call = saved

    def _flush(self, out: list[OutputEvent]) -> None:
        if self._after_marker:
            self._after_marker = False
            self._verbatim(self.open_marker, out)
        if self._closing:
            self._closing = False
            if self.close_marker.startswith(self._buf.lstrip()):
                self._buf = ""  # a cut-off close marker


class HermesParser(_MarkedCallsParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, anywhere."""

    open_marker = "<tool_call>"
    close_marker = "</tool_call>"

    def _open_region(self) -> _JsonRegion | str:
        return _JsonRegion(self._sink, prefix=self.open_marker, call_at=lambda p: p == ())


class MistralParser(_MarkedCallsParser):
    """`[TOOL_CALLS]` then a JSON array of calls, or `name[ARGS]{...}` / `name{...}`."""

    open_marker = "[TOOL_CALLS]"
    _NAMED = re.compile(r"([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\][A-Za-z0-9]*\s*)?(?:\[ARGS\])?\s*\{")
    _NAMED_SO_FAR = re.compile(r"[A-Za-z0-9_.\-]*\s*(?:\[[A-Z_]*\]?[A-Za-z0-9]*\s*)*")

    def _open_region(self) -> _JsonRegion | str:
        head = self._buf.lstrip()
        if not head:
            return _WAIT
        if head[0] == "[" and not head.startswith("[CALL_ID]") and not head.startswith("[ARGS]"):
            self._buf = head
            return _JsonRegion(
                self._sink,
                prefix=self.open_marker,
                call_at=lambda p: len(p) == 1 and isinstance(p[0], int),
            )
        m = self._NAMED.match(head)
        if m is None:
            if len(head) < 256 and self._NAMED_SO_FAR.fullmatch(head):
                return _WAIT
            return _NOT_A_CALL
        before_args = m.end() - 1
        self._buf = head[before_args:]
        return _JsonRegion(
            self._sink,
            prefix=self.open_marker + head[:before_args],
            call_at=lambda p: False,
            root_call_name=m.group(1),
        )


class Llama3JsonParser(ToolCallParser):
    """A reply that is a call object (after `<|python_tag|>` or not); calls joined by `;`."""

    python_tag = "<|python_tag|>"
    _START, _AFTER_TAG, _BETWEEN, _CONTENT = range(4)

    def __init__(self, tool_names: Collection[str] | None = None, *, parallel: bool = True) -> None:
        super().__init__(tool_names, parallel=parallel)
        self._state = self._START
        self._prefix = ""

    def _run(self, out: list[OutputEvent]) -> None:
        while self._buf:
            if self._region is not None:
                ok = self._feed_region(out)
                if ok is None:
                    return
                if ok:
                    self._state = self._BETWEEN
                continue
            if self._state in (self._START, self._AFTER_TAG):
                head = self._buf.lstrip()
                lead = self._buf[: len(self._buf) - len(head)]
                if self._state == self._START and head.startswith(self.python_tag):
                    self._prefix += lead + self.python_tag
                    self._buf = head[len(self.python_tag) :]
                    self._state = self._AFTER_TAG
                    continue
                if not head or (self._state == self._START and self.python_tag.startswith(head)):
                    return
                if head[0] == "{":
                    self._buf = head
                    self._region = _JsonRegion(
                        self._sink, prefix=self._prefix + lead, call_at=lambda p: p == ()
                    )
                    self._prefix = ""
                    continue
                self._state = self._CONTENT
                prefix, self._prefix = self._prefix, ""
                self._content(prefix, out)
            elif self._state == self._BETWEEN:
                head = self._buf.lstrip()
                if not head:
                    return
                if head[0] == ";":
                    self._buf = head[1:]
                    self._state = self._START
                else:
                    self._state = self._CONTENT
            else:
                self._content(self._buf, out)
                self._buf = ""

    def _region_failed(self) -> None:
        self._state = self._CONTENT  # after JSON that was no call, the rest is an answer

    def _flush(self, out: list[OutputEvent]) -> None:
        if self._prefix:
            self._content(self._prefix, out)
            self._prefix = ""


class GenericJsonParser(ToolCallParser):
    """The reply is one JSON object: `tool_calls` (or `tool_call`) or `response`."""

    ROOT_KEYS = ("tool_calls", "tool_call", "response")

    def __init__(self, tool_names: Collection[str] | None = None, *, parallel: bool = True) -> None:
        super().__init__(tool_names, parallel=parallel)
        self._started = False

    @staticmethod
    def _is_call(path: Path) -> bool:
        if path == ("tool_call",):
            return True
        return len(path) == 2 and path[0] == "tool_calls" and isinstance(path[1], int)

    def _run(self, out: list[OutputEvent]) -> None:
        while self._buf:
            if self._region is not None:
                if self._feed_region(out) is None:
                    return
                continue
            if not self._started:
                head = self._buf.lstrip()
                if not head:
                    return
                self._started = True
                if head[0] == "{":
                    self._buf = head
                    self._region = _JsonRegion(
                        self._sink,
                        prefix="",
                        call_at=self._is_call,
                        root_keys=self.ROOT_KEYS,
                        response_at=("response",),
                    )
                    continue
            self._content(self._buf, out)
            self._buf = ""


PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "llama3": Llama3JsonParser,
    "mistral": MistralParser,
    "generic": GenericJsonParser,
}


def tool_call_parser(
    fmt: str, tool_names: Collection[str] | None = None, *, parallel: bool = True
) -> ToolCallParser:
    """A new streaming parser for one reply in format `fmt` (a key of `PARSERS`)."""
    return PARSERS[fmt](tool_names, parallel=parallel)
