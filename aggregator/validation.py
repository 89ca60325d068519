"""Error messages a person can act on: the key path, the bad value and what is allowed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError


class JsonFileError(ValueError):
    """A JSON file could not be read or parsed; the message names the file, line and column."""


def _duplicate_keys_rejected(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a duplicate key is an error (the second would silently win otherwise)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise JsonFileError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return json.loads(text, object_pairs_hook=_duplicate_keys_rejected)
    except json.JSONDecodeError as err:
        raise JsonFileError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except ValueError as err:
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


def validation_messages(err: ValidationError, union_tags: set[str] = frozenset(),  # type: ignore[assignment]
                        positions: dict[tuple[Any, ...], tuple[int, int]] | None = None) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        msg = str(e.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e.get("type") == "extra_forbidden":
            msg = "unknown key (extra keys are not allowed)"
        loc = clean_loc(e.get("loc", ()), union_tags)
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
