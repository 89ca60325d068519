"""Error messages a person can act on: the key path, the bad value and what is allowed."""
from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError


class JsonFileError(ValueError):
    """A JSON file could not be read or parsed; the message names the file, line and column."""


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def _duplicate_keys_rejected(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _NotJson(ValueError):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def _outside_strings(text: str) -> Iterable[int]:
    """The offsets of a JSON text that are not inside a string."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        else:
            yield i


def _where(text: str, token: str) -> int:
    return next((i for i in _outside_strings(text) if text.startswith(token, i)), 0)


def _not_json(text: str) -> Any:
    def refuse(word: str) -> Any:
        raise _NotJson(f"{word} is not a JSON number", _where(text, word))
    return refuse


def _finite(text: str, kind: type) -> Any:
    """A number of the text, refused when no float holds it (1e400): a browser reads it as Infinity."""
    def number(token: str) -> Any:
        try:
            value = kind(token)
            if math.isfinite(float(value)):
                return value
        except (OverflowError, ValueError):  # ValueError: more digits than int() takes
            pass
        raise _NotJson(f"{token[:20]}{'...' if len(token) > 20 else ''} is out of the range of a number",
                       _where(text, token))
    return number


def _first_duplicate(text: str) -> tuple[str, int] | None:
    """The first key, in the order of the text, that an object has twice, and where its second one starts
    (the decoder meets the inner objects first; the page reads in the order of the text)."""
    decoder = json.JSONDecoder()
    stack: list[set[str] | None] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            word, end = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
            rest = text[end:].lstrip(" \t\r\n")
            if stack and stack[-1] is not None and rest.startswith(":"):
                if word in stack[-1]:
                    return word, i
                stack[-1].add(word)
            i = end
            continue
        if ch in "{[":
            stack.append(set() if ch == "{" else None)
        elif ch in "}]" and stack:
            stack.pop()
        elif ch not in " \t\r\n,:":
            try:
                _, i = decoder.raw_decode(text, i)
                continue
            except ValueError:
                pass
        i += 1
    return None


def _line_column(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def json_hint(text: str, offset: int) -> str:
    """What is probably wrong where a JSON text stops parsing at `offset`: the two habits of other formats
    (a comment, a comma before a closing bracket). The config page gives the same hints."""
    if text.startswith(("//", "/*"), offset) or text.startswith("#", offset):
        return "JSON has no comments: remove the comment"
    if offset < len(text) and text[offset] in "}]":
        before = len(text[:offset].rstrip(" \t\r\n")) - 1
        if before >= 0 and text[before] == ",":
            line, column = _line_column(text, before)
            return f"JSON allows no comma before {text[offset]}: remove the comma at line {line} column {column}"
    return ""


MAX_DEPTH = 64  # a config is a few levels deep; the decoder would run out of stack on thousands


def _too_deep(text: str) -> int | None:
    depth = 0
    for i in _outside_strings(text):
        if text[i] in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return i
        elif text[i] in "]}":
            depth -= 1
    return None


def parse_json_text(text: str) -> Any:
    """Decode a config text: a duplicate key is an error (the second would silently win otherwise), as are NaN,
    Infinity and numbers beyond a float (not JSON a browser reads), and nesting beyond MAX_DEPTH; the first
    mistake in the text is named with its line and column, and what is probably wrong."""
    problem: tuple[int, str] | None = None
    data = None
    try:
        data = json.loads(text, object_pairs_hook=_duplicate_keys_rejected, parse_constant=_not_json(text),
                          parse_float=_finite(text, float), parse_int=_finite(text, int))
    except RecursionError:  # far deeper than MAX_DEPTH: found below
        pass
    except json.JSONDecodeError as err:
        hint = json_hint(text, err.pos)
        problem = (err.pos, err.msg + (f" (hint: {hint})" if hint else ""))
    except _NotJson as err:
        problem = (err.offset, str(err))
    except _DuplicateKey as err:
        key, offset = _first_duplicate(text) or (err.key, 0)
        problem = (offset, f"duplicate key {key!r}")
    deep = _too_deep(text)
    if deep is not None and (problem is None or deep <= problem[0]):
        problem = (deep, f"nested more than {MAX_DEPTH} levels deep")
    if problem is not None:
        line, column = _line_column(text, problem[0])
        raise JsonFileError(f"invalid JSON at line {line} column {column}: {problem[1]}")
    return data


def read_text(path: str | Path) -> str:
    """A JSON file's text (without a byte order mark, as some editors write one: a browser drops it too)."""
    try:
        return Path(path).read_text(encoding="utf-8").removeprefix("\ufeff")
    except OSError as err:
        raise JsonFileError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise JsonFileError(f"cannot read {path}: not UTF-8 text (byte {err.start})") from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file (parse_json_text); the error names the file."""
    text = read_text(path)
    try:
        return parse_json_text(text)
    except JsonFileError as err:
        raise JsonFileError(f"{path}: {err}") from None


def json_positions(text: str) -> dict[tuple[Any, ...], tuple[int, int]]:
    """Where each value of a (valid) JSON text starts: key path (keys and list indices) -> (line, column)."""
    decoder = json.JSONDecoder()
    offsets: dict[tuple[Any, ...], int] = {}
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def value(i: int, path: tuple[Any, ...]) -> int:
        i = skip(i)
        offsets[path] = i
        c = text[i]
        if c in "{[":
            closing = "}" if c == "{" else "]"
            i = skip(i + 1)
            index = 0
            while text[i] != closing:
                if c == "{":
                    key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
                    i = skip(i) + 1  # the colon
                    i = value(i, path + (key,))
                else:
                    i = value(i, path + (index,))
                    index += 1
                i = skip(i)
                if text[i] == ",":
                    i = skip(i + 1)
            return i + 1
        _, end = decoder.raw_decode(text, i)
        return end

    try:
        value(0, ())
    except (ValueError, IndexError):  # not valid JSON: no positions
        return {}
    lines = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            lines.append(i + 1)
    import bisect

    out = {}
    for path, offset in offsets.items():
        line = bisect.bisect_right(lines, offset)
        out[path] = (line, offset - lines[line - 1] + 1)
    return out


def clean_loc(loc: Iterable[Any], union_tags: set[str] = frozenset()) -> tuple[Any, ...]:  # type: ignore[assignment]
    """pydantic's error location without the tags it inserts for union members."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p in union_tags or (p.endswith("]") and "[" in p))))


def key_path(loc: Iterable[Any], union_tags: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """pydantic's error location -> 'packs[1].soc' (string keys with dots are quoted)."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in union_tags or (part.endswith("]") and "[" in part)):
            continue  # the tag pydantic inserts for a union member ('list[str]', a discriminator)
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part) if str(part).isidentifier() else f'"{part}"'  # quote 'a.b', 'name:x', ...
            out += f".{text}" if out else text
    return out


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def at(positions: dict[tuple[Any, ...], tuple[int, int]] | None, loc: tuple[Any, ...]) -> str:
    """' (line 3, column 12)' for a key path, or '' when unknown (positions of the nearest parent otherwise)."""
    if not positions:
        return ""
    while loc not in positions and loc:
        loc = loc[:-1]
    if loc not in positions or not loc:
        return ""
    line, column = positions[loc]
    return f" (line {line}, column {column})"


# ---- reading pydantic's errors with the JSON schema (the page reads the same schema the same way) ----

def _resolve(schema: dict[str, Any], node: Any) -> dict[str, Any]:
    while isinstance(node, dict) and "$ref" in node:
        target = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node if isinstance(node, dict) else {}


def json_type_is(value: Any, kind: str | None) -> bool:
    """The JSON Schema type test (a bool is no number; an integer may be written 3.0)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"string": isinstance(value, str), "boolean": isinstance(value, bool), "null": value is None,
            "number": number and math.isfinite(value), "integer": number and float(value).is_integer(),
            "array": isinstance(value, list), "object": isinstance(value, dict)}.get(kind or "", True)


def _branches(schema: dict[str, Any], node: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The choices of a union (null left out: pydantic tags only the others), or None for no union."""
    if "oneOf" in node:
        return [_resolve(schema, b) for b in node["oneOf"]]
    if "anyOf" in node:
        real = [_resolve(schema, b) for b in node["anyOf"]]
        real = [b for b in real if b.get("type") != "null"]
        return real if len(real) > 1 else None
    return None


def _step(schema: dict[str, Any], node: dict[str, Any], part: Any) -> dict[str, Any]:
    if isinstance(part, int):
        return _resolve(schema, node.get("items"))
    props = node.get("properties") or {}
    if part in props:
        return _resolve(schema, props[part])
    for pattern, value in (node.get("patternProperties") or {}).items():
        if re.search(pattern, str(part)):
            return _resolve(schema, value)
    extra = node.get("additionalProperties")
    return _resolve(schema, extra) if isinstance(extra, dict) else {}


def _value_at(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        if isinstance(data, dict) and isinstance(part, str):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _unwrap(schema: dict[str, Any], node: dict[str, Any], value: Any) -> dict[str, Any]:
    """Into the branch of a nullable or union node that the value's JSON type picks (the page picks the same)."""
    while "anyOf" in node or "oneOf" in node:
        choices = [_resolve(schema, b) for b in node.get("anyOf") or node.get("oneOf")]
        node = next((b for b in choices if json_type_is(value, b.get("type"))), {})
    return node


def integers_as_ints(schema: dict[str, Any], data: Any, node: dict[str, Any] | None = None) -> Any:
    """The document with 3.0 read as 3 where the schema wants an integer: JSON Schema counts it an integer
    (and a browser cannot tell them apart), pydantic's strict mode would not. Other numbers stay as written."""
    node = _unwrap(schema, _resolve(schema, schema) if node is None else node, data)
    if isinstance(data, float) and node.get("type") == "integer" and data.is_integer():
        return int(data)
    if isinstance(data, list):
        return [integers_as_ints(schema, x, _step(schema, node, i)) for i, x in enumerate(data)]
    if isinstance(data, dict):
        return {k: integers_as_ints(schema, v, _step(schema, node, k)) for k, v in data.items()}
    return data


UnionTag = tuple[tuple[Any, ...], str, "int | None"]  # key path of the union, pydantic's tag, the chosen choice


def read_loc(schema: dict[str, Any], loc: tuple[Any, ...], data: Any) -> tuple[tuple[Any, ...], list[UnionTag]]:
    """pydantic's error location -> the key path in the JSON document, and the unions on the way: pydantic
    names the choice of a union in the location (its tag); the choice the value's JSON type picks is noted."""
    node = _resolve(schema, schema)
    path: tuple[Any, ...] = ()
    tags: list[UnionTag] = []
    parts = list(loc)
    while parts:
        branches = _branches(schema, node) if node else None
        if branches is not None:
            value = _value_at(data, path)
            chosen = next((i for i, b in enumerate(branches) if json_type_is(value, b.get("type"))), None)
            tags.append((path, str(parts.pop(0)), chosen))
            node = branches[chosen] if chosen is not None else {}
            continue
        node = _unwrap(schema, node, _value_at(data, path)) if node else node
        part = parts.pop(0)
        if part == "[key]":  # pydantic's mark of an error in a dict's key: the key path ends at the key
            continue
        node = _step(schema, node, part) if node else {}
        path += (part,)
    return path, tags


def properties_at(schema: dict[str, Any], path: tuple[Any, ...], data: Any) -> list[str]:
    """The keys the schema allows in the object at `path`, in the schema's order."""
    node = _resolve(schema, schema)
    for n, part in enumerate(path):
        node = _step(schema, _unwrap(schema, node, _value_at(data, path[:n])), part)
    return list(_unwrap(schema, node, _value_at(data, path)).get("properties") or {})


def suggest_key(key: str, allowed: list[str]) -> str:
    """'did you mean X?' for an unknown key close to an allowed one (the page suggests the same)."""
    lowered = next((k for k in allowed if k.lower() == key.lower()), None)
    if lowered is not None:
        return f"did you mean {lowered}? (keys are case-sensitive)"
    best, score = "", 0.0
    for candidate in allowed:  # the first of equally close ones
        ratio = difflib.SequenceMatcher(None, key.lower(), candidate.lower()).ratio()
        if ratio > score:
            best, score = candidate, ratio
    return f"did you mean {best}?" if score >= 0.7 else ""


def _hidden(read: list[tuple[tuple[Any, ...], list[UnionTag]]]) -> set[tuple[tuple[Any, ...], str]]:
    """The union choices whose errors are not shown: when the value's JSON type picks a choice, the others only
    say "not a list", "not an object". pydantic reports the failed choices in their order, each at least once."""
    order: dict[tuple[Any, ...], list[str]] = {}
    chosen: dict[tuple[Any, ...], int | None] = {}
    for _, tags in read:
        for prefix, tag, index in tags:
            if tag not in order.setdefault(prefix, []):
                order[prefix].append(tag)
            chosen[prefix] = index
    hidden = set()
    for prefix, tags in order.items():
        index = chosen[prefix]
        if index is not None and index < len(tags):
            hidden.update((prefix, tag) for tag in tags if tag != tags[index])
    return hidden


def validation_messages(err: ValidationError, union_tags: set[str] = frozenset(),  # type: ignore[assignment]
                        positions: dict[tuple[Any, ...], tuple[int, int]] | None = None,
                        schema: dict[str, Any] | None = None, data: Any = None) -> list[str]:
    """One line per error: key path, message, the bad value, line and column. With the JSON schema (and the
    decoded document) the key paths are read through it: a failed union shows the errors of the choice the
    value's type picks, and an unknown key gets the closest allowed one."""
    errors = err.errors(include_url=False)
    read = [read_loc(schema, tuple(e.get("loc", ())), data) if schema is not None
            else (clean_loc(e.get("loc", ()), union_tags), []) for e in errors]
    hidden = _hidden(read)
    lines = []
    for e, (loc, tags) in zip(errors, read):
        if any((prefix, tag) in hidden for prefix, tag, _ in tags):
            continue
        msg = str(e.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e.get("type") == "extra_forbidden":
            hint = suggest_key(str(loc[-1]), properties_at(schema, loc[:-1], data)) if schema is not None else ""
            msg = f"unknown key: {hint}" if hint else "unknown key (extra keys are not allowed)"
        path = key_path(loc)
        where = at(positions, loc)
        lines.append(f"{path}: {msg} (got {short_repr(e.get('input'))}){where}" if path else msg + where)
    return lines


def format_messages(source: str, lines: list[str]) -> str:
    head = f"invalid {source}: " if len(lines) == 1 else f"invalid {source} ({len(lines)} errors):\n  "
    return head + "\n  ".join(lines)


def format_validation_error(err: ValidationError, source: str, union_tags: set[str] = frozenset(),  # type: ignore[assignment]
                            positions: dict[tuple[Any, ...], tuple[int, int]] | None = None) -> str:
    return format_messages(source, validation_messages(err, union_tags, positions))


def is_loopback(host: str) -> bool:
    """localhost, 127.x.x.x or ::1 (the config generator page mirrors this in isLoopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
