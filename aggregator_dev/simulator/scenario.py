"""Scenario files for the simulator: pydantic v2 models + loader.

``load_scenario("default")`` reads ``aggregator_dev/simulator/scenarios/default.json``;
any other argument is treated as a path. Every problem is reported as a
:class:`ScenarioError` naming the key path, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aggregator.validation import JsonFileError, format_validation_error, read_json
from .physics import Bank, Pack, PackParams, make_profile

__all__ = [
    "SCENARIO_DIR",
    "ConstantProfile",
    "DailyProfile",
    "FaultModel",
    "PackModel",
    "Scenario",
    "ScenarioError",
    "StepsProfile",
    "available_scenarios",
    "load_scenario",
    "parse_scenario",
]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

FaultKind = Literal["quiet", "freeze", "vanish", "invalid", "absurd", "slow", "fets_open"]


class ScenarioError(ValueError):
    """A scenario file could not be read or is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PackModel(_Strict):
    name: str = Field(min_length=1, max_length=64)
    service: str = Field(pattern=r"^[A-Za-z0-9_]+$", max_length=64)
    capacity_ah: float = Field(gt=0, le=10000)
    cells_series: int = Field(default=16, ge=1, le=32)
    r_mohm: float = Field(gt=0, le=1000)
    soc: float = Field(ge=0, le=100)
    temperature_c: float = Field(default=25.0, ge=-40, le=80)
    soh: float = Field(default=100.0, gt=0, le=100)
    max_charge_current: float | None = Field(default=None, gt=0, le=10000)
    max_discharge_current: float | None = Field(default=None, gt=0, le=10000)
    charge_voltage_per_cell: float = Field(default=3.45, ge=3.0, le=3.65)
    serial: str = Field(default="", max_length=64)
    custom_name: str = Field(default="", max_length=64)
    product_name: str = Field(default="Simulated LiFePO4", min_length=1, max_length=64)
    cell_spread_mv: float = Field(default=8.0, ge=0, le=500)

    def to_params(self) -> PackParams:
        return PackParams(**self.model_dump())


class ConstantProfile(_Strict):
    kind: Literal["constant"]
    current: float = Field(ge=-10000, le=10000)


class StepsProfile(_Strict):
    kind: Literal["steps"]
    steps: list[tuple[float, float]] = Field(min_length=1)
    period: float | None = Field(default=None, gt=0)

    @field_validator("steps")
    @classmethod
    def _sorted_times(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        prev = None
        for idx, (t, _i) in enumerate(v):
            if t < 0:
                raise ValueError(f"step {idx} time {t!r} must be >= 0")
            if prev is not None and t < prev:
                raise ValueError(f"step {idx} time {t!r} is before the previous one ({prev!r}); times must be "
                                 "non-decreasing")
            prev = t
        return v


class DailyProfile(_Strict):
    kind: Literal["daily"]
    solar_peak_a: float = Field(ge=0, le=10000)
    load_a: float = Field(ge=0, le=10000)
    day_seconds: float = Field(default=86400.0, gt=0)
    start_hour: float = Field(default=0.0, ge=0, lt=24)


ProfileModel = Annotated[Union[ConstantProfile, StepsProfile, DailyProfile], Field(discriminator="kind")]


class FaultModel(_Strict):
    at: float = Field(ge=0, description="wall-clock seconds after the simulator started")
    pack: str = Field(description="service suffix of the pack")
    kind: FaultKind
    duration: float | None = Field(default=None, gt=0, description="seconds; null = until the end")
    delay: float | None = Field(default=None, ge=0, le=600, description="only for 'slow': answer delay in s")

    @model_validator(mode="after")
    def _delay_only_for_slow(self) -> "FaultModel":
        if self.kind == "slow":
            if self.delay is None:
                self.delay = 5.0
        elif self.delay is not None:
            raise ValueError(f"delay: {self.delay!r} is only allowed for kind 'slow' (got kind {self.kind!r})")
        return self


class Scenario(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    rate_hz: float = Field(default=1.0, ge=0.1, le=50)
    time_scale: float = Field(default=1.0, ge=1, le=100000)
    seed: int = 0
    packs: list[PackModel] = Field(min_length=1, max_length=256)
    profile: ProfileModel
    faults: list[FaultModel] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Scenario":
        for key in ("name", "service"):
            seen: dict[str, int] = {}
            for idx, p in enumerate(self.packs):
                val = getattr(p, key)
                if val in seen:
                    raise ValueError(
                        f"packs[{idx}].{key}: duplicate value {val!r} (already used by packs[{seen[val]}]); "
                        f"each pack needs a unique {key}"
                    )
                seen[val] = idx
        services = [p.service for p in self.packs]
        for idx, f in enumerate(self.faults):
            if f.pack not in services:
                raise ValueError(f"faults[{idx}].pack: unknown pack {f.pack!r}; allowed: "
                                 f"{', '.join(map(repr, services))}")
        return self

    # -- convenience -----------------------------------------------------------

    def pack_params(self) -> list[PackParams]:
        return [p.to_params() for p in self.packs]

    def build_packs(self) -> list[Pack]:
        return [Pack(pp, seed=self.seed) for pp in self.pack_params()]

    def build_bank(self) -> Bank:
        return Bank(self.build_packs())

    def build_profile(self) -> Callable[[float], float]:
        return make_profile(self.profile)

    @property
    def tick_seconds(self) -> float:
        """Simulated seconds per publish tick."""
        return self.time_scale / self.rate_hz


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    """Validate already-decoded JSON data."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(format_validation_error(err, source, union_tags={"constant", "steps", "daily"})) from None


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.json"))


def _resolve(path_or_name: str | Path) -> Path:
    p = Path(path_or_name)
    if p.exists():
        return p
    s = str(path_or_name)
    if "/" not in s and "\\" not in s and not s.endswith(".json"):
        cand = SCENARIO_DIR / f"{s}.json"
        if cand.exists():
            return cand
        allowed = ", ".join(available_scenarios()) or "(none)"
        raise ScenarioError(f"unknown scenario {s!r}; allowed: {allowed} or a path to a .json file")
    raise ScenarioError(f"scenario file not found: {s}")


def load_scenario(path_or_name: str | Path) -> Scenario:
    """Load a scenario by bare name (``default``) or path to a JSON file."""
    path = _resolve(path_or_name)
    try:
        data = read_json(path)
    except JsonFileError as err:
        raise ScenarioError(str(err)) from None
    return parse_scenario(data, source=f"scenario {path.name}")


def with_pack_count(scenario: Scenario, count: int) -> Scenario:
    """The scenario with `count` packs: its packs repeated in turn, each copy with its own service and serial.

    Used by the benchmarks to publish many members with realistic values.
    """
    if count == len(scenario.packs):
        return scenario
    packs = []
    for i in range(count):
        base = scenario.packs[i % len(scenario.packs)]
        packs.append(base.model_copy(update={
            "name": f"{base.name} #{i + 1}", "service": f"{base.service}_{i + 1}",
            "serial": f"{base.serial or base.service}-{i + 1}",
        }))
    return parse_scenario({**scenario.model_dump(), "packs": [p.model_dump() for p in packs], "faults": []},
                          f"{scenario.name} x{count}")
