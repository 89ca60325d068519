"""config.schema.json, generated from the pydantic model (the one source of truth).

    battery-aggregator schema            print it
    battery-aggregator schema --write    write config.schema.json at the repo root
    battery-aggregator schema --check    exit 1 when the committed file differs from the model
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from .config import Config

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "config.schema.json"


@functools.lru_cache(maxsize=1)
def _generated() -> dict[str, Any]:
    return Config.model_json_schema()


def config_schema() -> dict[str, Any]:
    schema = copy.deepcopy(_generated())
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "battery-aggregator config.json",
        "description": "Configuration of battery-aggregator (and of the BatteryAggregator it replaces). "
                       "Generated from aggregator/config.py: do not edit by hand.",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def schema_text() -> str:
    return json.dumps(config_schema(), indent=2) + "\n"


# The configuration reference (docs/configuration.md), written from the same schema, so the field texts have one
# source: the model's descriptions.
DOCS_FILE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

# Where a top-level key's feature is explained (relative to docs/).
FEATURE_PAGES = {
    "serviceName": "aggregated-battery.md", "excludedServices": "aggregated-battery.md#members",
    "primaryServices": "aggregated-battery.md#primary-and-auxiliary-services",
    "auxiliaryServices": "aggregated-battery.md#primary-and-auxiliary-services",
    "virtualBatteries": "virtual-batteries.md", "classes": "virtual-batteries.md#hooks",
    "currentRatioMethod": "charge-limits.md#shares", "ir": "charge-limits.md#shares",
    "cclMode": "charge-limits.md#dvcc", "cvlMode": "charge-limits.md#charge-voltage-limit",
    "limits": "charge-limits.md", "expectedBatteries": "aggregated-battery.md#published-paths",
    "energy": "energy.md", "gridBatteries": "grid-battery.md", "dispatcher": "dispatcher.md",
    "coop": "cooperative.md",
}


# A form used at several keys gets a section of its own under this name (else a section is named by its key).
SHARED_FORMS = {"AdapterSpec": "adapter"}


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def _plain(text: str) -> str:
    """Text for a table cell: no cell breaks, no HTML tags or emphasis made of the model's <placeholders>."""
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("*", "\\*").replace("\n", " "))


def _code(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return "`" + text.replace("|", "\\|") + "`"


def _number(x: float) -> str:
    return f"{x:g}" if abs(x) < 1e6 else f"{x:.0e}".replace("e+0", "e").replace("e+", "e")


def _ref(spec: dict[str, Any]) -> str | None:
    return spec["$ref"].rsplit("/", 1)[-1] if "$ref" in spec else None


class _Reference:
    def __init__(self, schema: dict[str, Any]) -> None:
        self.defs: dict[str, dict[str, Any]] = schema.get("$defs", {})
        self.sections: dict[str, list[str]] = {}  # definition -> the key paths it is used at, first one first
        self._collect(schema, "")

    def _collect(self, obj: dict[str, Any], prefix: str) -> None:
        for key, spec in obj.get("properties", {}).items():
            self._uses(spec, prefix + key)

    def _uses(self, spec: dict[str, Any], path: str) -> None:
        name = _ref(spec)
        if name:
            first = name not in self.sections
            self.sections.setdefault(name, []).append(path)
            if first:
                self._collect(self.defs[name], SHARED_FORMS.get(name, path) + ".")
        for alternative in spec.get("anyOf", []) + spec.get("oneOf", []):
            self._uses(alternative, path)
        if isinstance(spec.get("items"), dict):
            self._uses(spec["items"], path + "[]")
        if isinstance(spec.get("additionalProperties"), dict):
            self._uses(spec["additionalProperties"], path + ".<key>")
        for value in spec.get("patternProperties", {}).values():
            self._uses(value, path + ".<key>")

    def key(self, name: str) -> str:
        return SHARED_FORMS.get(name, self.sections[name][0])

    def heading(self, name: str) -> str:
        return "`" + self.key(name) + "`"

    def link(self, name: str) -> str:
        return f"[`{self.key(name)}`](#{anchor(self.heading(name))})"

    def type_text(self, spec: dict[str, Any]) -> str:
        name = _ref(spec)
        if name:
            return "object: " + self.link(name)
        alternatives = spec.get("anyOf") or spec.get("oneOf")
        if alternatives:
            texts = [self.type_text(a) for a in alternatives if a.get("type") != "null"]
            nullable = any(a.get("type") == "null" for a in alternatives)
            return " or ".join(texts + (["`null`"] if nullable else []))
        if "enum" in spec:
            values = [_code(json.dumps(v)) for v in spec["enum"]]
            return "one of " + ", ".join(values)
        kind = spec.get("type")
        if kind == "array":
            return "list of " + (self.type_text(spec["items"]) if "items" in spec else "values")
        if kind == "object":
            if isinstance(spec.get("additionalProperties"), dict):
                return "map of names to " + self.type_text(spec["additionalProperties"])
            if spec.get("patternProperties"):
                pattern, value = next(iter(spec["patternProperties"].items()))
                return f"map of names matching {_code(pattern)} to " + self.type_text(value)
            return "object (any keys)"
        text = {"string": "text", "number": "number", "integer": "integer", "boolean": "`true` or `false`"}.get(
            kind, kind or "any value")
        if spec.get("format") == "date":
            text = "date (`YYYY-MM-DD`)"
        bounds = []
        for word, key in ((">=", "minimum"), (">", "exclusiveMinimum"), ("<=", "maximum"), ("<", "exclusiveMaximum")):
            if key in spec:
                bounds.append(f"{word} {_number(spec[key])}")
        if "minLength" in spec or "maxLength" in spec:
            low, high = spec.get("minLength"), spec.get("maxLength")
            bounds.append(f"{low} to {high} characters" if low and high else
                          f"at least {low} character{'s' * (low != 1)}" if low else f"at most {high} characters")
        if "pattern" in spec:
            bounds.append("matching " + _code(spec["pattern"]))
        return text + (", " + ", ".join(bounds) if bounds else "")

    def default_text(self, spec: dict[str, Any], required: bool) -> str:
        if "default" in spec:
            return _code(json.dumps(spec["default"]))
        if required:
            return "required"
        if _ref(spec):
            return "see " + self.link(_ref(spec) or "")
        kind = spec.get("type") or next((a.get("type") for a in spec.get("anyOf", [])), "")
        return {"array": "`[]`", "object": "`{}`"}.get(kind, "")

    def table(self, obj: dict[str, Any], top: bool = False) -> list[str]:
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
        required = set(obj.get("required", []))
        for key, spec in obj.get("properties", {}).items():
            meaning = _plain(spec.get("description", ""))
            if top and key in FEATURE_PAGES:
                page = FEATURE_PAGES[key]
                title = page.split("#")[0].removesuffix(".md").replace("-", " ")
                meaning += f" ([{title}]({page}))"
            lines.append(f"| `{key}` | {self.type_text(spec)} | {self.default_text(spec, key in required)} | "
                         f"{meaning} |")
        return lines


def config_reference() -> str:
    """docs/configuration.md: every key of config.json with its type, default and meaning, from the schema."""
    schema = config_schema()
    ref = _Reference(schema)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the config model (aggregator/config.py) by `battery-aggregator schema --write`: "
        "do not edit by hand. -->",
        "",
        "Every key of `config.json` (on a GX `/data/setupOptions/BatteryAggregator/config.json`), with its type, "
        "its default and what it does. Every key of BatteryAggregator's config.json is read unchanged; a key "
        "left out takes its default. The same model gives `config.schema.json`, the checker and the config page: "
        "see [checking the config](checking-config.md).",
        "",
        "## Top-level keys",
        "",
        *ref.table(schema, top=True),
    ]
    for name, paths in ref.sections.items():
        spec = ref.defs[name]
        lines += ["", f"## {ref.heading(name)}", ""]
        if spec.get("description"):
            lines += [_plain(spec["description"]), ""]
        if name in SHARED_FORMS:
            lines += ["The form of " + ", ".join(f"`{p}`" for p in paths) + ".", ""]
        lines += ref.table(spec)
    return "\n".join(lines) + "\n"
