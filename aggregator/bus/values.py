"""Conversions between Python values and BusItem variants, and the text form of values.

Pure functions: no bus access. The encoding follows Victron's BusItem contract: an invalid value is an
empty array of int32 (`ai`), ints are int32 unless they do not fit (then int64), an empty list that is valid
is an empty `au`, lists of anything else are `av` and dicts `a{sv}`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from ..bounded import MAX_ITEMS, MAX_SIZE, MAX_TEXT, bounded, oversize  # noqa: F401 (part of this API)
from .lib import Variant

TextFormat = Callable[[Any], str]

INVALID = Variant("ai", [])
INVALID_TEXT = "---"
_EMPTY_LIST = Variant("au", [])
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def wrap(value: Any) -> Variant:
    """Python value -> variant. None means invalid. Raises TypeError for a value D-Bus cannot carry."""
    if value is None:
        return INVALID
    kind = type(value)
    # Exact type checks first: they are the common case on the hot path.
    if kind is float:
        return Variant("d", value)
    if kind is int:
        return _wrap_int(value)
    if kind is str:
        return Variant("s", value)
    if kind is bool:
        return Variant("b", value)
    if isinstance(value, Variant):
        return value
    if isinstance(value, bool):
        return Variant("b", bool(value))
    if isinstance(value, int):  # IntEnum, numpy ints registered as int subclasses
        return _wrap_int(int(value))
    if isinstance(value, float):
        return Variant("d", float(value))
    if isinstance(value, str):
        return Variant("s", str(value))
    if isinstance(value, (list, tuple)):
        if not value:
            return _EMPTY_LIST
        return Variant("av", [wrap(v) for v in value])
    if isinstance(value, dict):
        return Variant("a{sv}", {str(k): wrap(v) for k, v in value.items()})
    if hasattr(value, "item"):  # numpy scalars
        return wrap(value.item())
    raise TypeError(f"cannot put a {kind.__name__} on D-Bus")


def _wrap_int(value: int) -> Variant:
    if _INT32_MIN <= value <= _INT32_MAX:
        return Variant("i", value)
    if _INT64_MIN <= value <= _INT64_MAX:
        return Variant("x", value)
    if 0 <= value < 2**64:
        return Variant("t", value)
    # Beyond 64 bits there is no integer type: a double keeps the magnitude.
    return Variant("d", float(value))


def unwrap(variant: Any) -> Any:
    """Variant (or plain value from a body) -> Python value. The invalid encoding becomes None.

    Any empty array whose element type is a signed/unsigned integer of any width counts as invalid only
    for `ai`, as in Victron's libraries; an empty `au` is a valid empty list.
    """
    if type(variant) is not Variant:
        return variant
    sig = variant.signature
    value = variant.value
    if len(sig) == 1:
        return value
    if sig == "ai":
        return value if value else None
    if sig == "av":
        return [unwrap(v) for v in value]
    if sig == "a{sv}":
        return {k: unwrap(v) for k, v in value.items()}
    if sig == "ay":
        return bytes(value)
    if sig[0] == "a" and isinstance(value, list):
        return [unwrap(v) for v in value]
    if sig[0] == "a" and isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    return value


def same_value(a: Any, b: Any) -> bool:
    """Equality that a publisher uses to decide whether to signal: type-aware, and NaN equals NaN.

    1, 1.0 and True are different values on the bus (different signatures), so a change between them is a
    change to signal.
    """
    if type(a) is not type(b):
        return False
    if a == b:
        return True
    return type(a) is float and math.isnan(a) and math.isnan(b)


def fmt(template: str) -> TextFormat:
    """A text formatter from a format string such as '{:.2f}V'."""
    return template.format


def text_of(value: Any, formatter: TextFormat | None = None) -> str:
    """The text form of a value: '---' when invalid, else the formatter's output, else str(value)."""
    if value is None:
        return INVALID_TEXT
    if formatter is not None:
        try:
            return formatter(value)
        except (ValueError, TypeError):
            # A value of an unexpected type (a string where a number was expected) still gets a text.
            pass
    return str(value)


def product_id_text(value: Any) -> str:
    """ProductId is shown in hex, as Victron's services do."""
    return f"0x{value:X}" if isinstance(value, int) else str(value)


# ---- what a writer sends, as the item's type ---------------------------------------------------------------

_NO = object()


def converted(value: Any, types: tuple[type, ...]) -> Any:
    """A written value as one of the item's types, as Victron's BusItem library and localsettings do (a number
    typed into a text field arrives as int32: /CustomName = 123 is the text '123'). Returns NOT_CONVERTIBLE when
    there is no such value: a bool is no number or text, a list no scalar, a text that is no number no number,
    and a float with a fraction no int. None (invalid) always passes."""
    if value is None:
        return None
    kind = type(value)
    if kind in types:
        return value
    if kind is bool or kind is list or kind is dict or kind is tuple:
        return NOT_CONVERTIBLE
    if kind is int and float in types:
        return float(value)  # an int written to a float path is the same quantity
    if kind in (int, float) and str in types:
        return str(value)
    if kind is float and int in types:
        return int(value) if value.is_integer() else NOT_CONVERTIBLE
    if kind is str and (int in types or float in types):
        number = _number(value)
        if number is _NO:
            return NOT_CONVERTIBLE
        if int in types and (type(number) is int or number.is_integer()):
            return int(number)
        return float(number) if float in types else NOT_CONVERTIBLE
    return NOT_CONVERTIBLE


NOT_CONVERTIBLE: Any = _NO


def _number(text: str) -> Any:
    try:
        return int(text.strip())
    except ValueError:
        pass
    try:
        number = float(text.strip())
    except ValueError:
        return _NO
    return number if math.isfinite(number) else _NO
