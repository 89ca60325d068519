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


def key_path(loc: Iterable[Any], union_tags: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """pydantic's error location -> 'packs[1].soc' (string keys with dots are quoted)."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in union_tags or (part.endswith("]") and "[" in part)):
            continue  # the tag pydantic inserts for a union member ('list[str]', a discriminator)
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = f'"{part}"' if "." in str(part) or "/" in str(part) else str(part)
            out += f".{text}" if out else text
    return out


def short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_validation_error(err: ValidationError, source: str, union_tags: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    lines = []
    for e in err.errors(include_url=False):
        msg = str(e.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e.get("type") == "extra_forbidden":
            msg = "unknown key (extra keys are not allowed)"
        path = key_path(e.get("loc", ()), union_tags)
        lines.append(f"{path}: {msg} (got {short_repr(e.get('input'))})" if path else msg)
    head = f"invalid {source}: " if len(lines) == 1 else f"invalid {source} ({len(lines)} errors):\n  "
    return head + "\n  ".join(lines)
