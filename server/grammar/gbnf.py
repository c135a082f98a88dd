"""A GBNF grammar checked before llama.cpp parses it: llama.cpp's parser and sampler recurse
in C, so a grammar nested or chained deep enough (a client's `grammar` field, or a schema
turned into one) would overflow the decode thread's stack and end the process.

The syntax is llama.cpp's (`src/llama-grammar.cpp`); the checks are its own limits
(`MAX_REPETITION_THRESHOLD`) plus bounds on what its recursion can reach.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from server.errors import InvalidRequest

MAX_REPEAT = 2000  # llama.cpp refuses a larger minimum and makes a larger maximum unbounded
MAX_BYTES = 4_000_000
MAX_NESTING = 64  # parentheses inside one rule: llama.cpp's parser recurses on each
MAX_CHAIN = 4000  # rules the sampler enters, one inside the other, before it reads a char
MAX_EXPANDED = 400_000  # rule elements after llama.cpp writes out the repetitions
# Calls llama.cpp's left-recursion check makes from one rule (it walks shared rules again).
MAX_PATHS = 200_000


@dataclass
class Atom:
    kind: str  # lit | cls | any | tok | ref | group
    name: str = ""  # ref: the rule
    alts: list[list[Element]] = field(default_factory=list)  # group
    empty: bool = False  # lit: ""
    size: int = 1  # elements llama.cpp stores for it


@dataclass
class Element:
    atom: Atom
    lo: int = 1
    hi: int | None = 1  # None: no upper bound


class GrammarError(InvalidRequest):
    """A grammar lmx will not hand to llama.cpp."""


class _Parser:
    def __init__(self, text: str, param: str) -> None:
        self.s, self.i, self.param = text, 0, param
        self.rules: dict[str, list[list[Element]]] = {}
        self.expanded = 0
        self.synth = 0  # rules llama.cpp synthesizes (groups, repetitions)

    def fail(self, why: str) -> GrammarError:
        line = self.s.count("\n", 0, self.i) + 1
        return GrammarError(
            f"{_the(self.param)} is invalid: {why} (line {line}).", param=self.param
        )

    def space(self, newlines: bool) -> None:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == "#":
                while self.i < len(s) and s[self.i] not in "\r\n":
                    self.i += 1
            elif c in " \t" or (newlines and c in "\r\n"):
                self.i += 1
            else:
                break

    def name(self) -> str:
        j = self.i
        while self.i < len(self.s) and (
            self.s[self.i].isascii() and (self.s[self.i].isalnum() or self.s[self.i] == "-")
        ):
            self.i += 1
        if j == self.i:
            raise self.fail("expecting a name")
        return self.s[j : self.i]

    def char(self) -> None:
        s = self.s
        if s[self.i] == "\\":
            if self.i + 1 >= len(s):
                raise self.fail("unexpected end of input")
            e = s[self.i + 1]
            digits = {"x": 2, "u": 4, "U": 8}.get(e)
            if digits is not None:
                j = self.i + 2
                while j < len(s) and j < self.i + 2 + digits and s[j] in "0123456789abcdefABCDEF":
                    j += 1
                if j != self.i + 2 + digits:
                    raise self.fail(f"expecting {digits} hex digits after \\{e}")
                self.i = j
            elif e in 'trn\\"[]-':
                self.i += 2
            else:
                raise self.fail(f"unknown escape \\{e}")
        else:
            self.i += 1

    def parse(self) -> None:
        if len(self.s) > MAX_BYTES:
            raise GrammarError(
                f"{_the(self.param)} is larger than lmx accepts ({MAX_BYTES // 1_000_000} MB).",
                param=self.param,
            )
        self.space(True)
        while self.i < len(self.s):
            name = self.name()
            self.space(False)
            if not self.s.startswith("::=", self.i):
                raise self.fail(f"expecting ::= after {name[:60]}")
            self.i += 3
            self.space(True)
            alts = self.alternates(0)
            if self.i < len(self.s) and self.s[self.i] not in "\r\n":
                raise self.fail("expecting newline or end")
            self.rules[name] = alts  # a rule given twice: llama.cpp keeps the last
            self.space(True)

    def alternates(self, depth: int) -> list[list[Element]]:
        if depth > MAX_NESTING:
            raise self.fail(f"parentheses nested deeper than {MAX_NESTING}")
        alts = [self.sequence(depth)]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            self.space(True)
            alts.append(self.sequence(depth))
        return alts

    def sequence(self, depth: int) -> list[Element]:
        s, seq = self.s, []
        nested = depth > 0
        while self.i < len(s):
            c = s[self.i]
            if c == '"':
                self.i += 1
                n = 0
                while self.i < len(s) and s[self.i] != '"':
                    self.char()
                    n += 1
                if self.i >= len(s):
                    raise self.fail("unexpected end of input in a string")
                self.i += 1
                seq.append(Element(Atom("lit", empty=n == 0, size=max(n, 1))))
            elif c == "[":
                self.i += 1
                if self.i < len(s) and s[self.i] == "^":
                    self.i += 1
                n = 0
                while self.i < len(s) and s[self.i] != "]":
                    self.char()
                    n += 1
                    if self.i + 1 < len(s) and s[self.i] == "-" and s[self.i + 1] != "]":
                        self.i += 1
                        self.char()
                if self.i >= len(s):
                    raise self.fail("unexpected end of input in a class")
                self.i += 1
                seq.append(Element(Atom("cls", size=max(n, 1))))
            elif c in "<!":
                j = s.find(">", self.i)
                if j < 0:
                    raise self.fail("unterminated token")
                self.i = j + 1
                seq.append(Element(Atom("tok")))
            elif c.isascii() and (c.isalnum() or c == "-"):
                seq.append(Element(Atom("ref", name=self.name())))
            elif c == "(":
                self.i += 1
                self.space(True)
                before = self.synth
                alts = self.alternates(depth + 1)
                if self.i >= len(s) or s[self.i] != ")":
                    raise self.fail("expecting )")
                self.i += 1
                self.synth += 1
                seq.append(Element(Atom("group", alts=alts, size=max(1, self.synth - before))))
            elif c == ".":
                self.i += 1
                seq.append(Element(Atom("any")))
            elif c in "*+?{":
                if not seq:
                    raise self.fail(f"expecting an item before {c}")
                self.repetition(seq[-1], c)
            else:
                break
            self.space(nested)
        return seq

    def repetition(self, el: Element, c: str) -> None:
        self.i += 1
        if el.lo != 1 or el.hi != 1:  # `x**`: llama.cpp repeats the rules it generated
            inner = Element(el.atom, el.lo, el.hi)
            made = el.hi if el.hi is not None and el.hi > 0 else max(el.lo, 1)
            el.atom = Atom("group", alts=[[inner]], size=made + 1)
            el.lo = el.hi = 1
        if c == "*":
            lo, hi = 0, None
        elif c == "+":
            lo, hi = 1, None
        elif c == "?":
            lo, hi = 0, 1
        else:
            self.space(True)
            lo = self.int()
            hi = lo
            self.space(True)
            if self.i < len(self.s) and self.s[self.i] == ",":
                self.i += 1
                self.space(True)
                hi = self.int() if self.i < len(self.s) and self.s[self.i].isdigit() else None
                self.space(True)
            if self.i >= len(self.s) or self.s[self.i] != "}":
                raise self.fail("expecting }")
            self.i += 1
            if lo > MAX_REPEAT:
                raise self.fail(f"a repetition of at least {lo} (llama.cpp allows {MAX_REPEAT})")
            if hi is not None and hi > MAX_REPEAT:
                hi = None
            if hi is not None and hi < lo:
                raise self.fail(f"a repetition {{{lo},{hi}}}")
        total = hi if hi is not None and hi > 0 else max(lo, 1)
        if el.atom.size * total > MAX_REPEAT and el.atom.kind == "group":
            raise self.fail("a group with too many rules repeated too many times")
        self.expanded += el.atom.size * (total + 1)
        self.synth += total
        if self.expanded > MAX_EXPANDED:
            raise self.fail("repetitions that expand past what lmx accepts")
        el.lo, el.hi = lo, hi

    def int(self) -> int:
        j = self.i
        while self.i < len(self.s) and self.s[self.i].isdigit():
            self.i += 1
        if j == self.i:
            raise self.fail("expecting an integer")
        if self.i - j > 9:
            raise self.fail("a repetition count that large")
        return int(self.s[j : self.i])


def check_grammar(text: str, *, param: str = "grammar") -> None:
    """Raise a GrammarError (a 400 naming `param`) for a grammar llama.cpp would refuse, or
    one it would recurse through too deeply; return for one it can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GrammarError(
            f"{_the(param)} holds a character UTF-8 cannot encode (a lone surrogate).",
            param=param,
        ) from e
    p = _Parser(text, param)
    p.parse()
    rules = p.rules
    if "root" not in rules:
        raise GrammarError(f"{_the(param)} has no root rule.", param=param)
    for name, alts in rules.items():
        for ref in _refs(alts):
            if ref not in rules:
                raise GrammarError(
                    f"{_the(param)} refers to an undefined rule '{ref[:60]}' (in '{name[:60]}').",
                    param=param,
                )
    nullable = _nullable(rules)
    _chains(rules, nullable, param)


def _the(param: str) -> str:
    """What the messages call the grammar: the client's own, or the one made from a field
    (Anthropic's errors have no `param`: the message names it)."""
    return "The grammar" if param == "grammar" else f"The grammar made from {param}"


def _refs(alts: list[list[Element]]) -> list[str]:
    out, todo = [], [alts]
    while todo:
        for seq in todo.pop():
            for el in seq:
                if el.atom.kind == "ref":
                    out.append(el.atom.name)
                elif el.atom.kind == "group":
                    todo.append(el.atom.alts)
    return out


def _nullable(rules: dict[str, list[list[Element]]]) -> set[str]:
    """Rules that can match the empty string: a worklist, so that a rule is looked at again
    only when a rule it refers to turned out nullable."""
    out: set[str] = set()

    def el_null(el: Element) -> bool:
        if el.lo == 0:
            return True
        a = el.atom
        if a.kind == "ref":
            return a.name in out
        if a.kind == "group":
            return any(all(el_null(e) for e in seq) for seq in a.alts)
        return a.kind == "lit" and a.empty

    users: dict[str, set[str]] = {n: set() for n in rules}
    for name, alts in rules.items():
        for ref in _refs(alts):
            users[ref].add(name)
    todo = list(rules)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        if any(all(el_null(e) for e in seq) for seq in rules[name]):
            out.add(name)
            todo += [u for u in users[name] if u not in out]
    return out


def _chains(rules: dict[str, list[list[Element]]], nullable: set[str], param: str) -> None:
    """How deep llama.cpp's sampler recurses through rules before it reads a character, for
    each rule: left recursion (endless) and chains past MAX_CHAIN are refused."""

    def atom_null(a: Atom) -> bool:
        if a.kind == "ref":
            return a.name in nullable
        if a.kind == "group":
            return any(all(el_null(e) for e in seq) for seq in a.alts)
        return a.kind == "lit" and a.empty

    def el_null(el: Element) -> bool:
        return el.lo == 0 or atom_null(el.atom)

    def leading(alts: list[list[Element]]) -> list[Element]:
        """Elements that can come first in a match (through nullable ones before them)."""
        out = []
        for seq in alts:
            for el in seq:
                out.append(el)
                if not el_null(el):
                    break
        return out

    # The rules a rule's first character can come from: edges of the "left" graph.
    deps: dict[str, set[str]] = {}
    for name, alts in rules.items():
        d: set[str] = set()
        todo = leading(alts)
        while todo:
            el = todo.pop()
            if el.atom.kind == "ref":
                d.add(el.atom.name)
            elif el.atom.kind == "group":
                todo += leading(el.atom.alts)
            if el.hi is None and atom_null(el.atom):
                raise GrammarError(
                    f"{_the(param)} repeats something that can be empty without bound (in "
                    f"'{name[:60]}'): llama.cpp would loop on it.",
                    param=param,
                )
        deps[name] = d
    # Kahn's order: what remains is a cycle, i.e. left recursion.
    users: dict[str, list[str]] = {n: [] for n in rules}
    pending = {n: len(d) for n, d in deps.items()}
    for n, d in deps.items():
        for m in d:
            users[m].append(n)
    ready = [n for n, k in pending.items() if k == 0]
    order = []
    while ready:
        n = ready.pop()
        order.append(n)
        for u in users[n]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(order) < len(rules):
        loop = sorted(n for n, k in pending.items() if k > 0)[0]
        raise GrammarError(
            f"{_the(param)} is left-recursive (rule '{loop[:60]}' can begin with itself).",
            param=param,
        )
    depth: dict[str, int] = {}
    paths: dict[str, int] = {}

    def seq_cost(
        seq: list[Element], known: dict[str, int], alts: Callable[[Iterable[int]], int]
    ) -> int:
        """What a sequence's leading elements cost, summed through the ones that may be
        empty: `alts` is how a group's alternatives combine (max: the depth llama.cpp's
        recursion reaches; sum: the calls its left-recursion check makes, since it walks a
        rule again each way it is reached)."""
        total = 0
        for el in seq:
            a = el.atom
            base = (
                known[a.name]
                if a.kind == "ref"
                else 1 + alts(seq_cost(s, known, alts) for s in a.alts)
                if a.kind == "group"
                else 0
            )
            if el.lo != 1 or el.hi != 1:
                copies = el.hi if el.hi is not None else 1
                base = copies * (base + 1) if atom_null(a) else base + 1
            total += base
            if not el_null(el):
                break
        return min(total, MAX_PATHS + MAX_CHAIN + 1)

    for n in order:
        depth[n] = 1 + max(seq_cost(seq, depth, max) for seq in rules[n])
        paths[n] = min(1 + sum(seq_cost(seq, paths, sum) for seq in rules[n]), MAX_PATHS + 1)
        if paths[n] > MAX_PATHS:
            raise GrammarError(
                f"{_the(param)} branches too much at its start for llama.cpp to check it "
                f"(rule '{n[:60]}' is reached more than {MAX_PATHS} ways).",
                param=param,
            )
        if depth[n] > MAX_CHAIN:
            raise GrammarError(
                f"{_the(param)} nests rules deeper than lmx accepts ({MAX_CHAIN}) at '{n[:60]}'.",
                param=param,
            )
