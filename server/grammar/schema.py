"""JSON Schema to GBNF with a cost that does not grow with a bound's value.

Written after llama.cpp's own `common/json-schema-to-grammar.cpp`: repetition is `item{m,n}`
(llama.cpp's parser expands it into at most n small rules), never n nested copies (the Python
copy in llama-cpp-python nests them, and `maxLength: 524288` overflows the C stack in
llama.cpp's parser). Whatever has no affordable exact form (a bound past llama.cpp's
repetition limit, an integer range, a pattern with lookarounds, keywords no grammar can hold)
is left to a check of the finished reply against the schema: `Conversion.relaxed` names it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from server.errors import InvalidRequest

# llama.cpp's grammar parser refuses a repetition whose minimum is over 2000 and treats a
# larger maximum as unbounded (`MAX_REPETITION_THRESHOLD` in llama-grammar.cpp).
MAX_REPEAT = 2000
# Rules llama.cpp's parser makes from repetitions, summed over the grammar: each is a few
# bytes, and the sampler walks only the active ones, but a client must not be able to
# allocate millions of them.
MAX_EXPANDED = 200_000
MAX_DEPTH = 64  # schemas nested in schemas (and $ref followed)
MAX_RULES = 20_000
MAX_BYTES = 2_000_000  # of GBNF text
MAX_ENUM = 4096  # values of one enum written out
MAX_ENUM_BYTES = 256_000  # the literals of one enum
MAX_OPTIONAL = 64  # optional properties of one object kept in their order
MAX_PATTERN = 4096  # characters of one pattern
MAX_INT_SPAN = 256  # integer ranges written out value by value

# One optional space between tokens, as llama-cpp-python's converter has it: a small model
# given newlines and indentation spends its tokens on them.
SPACE = '" "?'
PRIMITIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolean": ('("true" | "false") space', ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "number": (
        '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
        ("integral-part", "decimal-part"),
    ),
    "nonneg-number": (
        'integral-part ("." decimal-part)? ([eE] [-+]? integral-part)? space',
        ("integral-part", "decimal-part"),
    ),
    "integer": ('("-"? integral-part) space', ("integral-part",)),
    "nonneg-integer": ("integral-part space", ("integral-part",)),
    "positive-integer": ("[1-9] [0-9]{0,15} space", ()),
    "value": (
        "object | array | string | number | boolean | null",
        ("object", "array", "string", "number", "boolean", "null"),
    ),
    "object": (
        '"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
        ("string", "value"),
    ),
    "array": ('"[" space ( value ("," space value)* )? "]" space', ("value",)),
    "uuid": (
        '"\\"" ' + ' "-" '.join(f"[0-9a-fA-F]{{{n}}}" for n in (8, 4, 4, 4, 12)) + ' "\\"" space',
        (),
    ),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": ('"\\"" char* "\\"" space', ("char",)),
    "null": ('"null" space', ()),
    "date": (
        '[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
        (),
    ),
    "time": (
        '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
        '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
        (),
    ),
    "date-time": ('date "T" time', ("date", "time")),
    "date-string": ('"\\"" date "\\"" space', ("date",)),
    "time-string": ('"\\"" time "\\"" space', ("time",)),
    "date-time-string": ('"\\"" date-time "\\"" space', ("date-time",)),
}
RESERVED = frozenset({"root", "space", *PRIMITIVES})

# Keywords that describe a value without constraining it: a schema of only these (or `{}`)
# accepts any JSON value, as llama.cpp's C++ converter has it. Clients send
# `{"description": ...}` for "any value" properties (Claude Code's tools do).
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
        "$anchor",
        "markdownDescription",
        "format",  # an annotation unless it is one of the formats written out below
        "contentEncoding",
        "contentMediaType",
        "strict",
    }
)
# Validation keywords no grammar here holds: a schema with one is checked on the finished
# reply (keywords JSON Schema does not define are ignored, as validators ignore them).
UNENFORCED = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "multipleOf",
        "minProperties",
        "maxProperties",
        "patternProperties",
        "propertyNames",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedProperties",
        "unevaluatedItems",
        "additionalItems",
    }
)
MAX_WORK = 100_000  # enum values and pattern characters, over the whole grammar
MAX_VISITS = 50_000  # schemas visited for one grammar (type lists and anyOf copy their parent)
# Keywords this converter writes into the grammar.
HANDLED = ANNOTATIONS | {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
}
_NAME_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
_LITERAL_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}


def literal(text: str) -> str:
    """A GBNF string literal for `text`."""
    return '"' + "".join(_LITERAL_ESCAPES.get(c, c) for c in text) + '"'


def accepts_anything(schema: Any) -> bool:
    return schema is True or (isinstance(schema, dict) and not (schema.keys() - ANNOTATIONS))


@dataclass
class Conversion:
    """Rules built so far, what they cost, and what the reply must be checked for instead."""

    param: str
    rules: dict[str, str] = field(default_factory=lambda: {"space": SPACE})
    relaxed: list[str] = field(default_factory=list)
    expanded: int = 0
    visits: int = 0
    size: int = len(SPACE)
    relax_count: int = 0  # every relaxation (`relaxed` keeps the first few, for messages)
    work: int = 0  # enum values and pattern characters processed
    ref_names: dict[tuple[str, str], str] = field(default_factory=dict)
    _next: dict[str, int] = field(default_factory=dict)
    _keys: dict[tuple[str, str], str] = field(default_factory=dict)

    # -- rules ----------------------------------------------------------------------------
    def add(self, name: str, body: str) -> str:
        """Add a rule (a new name if `name` is taken by a different body); returns its name."""
        wanted = _NAME_CHARS.sub("-", name) or "r"
        known = self._keys.get((wanted, body))
        if known is not None:
            return known
        base = self.unique_name(name)
        self.size += len(base) + len(body) + 6
        if len(self.rules) >= MAX_RULES or self.size > MAX_BYTES:
            raise InvalidRequest(
                f"The schema needs a grammar larger than lmx builds ({MAX_RULES} rules, "
                f"{MAX_BYTES // 1000} kB); simplify it.",
                param=self.param,
            )
        self.rules[base] = body
        self._keys[(wanted, body)] = base
        return base

    def unique_name(self, name: str) -> str:
        """`name` as a rule name not taken yet (a counter per name: no search from 0)."""
        base = _NAME_CHARS.sub("-", name) or "r"
        if base not in self.rules:
            return base
        while True:
            i = self._next.get(base, 0)
            self._next[base] = i + 1
            if f"{base}{i}" not in self.rules:
                return f"{base}{i}"

    def spend(self, units: int) -> None:
        self.work += units
        if self.work > MAX_WORK:
            raise InvalidRequest(
                "The schema is too complex for a grammar (its enums and patterns, repeated "
                "where anyOf or a type list copies them).",
                param=self.param,
            )

    def primitive(self, name: str) -> str:
        body, deps = PRIMITIVES[name]
        self.rules[name] = body
        for d in deps:
            if d not in self.rules:
                self.primitive(d)
        return name

    def relax(self, path: str, what: str) -> None:
        self.relax_count += 1
        if len(self.relaxed) < 20:
            self.relaxed.append(f"{what} at {path}")

    def repeat(
        self, item: str, lo: int, hi: int | None, path: str, kw: tuple[str, str], shown: int = 0
    ) -> str:
        """`item` lo..hi times (hi None: no upper bound), as `{m,n}`; a bound that is not
        affordable is widened and noted (`shown`: what the schema's bounds add to these)."""
        if lo > MAX_REPEAT:
            self.relax(path, f"{kw[0]} {lo + shown}")
            lo = MAX_REPEAT
        if hi is not None and hi > MAX_REPEAT:
            self.relax(path, f"{kw[1]} {hi + shown}")
            hi = None
        cost = hi if hi is not None else max(lo, 1)
        if self.expanded + cost > MAX_EXPANDED:
            if hi is not None:
                self.relax(path, f"{kw[1]} {hi + shown}")
                hi = None
            if self.expanded + lo > MAX_EXPANDED:
                self.relax(path, f"{kw[0]} {lo + shown}")
                lo = 0
            cost = max(lo, 1)
        self.expanded += cost
        if hi is None:
            return f"{item}*" if lo == 0 else f"{item}+" if lo == 1 else f"{item}{{{lo},}}"
        if lo == hi:
            return "" if lo == 0 else item if lo == 1 else f"{item}{{{lo}}}"
        return f"{item}?" if (lo, hi) == (0, 1) else f"{item}{{{lo},{hi}}}"

    def grammar(self) -> str:
        return "\n".join(f"{k} ::= {v}" for k, v in sorted(self.rules.items()))


class SchemaConverter:
    """Converts one document's schemas (with its `$ref`s) into rules of a `Conversion`."""

    def __init__(self, conv: Conversion, document: Any, prefix: str = "") -> None:
        self.conv = conv
        self.document = document
        self.prefix = prefix

    def rule(self, name: str) -> str:
        name = name or "root"
        return name + "-" if name in RESERVED and name != "root" else name

    def visit(self, schema: Any, name: str, path: str = "$", depth: int = 0) -> str:
        """The name of a rule for JSON matching `schema`."""
        c = self.conv
        if depth > MAX_DEPTH:
            raise InvalidRequest(
                f"The schema nests deeper than {MAX_DEPTH} levels at {path[:200]}.",
                param=c.param,
            )
        if schema is False:
            raise InvalidRequest(f"The schema at {path[:200]} accepts no value.", param=c.param)
        if accepts_anything(schema):
            return c.add(self.rule(name), c.primitive("value"))
        if not isinstance(schema, dict):
            raise InvalidRequest(f"The schema at {path[:200]} is not an object.", param=c.param)
        c.visits += 1
        if c.visits > MAX_VISITS:
            raise InvalidRequest(
                f"The schema is too complex for a grammar (over {MAX_VISITS} subschemas).",
                param=c.param,
            )
        for key in schema.keys() & UNENFORCED:
            c.relax(path, key)
        rule = self.rule(name)
        if (ref := schema.get("$ref")) is not None:
            if _constrains({k: v for k, v in schema.items() if k not in _REF_SIBLINGS}):
                c.relax(path, "keywords beside $ref")
            return c.add(rule, self._ref(ref, path, depth))
        if "oneOf" in schema or "anyOf" in schema:
            if "oneOf" in schema:
                c.relax(path, "oneOf (one alternative only)")
            if "oneOf" in schema and "anyOf" in schema:
                c.relax(path, "anyOf beside oneOf")
            alts = schema.get("oneOf") or schema.get("anyOf")
            if not isinstance(alts, list) or not alts:
                raise InvalidRequest(f"anyOf/oneOf at {path[:200]} is empty.", param=c.param)
            rest = {k: v for k, v in schema.items() if k not in ("oneOf", "anyOf")}
            names = [
                self.visit(
                    _merge(rest, a, c, path) if isinstance(a, dict) and _constrains(rest) else a,
                    f"{name}-{i}",
                    f"{path}.anyOf[{i}]",
                    depth + 1,
                )
                for i, a in enumerate(alts)
            ]
            return c.add(rule, " | ".join(names))
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise InvalidRequest(f"type at {path[:200]} is an empty list.", param=c.param)
            names = [
                self.visit({**schema, "type": t}, f"{name}-{t}", path, depth + 1) for t in kind
            ]
            return c.add(rule, " | ".join(names))
        if "const" in schema:
            return c.add(rule, literal(_dumps(schema["const"])))
        if "enum" in schema:
            return self._enum(schema, rule, path, depth)
        if "allOf" in schema:
            return self.visit(self._merge_all_of(schema, path), name, path, depth + 1)
        if kind in (None, "object") and (
            "properties" in schema
            or schema.get("additionalProperties", True) is not True
            or (kind == "object" and schema.get("required"))
        ):
            return c.add(rule, self._object(schema, name, path, depth))
        if kind in (None, "array") and ("items" in schema or "prefixItems" in schema):
            return c.add(rule, self._array(schema, name, path, depth))
        if kind == "array" and ("minItems" in schema or "maxItems" in schema):
            return c.add(rule, self._array({**schema, "items": {}}, name, path, depth))
        if kind in (None, "string") and "pattern" in schema:
            if "minLength" in schema or "maxLength" in schema:
                c.relax(path, "minLength/maxLength beside pattern")
            body = pattern_rule(c, schema["pattern"], rule, path)
            if body is not None:
                return c.add(rule, body)
            return self.visit(
                {k: v for k, v in schema.items() if k != "pattern"}, name, path, depth
            )
        fmt = schema.get("format")
        if kind in (None, "string") and isinstance(fmt, str):
            if re.fullmatch(r"uuid[1-5]?", fmt):
                return c.add(rule, c.primitive("uuid"))
            if f"{fmt}-string" in PRIMITIVES:
                return c.add(rule, c.primitive(f"{fmt}-string"))
        if kind == "string" and ("minLength" in schema or "maxLength" in schema):
            lo, hi = _count(schema, "minLength", 0, c), _count(schema, "maxLength", None, c)
            chars = c.repeat(c.primitive("char"), lo, hi, path, ("minLength", "maxLength"))
            return c.add(rule, f'"\\"" {chars} "\\"" space')
        if kind in ("integer", "number") and any(
            k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
        ):
            return c.add(rule, self._range(schema, kind, rule, path))
        if kind is None:
            # Keywords with no type (`{"maximum": 10}`) constrain only values of their kind:
            # any value, checked on the reply.
            if _constrains(schema):
                c.relax(path, "keywords without a type")
            return c.add(rule, c.primitive("value"))
        if kind == "object":
            return c.add(rule, c.primitive("object"))
        if not isinstance(kind, str) or kind not in (
            "string",
            "number",
            "integer",
            "boolean",
            "null",
            "array",
        ):
            raise InvalidRequest(
                f"Unknown type {json.dumps(kind)[:80]} at {path[:200]}.", param=c.param
            )
        return c.add(rule, c.primitive(kind))

    # -- parts ----------------------------------------------------------------------------
    def _ref(self, ref: Any, path: str, depth: int) -> str:
        c = self.conv
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise InvalidRequest(
                f"Only local $ref ('#/...') is supported, not {str(ref)[:100]!r}.",
                param=c.param,
            )
        known = c.ref_names.get((self.prefix, ref))
        if known is not None:
            return known  # (also a recursive $ref: named before it is visited)
        name = c.unique_name(self.rule(f"{self.prefix}ref{ref[1:]}"))
        target: Any = self.document
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise InvalidRequest(f"$ref {ref[:100]!r} points at nothing.", param=c.param)
        # The rule is named before it is visited, so that a recursive $ref refers to it.
        c.ref_names[(self.prefix, ref)] = name
        c.rules[name] = "space"  # placeholder, replaced below
        c.rules[name] = self.visit(target, f"{name}-def", f"{path}.$ref", depth + 1)
        return name

    def _enum(self, schema: dict[str, Any], rule: str, path: str, depth: int) -> str:
        c = self.conv
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise InvalidRequest(f"enum at {path[:200]} is empty.", param=c.param)
        c.spend(len(values))
        lits = [] if len(values) > MAX_ENUM else [literal(_dumps(v)) for v in values]
        if not lits or sum(len(x) for x in lits) > MAX_ENUM_BYTES:
            c.relax(path, f"enum of {len(values)} values")
            rest = {k: v for k, v in schema.items() if k != "enum"}
            if "type" not in rest:
                types = sorted({_json_type(v) for v in values})
                rest["type"] = types if len(types) > 1 else types[0]
            return self.visit(rest, rule, path, depth + 1)
        return c.add(rule, " | ".join(dict.fromkeys(lits)))

    def _merge_all_of(self, schema: dict[str, Any], path: str) -> dict[str, Any]:
        """allOf as one schema: properties and required united, other keywords from the
        last part that has them (what does not merge exactly is checked on the reply)."""
        parts = schema["allOf"]
        if not isinstance(parts, list):
            raise InvalidRequest(f"allOf at {path[:200]} is not a list.", param=self.conv.param)
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        props: dict[str, Any] = dict(merged.get("properties") or {})
        required: list[Any] = list(merged.get("required") or [])
        for part in parts:
            if isinstance(part, dict) and "$ref" in part:
                target = self._deref(part["$ref"])
                rest = {k: v for k, v in part.items() if k != "$ref"}
                part = _merge(target, rest, self.conv, path) if isinstance(target, dict) else rest
            if not isinstance(part, dict):
                continue
            for k, v in part.items():
                if k == "properties" and isinstance(v, dict):
                    for key, sub in v.items():
                        if key in props and props[key] != sub:
                            self.conv.relax(path, f"allOf property {key}")
                        props[key] = sub
                elif k == "required" and isinstance(v, list):
                    required += v
                elif k in merged and merged[k] != v:
                    self.conv.relax(path, f"allOf {k}")
                else:
                    merged[k] = v
        if props:
            merged["properties"] = props
            merged.setdefault("additionalProperties", False)
        if required:
            merged["required"] = list(dict.fromkeys(r for r in required if isinstance(r, str)))
        return merged

    def _deref(self, ref: Any) -> Any:
        target: Any = self.document
        if not isinstance(ref, str) or not ref.startswith("#"):
            return {}
        for part in ref[1:].split("/")[1:]:
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return target

    def _object(self, schema: dict[str, Any], name: str, path: str, depth: int) -> str:
        c = self.conv
        props = schema.get("properties") or {}
        if not isinstance(props, dict):
            raise InvalidRequest(f"properties at {path[:200]} is not an object.", param=c.param)
        required = schema.get("required") or []
        required = set(required) if isinstance(required, list) else set()
        sep = f"{name}-" if name else ""
        # Required keys the properties do not describe take any value.
        props = {**props, **{k: {} for k in required if isinstance(k, str) and k not in props}}
        kvs: dict[str, str] = {}
        for key, sub in props.items():
            pname = f"{sep}{key}"
            if pname in ("", "root"):  # a property called "root" (or "") is not the root
                pname = f"{sep}{key}-prop"
            value = self.visit(sub, pname, f"{path}.{key}", depth + 1)
            kvs[key] = c.add(f"{sep}{key}-kv", f'{literal(_dumps(key))} space ":" space {value}')
        req = [k for k in props if k in required]
        opt = [k for k in props if k not in required]
        extra = schema.get("additionalProperties", False)
        if extra is not False and extra is not None:
            if props:
                c.relax(path, "additional keys that may repeat declared ones")
            value = self.visit(
                {} if extra is True else extra,
                f"{sep}additional-value",
                f"{path}.additionalProperties",
                depth + 1,
            )
            kvs["*"] = c.add(f"{sep}additional-kv", f'{c.primitive("string")} ":" space {value}')
            opt.append("*")
        body = '"{" space ' + ' "," space '.join(kvs[k] for k in req)
        if len(opt) > MAX_OPTIONAL:
            # Past this, the chain below nests as deep as there are keys in llama.cpp's
            # sampler: any of them, in any order, and the reply is checked instead.
            c.relax(path, f"the order and uniqueness of {len(opt)} optional properties")
            anyk = c.add(f"{sep}optional-kv", " | ".join(kvs[k] for k in opt))
            more = c.add(f"{sep}optional-next", f'"," space {anyk}')
            if req:
                return body + f" {more}* " + '"}" space'
            return body + f" ( {anyk} {more}* )? " + '"}" space'
        if opt:
            # Optional keys in their order, each present or not: a chain of rules, one per key
            # (k-rest: "what may follow k"), so that n keys cost n rules.
            tail = ""
            for i in range(len(opt) - 1, -1, -1):
                k = opt[i]
                if k == "*":
                    first = c.add(f"{sep}additional-kvs", f'{kvs[k]} ( "," space {kvs[k]} )*')
                else:
                    first = kvs[k]
                opt[i] = first + tail
                if i > 0:
                    rest = c.add(f"{sep}{k}-rest", f'( "," space {first} )?{tail}')
                    tail = f" {rest}"
            starts = " | ".join(opt)
            body += f' ( "," space ( {starts} ) )?' if req else f" ( {starts} )?"
        return body + ' "}" space'

    def _array(self, schema: dict[str, Any], name: str, path: str, depth: int) -> str:
        c = self.conv
        sep = f"{name}-" if name else ""
        tuple_items = schema.get("prefixItems")
        items = schema.get("items")
        if tuple_items is None and isinstance(items, list):
            tuple_items, items = items, None
        if isinstance(tuple_items, list):
            names = [
                self.visit(s, f"{sep}tuple-{i}", f"{path}[{i}]", depth + 1)
                for i, s in enumerate(tuple_items)
            ]
            return '"[" space ' + ' "," space '.join(names) + ' "]" space'
        item = self.visit(items if items is not None else {}, f"{sep}item", f"{path}[]", depth + 1)
        lo = _count(schema, "minItems", 0, c)
        hi = _count(schema, "maxItems", None, c)
        if hi == 0:
            return '"[" space "]" space'
        more = c.add(f"{sep}item-next", f'"," space {item}')
        tail = c.repeat(
            more,
            max(lo - 1, 0),
            None if hi is None else hi - 1,
            path,
            ("minItems", "maxItems"),
            shown=1,
        )
        seq = f"{item} {tail}".strip()
        return f'"[" space {seq if lo > 0 else f"( {seq} )?"} "]" space'

    def _range(self, schema: dict[str, Any], kind: str, rule: str, path: str) -> str:
        """Integer bounds written out when the span is small or the bound is 0 or 1; other
        bounds (and every bound on a non-integer but 0) are checked on the reply."""
        c = self.conv
        lo, lo_ex = _bound(schema, "minimum", "exclusiveMinimum")
        up, up_ex = _bound(schema, "maximum", "exclusiveMaximum")
        if kind == "number":
            if up is not None:
                c.relax(path, "maximum")
            if lo is None:
                return c.primitive("number")
            if lo != 0 or lo_ex:
                c.relax(path, "minimum")
            return c.primitive("nonneg-number" if lo >= 0 else "number")
        a = None if lo is None else (_floor(lo) + 1 if lo_ex else _ceil(lo))
        b = None if up is None else (_ceil(up) - 1 if up_ex else _floor(up))
        if a is not None and b is not None:
            if a > b:
                raise InvalidRequest(f"The range at {path[:200]} holds no integer.", param=c.param)
            if b - a < MAX_INT_SPAN:
                return "(" + " | ".join(literal(str(v)) for v in range(a, b + 1)) + ") space"
        if b is not None:
            c.relax(path, "maximum")
        if a is None:
            return c.primitive("integer")
        if a > 1 or a < 0:
            c.relax(path, "minimum")
        if a < 0:
            return c.primitive("integer")
        return c.primitive("positive-integer" if a >= 1 else "nonneg-integer")


_REF_SIBLINGS = frozenset({"$ref", "$defs", "definitions"})


def _merge(a: dict[str, Any], b: dict[str, Any], c: Conversion, path: str) -> dict[str, Any]:
    """Both schemas' keywords (a value must match both): properties and required united; a
    keyword both give differently is `b`'s, and checked on the reply."""
    out = {**a, **b}
    pa, pb = a.get("properties"), b.get("properties")
    if isinstance(pa, dict) and isinstance(pb, dict):
        if any(k in pa and pa[k] != v for k, v in pb.items()):
            c.relax(path, "a property given twice")
        out["properties"] = {**pa, **pb}
    ra, rb = a.get("required"), b.get("required")
    if isinstance(ra, list) and isinstance(rb, list):
        out["required"] = list(dict.fromkeys([*ra, *rb]))
    for k in (a.keys() & b.keys()) - {"properties", "required"} - ANNOTATIONS:
        if a[k] != b[k]:
            c.relax(path, f"{k} given twice")
    return out


def _constrains(schema: dict[str, Any]) -> bool:
    return bool(schema.keys() - ANNOTATIONS)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _count(schema: dict[str, Any], key: str, default: int | None, c: Conversion) -> Any:
    v = schema.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        raise InvalidRequest(
            f"{key} must be a non-negative integer, not {str(v)[:40]}.", param=c.param
        )
    return int(v)


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str) -> tuple[Any, bool]:
    """A bound and whether it is exclusive (draft 4's boolean `exclusiveMinimum` too); with
    both keywords, the stricter."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

    v: Any = schema.get(inclusive)
    ex: Any = schema.get(exclusive)
    if isinstance(ex, bool):
        return (v if number(v) else None), ex and number(v)
    if not number(ex):
        return (v if number(v) else None), False
    if not number(v):
        return ex, True
    lower = inclusive == "minimum"
    stricter_inclusive = float(v) > float(ex) if lower else float(v) < float(ex)
    return (v, False) if stricter_inclusive else (ex, True)


def _ceil(v: float) -> int:
    return int(-(-v // 1))


def _floor(v: float) -> int:
    return int(v // 1)


# -- patterns ---------------------------------------------------------------------------


def pattern_rule(c: Conversion, pattern: Any, name: str, path: str) -> str | None:
    """A string matching `pattern` (search semantics: unanchored ends take any text), or
    None when it has no affordable exact form (noted, and checked on the reply)."""
    import re._constants as sc
    import re._parser as sp

    if not isinstance(pattern, str):
        raise InvalidRequest(f"pattern at {path[:200]} is not a string.", param=c.param)
    c.spend(len(pattern))
    if len(pattern) > MAX_PATTERN:
        c.relax(path, f"pattern of {len(pattern)} characters")
        return None
    try:
        parsed = sp.parse(pattern)
    except Exception:
        c.relax(path, "pattern (not a regular expression lmx reads)")
        return None
    if parsed.state.flags & (re.IGNORECASE | re.VERBOSE):
        c.relax(path, "pattern flags")
        return None
    items = list(parsed)
    head = bool(items) and items[0] == (sc.AT, sc.AT_BEGINNING)
    tail = bool(items) and items[-1][0] is sc.AT and items[-1][1] in (sc.AT_END, sc.AT_END_STRING)
    items = items[int(head) : len(items) - int(tail)]
    translator = _PatternTranslator(c, name, sc)
    try:
        body = translator.seq(items)
    except _Untranslatable as e:
        c.relax(path, f"pattern ({e})")
        return None
    char = c.primitive("char")
    parts = [f"{char}*"] * (not head) + ([body] if body else []) + [f"{char}*"] * (not tail)
    return '"\\"" ' + " ".join(parts) + ' "\\"" space'


class _Untranslatable(Exception):
    pass


# A character a pattern may produce inside a JSON string: anything but '"', '\' and control
# characters (which JSON escapes; a grammar that leaves them out is stricter, never looser).
_UNSAFE = '"\\\\\\x7F\\x00-\\x1F'


class _PatternTranslator:
    def __init__(self, c: Conversion, name: str, sc: Any) -> None:
        self.c, self.name, self.sc, self.n = c, name, sc, 0

    def sub_rule(self, body: str) -> str:
        self.n += 1
        return self.c.add(f"{self.name}-p{self.n}", body)

    def seq(self, items: list[Any]) -> str:
        return " ".join(x for x in (self.item(op, av) for op, av in items) if x)

    def item(self, op: Any, av: Any) -> str:
        sc = self.sc
        if op is sc.LITERAL:
            return literal(_json_escape(chr(av)))
        if op is sc.NOT_LITERAL:
            return f"[^{_class_char(av)}{_UNSAFE}]"
        if op is sc.ANY:
            return f"[^{_UNSAFE}]"
        if op is sc.IN:
            return self.char_class(av)
        if op is sc.CATEGORY:
            return self.char_class([(op, av)])
        if op is sc.BRANCH:
            return self.sub_rule(" | ".join(self.seq(list(b)) or '""' for b in av[1]))
        if op is sc.SUBPATTERN:
            return self.sub_rule(self.seq(list(av[-1])) or '""')
        if op in (sc.MAX_REPEAT, sc.MIN_REPEAT, getattr(sc, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            if lo > MAX_REPEAT or (hi != sc.MAXREPEAT and hi > MAX_REPEAT):
                raise _Untranslatable(f"a repetition of {lo}..{hi}")
            inner = list(sub)
            body = self.seq(inner)
            if not (len(inner) == 1 and inner[0][0] in (sc.LITERAL, sc.IN, sc.ANY, sc.NOT_LITERAL)):
                body = self.sub_rule(body or '""')
            return self.c.repeat(body, lo, None if hi == sc.MAXREPEAT else hi, "pattern", ("", ""))
        raise _Untranslatable(str(op).lower())

    def char_class(self, av: list[Any]) -> str:
        sc = self.sc
        negate = bool(av) and av[0][0] is sc.NEGATE
        spans: list[tuple[int, int]] = []
        for op, v in av[int(negate) :]:
            if op is sc.LITERAL:
                spans.append((v, v))
            elif op is sc.RANGE:
                spans.append((v[0], v[1]))
            elif op is sc.CATEGORY and v in _CATEGORIES and not _CATEGORIES[v][1]:
                spans += _CATEGORIES[v][0]
            elif op is sc.CATEGORY and v in _CATEGORIES and len(av) == 1:
                negate, spans = True, list(_CATEGORIES[v][0])
            else:
                raise _Untranslatable(f"{str(op).lower()} in a class")
        if negate:
            return "[^" + "".join(_span(a, b) for a, b in spans) + _UNSAFE + "]"
        safe = [p for a, b in spans for p in _safe_spans(a, b)]
        if not safe:
            raise _Untranslatable("a class of only characters JSON escapes")
        return "[" + "".join(_span(a, b) for a, b in safe) + "]"


def _safe_spans(a: int, b: int) -> list[tuple[int, int]]:
    """[a, b] without the characters a JSON string escapes ('"', '\\', controls)."""
    out = []
    for lo, hi in ((0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E), (0x80, 0x10FFFF)):
        x, y = max(a, lo), min(b, hi)
        if x <= y:
            out.append((x, y))
    return out


def _span(a: int, b: int) -> str:
    return _class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}"


def _raise(why: str) -> str:
    raise _Untranslatable(why)


def _json_escape(ch: str) -> str:
    return json.dumps(ch, ensure_ascii=False)[1:-1]


def _class_char(code: int) -> str:
    """One character inside a GBNF class (llama.cpp's parser knows only a few escapes)."""
    ch = chr(code)
    if ch in "]\\[":
        return "\\" + ch
    if code < 0x20 or code == 0x7F or ch in "^-":
        return f"\\x{code:02X}"
    return ch


def _categories() -> dict[Any, tuple[list[tuple[int, int]], bool]]:
    import re._constants as sc

    digit = [(0x30, 0x39)]
    word = [(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A), (0x5F, 0x5F)]
    space = [(0x20, 0x20)]
    return {
        sc.CATEGORY_DIGIT: (digit, False),
        sc.CATEGORY_NOT_DIGIT: (digit, True),
        sc.CATEGORY_WORD: (word, False),
        sc.CATEGORY_NOT_WORD: (word, True),
        sc.CATEGORY_SPACE: (space, False),
        sc.CATEGORY_NOT_SPACE: (space, True),
    }


_CATEGORIES = _categories()
