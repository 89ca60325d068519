"""Pure physics of LiFePO4 packs connected in parallel on one DC bus.

No I/O, no D-Bus, no asyncio: everything here is a deterministic function of
its inputs (plus the per-pack offsets derived from the pack name and seed).

Sign convention: current > 0 means the pack is charging.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "AMBIENT_C",
    "CELL_OCV_SOC",
    "CELL_OCV_V",
    "BankState",
    "Bank",
    "Pack",
    "PackLimits",
    "PackParams",
    "cell_ocv",
    "cell_soc_from_ocv",
    "constant",
    "daily",
    "make_profile",
    "steps",
]

AMBIENT_C = 25.0
THERMAL_TAU_S = 3600.0  # relaxation time constant toward ambient
HEAT_CAPACITY_J_PER_K_PER_AH_CELL = 20.0  # ~86 kJ/K for a 280 Ah 16s pack

# LiFePO4 cell open-circuit voltage vs state of charge (strictly increasing).
CELL_OCV_SOC = np.array(
    [0.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 97.0, 99.0, 100.0]
)
CELL_OCV_V = np.array(
    [2.50, 2.80, 3.00, 3.15, 3.20, 3.245, 3.270, 3.285, 3.295, 3.300, 3.308, 3.318, 3.330, 3.350, 3.380, 3.450, 3.580]
)


def cell_ocv(soc: float) -> float:
    """Open-circuit voltage of one cell (V) at ``soc`` percent (clamped to 0..100)."""
    return float(np.interp(min(100.0, max(0.0, soc)), CELL_OCV_SOC, CELL_OCV_V))


def cell_soc_from_ocv(v: float) -> float:
    """Inverse of :func:`cell_ocv` (clamped to the table range)."""
    return float(np.interp(v, CELL_OCV_V, CELL_OCV_SOC))


def _ramp(x: float, x0: float, x1: float) -> float:
    """0 at x<=x0, 1 at x>=x1, linear in between (x0 < x1)."""
    if x <= x0:
        return 0.0
    if x >= x1:
        return 1.0
    return (x - x0) / (x1 - x0)


# ---------------------------------------------------------------------------
# Parameters and limits
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PackParams:
    """Static description of one pack. ``service`` is the D-Bus service suffix."""

    name: str
    service: str
    capacity_ah: float
    r_mohm: float
    soc: float = 50.0
    temperature_c: float = AMBIENT_C
    cells_series: int = 16
    soh: float = 100.0
    max_charge_current: float | None = None  # default 0.5 C
    max_discharge_current: float | None = None  # default 1 C
    charge_voltage_per_cell: float = 3.45
    serial: str = ""  # default "SIM-<SERVICE>"
    custom_name: str = ""  # default = name
    product_name: str = "Simulated LiFePO4"
    cell_spread_mv: float = 8.0

    def __post_init__(self) -> None:
        if not self.capacity_ah > 0:
            raise ValueError(f"capacity_ah must be > 0, got {self.capacity_ah!r}")
        if not self.r_mohm > 0:
            raise ValueError(f"r_mohm must be > 0, got {self.r_mohm!r}")
        if not 0 < self.soh <= 100:
            raise ValueError(f"soh must be in (0, 100], got {self.soh!r}")
        if self.cells_series < 1:
            raise ValueError(f"cells_series must be >= 1, got {self.cells_series!r}")
        if self.max_charge_current is None:
            object.__setattr__(self, "max_charge_current", 0.5 * self.capacity_ah)
        if self.max_discharge_current is None:
            object.__setattr__(self, "max_discharge_current", 1.0 * self.capacity_ah)
        if not self.serial:
            object.__setattr__(self, "serial", f"SIM-{self.service.upper()}")
        if not self.custom_name:
            object.__setattr__(self, "custom_name", self.name)

    @property
    def capacity_eff_ah(self) -> float:
        """Usable capacity (Ah) after ageing: capacity_ah * soh / 100."""
        return self.capacity_ah * self.soh / 100.0


@dataclass(frozen=True)
class PackLimits:
    ccl: float  # charge current limit, A (>= 0)
    dcl: float  # discharge current limit, A (>= 0)
    cvl: float  # charge voltage limit, V
    allow_to_charge: int  # 0/1
    allow_to_discharge: int  # 0/1
    charge_mode: str  # "Bulk" | "Absorption" | "Float"


# ---------------------------------------------------------------------------
# Pack
# ---------------------------------------------------------------------------


class Pack:
    """Mutable state of one simulated pack."""

    def __init__(self, params: PackParams, seed: int = 0, ambient_c: float = AMBIENT_C) -> None:
        self.params = params
        self.ambient_c = float(ambient_c)
        self.soc = float(min(100.0, max(0.0, params.soc)))
        self.temperature_c = float(params.temperature_c)
        self.current = 0.0
        self.consumed_ah = 0.0
        self.charged_energy_kwh = 0.0
        self.discharged_energy_kwh = 0.0
        self.total_ah_drawn = 0.0
        self.charge_cycles = 0.0
        self.forced_fets_open = False
        self.charge_fet_on = True
        self.discharge_fet_on = True
        # Deterministic per-pack "personality" (cell spread factor and cell ids).
        h = zlib.crc32(f"{seed}:{params.service}:{params.name}".encode())
        self._spread_factor = 0.7 + 0.6 * ((h & 0xFFFF) / 0xFFFF)
        n = params.cells_series
        self._min_cell = 1 + (h >> 16) % n
        self._max_cell = 1 + ((h >> 16) // n + self._min_cell) % n if n > 1 else 1
        if self._max_cell == self._min_cell and n > 1:
            self._max_cell = self._min_cell % n + 1
        self._min_temp_cell = 1 + (h >> 8) % n
        self._max_temp_cell = 1 + (self._min_temp_cell + n // 2) % n if n > 1 else 1
        self._update_consumed()
        self.refresh_fets()
        self.voltage = self.ocv()

    # -- derived quantities -------------------------------------------------

    @property
    def name(self) -> str:
        return self.params.name

    @property
    def service(self) -> str:
        return self.params.service

    @property
    def capacity_eff_ah(self) -> float:
        return self.params.capacity_eff_ah

    @property
    def remaining_ah(self) -> float:
        return self.soc / 100.0 * self.capacity_eff_ah

    def ocv(self) -> float:
        """Pack open-circuit voltage (V)."""
        return self.params.cells_series * cell_ocv(self.soc)

    def resistance(self) -> float:
        """Internal resistance (ohm), raised at low SoC and low temperature."""
        base = self.params.r_mohm / 1000.0
        soc_factor = 1.0 + max(0.0, (15.0 - self.soc) / 15.0)  # x2 at 0 %
        t_k = max(-30.0, self.temperature_c) + 273.15
        # Arrhenius-like: x2 at 0 degC relative to 25 degC, never below 1.
        k = math.log(2.0) / (1.0 / 273.15 - 1.0 / 298.15)
        temp_factor = max(1.0, math.exp(k * (1.0 / t_k - 1.0 / 298.15)))
        return base * soc_factor * temp_factor

    def limits(self) -> PackLimits:
        p = self.params
        t = self.temperature_c
        if self.soc >= 99.99:
            ccl_soc = 0.0
        elif self.soc > 90.0:
            ccl_soc = 1.0 - 0.95 * (self.soc - 90.0) / 10.0  # 1 -> 0.05
        else:
            ccl_soc = 1.0
        ccl_temp = _ramp(t, 0.0, 5.0) * (1.0 - _ramp(t, 45.0, 55.0))
        dcl_soc = _ramp(self.soc, 0.0, 15.0)
        dcl_temp = _ramp(t, -20.0, -10.0) * (1.0 - _ramp(t, 45.0, 60.0))
        ccl = float(p.max_charge_current) * ccl_soc * ccl_temp
        dcl = float(p.max_discharge_current) * dcl_soc * dcl_temp
        if self.forced_fets_open:
            ccl = dcl = 0.0
        if self.soc >= 99.5:
            mode = "Float"
        elif self.soc >= 95.0:
            mode = "Absorption"
        else:
            mode = "Bulk"
        return PackLimits(
            ccl=ccl,
            dcl=dcl,
            cvl=p.cells_series * p.charge_voltage_per_cell,
            allow_to_charge=int(ccl > 0 and not self.forced_fets_open),
            allow_to_discharge=int(dcl > 0 and not self.forced_fets_open),
            charge_mode=mode,
        )

    def refresh_fets(self) -> None:
        """Open/close the FETs the way the BMS does, from the allow flags."""
        lim = self.limits()
        self.charge_fet_on = bool(lim.allow_to_charge)
        self.discharge_fet_on = bool(lim.allow_to_discharge)

    # -- time evolution -------------------------------------------------------

    def _update_consumed(self) -> None:
        self.consumed_ah = -(100.0 - self.soc) / 100.0 * self.capacity_eff_ah

    def step(self, current: float, dt: float) -> None:
        """Advance ``dt`` seconds carrying ``current`` A (+ = charging)."""
        current = float(current)
        dt = float(dt)
        if not math.isfinite(current) or not math.isfinite(dt) or dt < 0:
            raise ValueError(f"bad step current={current!r} dt={dt!r}")
        r = self.resistance()
        v_term = self.ocv() + current * r
        ah = current * dt / 3600.0
        cap = self.capacity_eff_ah
        self.soc = min(100.0, max(0.0, self.soc + ah / cap * 100.0))
        self._update_consumed()
        if current > 0:
            self.charged_energy_kwh += v_term * ah / 1000.0
        elif current < 0:
            self.discharged_energy_kwh += v_term * (-ah) / 1000.0
            self.total_ah_drawn += -ah
            self.charge_cycles = self.total_ah_drawn / self.params.capacity_ah
        # Thermal: exact solution of dT/dt = P/C - (T - T_amb)/tau over dt.
        heat_cap = HEAT_CAPACITY_J_PER_K_PER_AH_CELL * self.params.capacity_ah * self.params.cells_series
        t_ss = self.ambient_c + current * current * r * THERMAL_TAU_S / heat_cap
        self.temperature_c = t_ss + (self.temperature_c - t_ss) * math.exp(-dt / THERMAL_TAU_S)
        self.current = current
        self.voltage = self.ocv() + current * self.resistance()

    # -- D-Bus view -------------------------------------------------------------

    def cell_voltages(self) -> tuple[float, float]:
        """(min, max) cell voltage in V: terminal average -/+ a deterministic spread."""
        n = self.params.cells_series
        avg = self.voltage / n
        extreme = 3.0 * _ramp(self.soc, 90.0, 100.0) + 3.0 * (1.0 - _ramp(self.soc, 0.0, 10.0))
        spread = self.params.cell_spread_mv * self._spread_factor * (1.0 + extreme) / 1000.0
        if n == 1:
            return avg, avg
        return avg - 0.45 * spread, avg + 0.55 * spread

    def values(self) -> dict[str, Any]:
        """All D-Bus paths of a battery BMS service, as plain Python values."""
        p = self.params
        lim = self.limits()
        n = p.cells_series
        v = self.voltage
        i = self.current
        time_to_go = int(round(self.remaining_ah / -i * 3600.0)) if i < -0.05 else None
        vmin, vmax = self.cell_voltages()
        out: dict[str, Any] = {
            "/Dc/0/Voltage": round(v, 2),
            "/Dc/0/Current": round(i, 1),
            "/Dc/0/Power": round(v * i, 1),
            "/Dc/0/Temperature": round(self.temperature_c, 1),
            "/Soc": round(self.soc, 1),
            "/Soh": round(p.soh, 1),
            "/Capacity": round(self.remaining_ah, 1),
            "/InstalledCapacity": round(p.capacity_ah, 1),
            "/ConsumedAmphours": round(self.consumed_ah, 1),
            "/TimeToGo": time_to_go,
            "/Info/MaxChargeCurrent": round(lim.ccl, 1),
            "/Info/MaxDischargeCurrent": round(lim.dcl, 1),
            "/Info/MaxChargeVoltage": round(lim.cvl, 2),
            "/Info/BatteryLowVoltage": round(n * 2.9, 2),
            "/Info/ChargeMode": lim.charge_mode,
            "/Io/AllowToCharge": lim.allow_to_charge,
            "/Io/AllowToDischarge": lim.allow_to_discharge,
            "/Io/AllowToBalance": 1,
            "/Balancing": int(self.soc > 97.0 and i > 0),
        }
        out.update(self._system_values(lim, vmin, vmax))
        out.update(self._alarm_values(lim, vmin, vmax))
        out.update({
            "/History/ChargedEnergy": round(self.charged_energy_kwh, 3),
            "/History/DischargedEnergy": round(self.discharged_energy_kwh, 3),
            "/History/TotalAhDrawn": round(self.total_ah_drawn, 1),
            "/History/ChargeCycles": int(self.charge_cycles),
            "/Serial": p.serial,
            "/CustomName": p.custom_name,
            "/ProductName": p.product_name,
        })
        return out

    def _system_values(self, lim: PackLimits, vmin: float, vmax: float) -> dict[str, Any]:
        """/System/*: the cells' extremes and the modules."""
        t = self.temperature_c
        t_span = 0.5 + 2.0 * min(1.0, abs(self.current) / self.params.capacity_ah)
        return {
            "/System/MinCellVoltage": round(vmin, 3),
            "/System/MaxCellVoltage": round(vmax, 3),
            "/System/MinVoltageCellId": f"C{self._min_cell}",
            "/System/MaxVoltageCellId": f"C{self._max_cell}",
            "/System/MinCellTemperature": round(t - 0.3 * t_span, 1),
            "/System/MaxCellTemperature": round(t + 0.7 * t_span, 1),
            "/System/MinTemperatureCellId": f"C{self._min_temp_cell}",
            "/System/MaxTemperatureCellId": f"C{self._max_temp_cell}",
            "/System/NrOfModulesOnline": 1,
            "/System/NrOfModulesOffline": 0,
            "/System/NrOfModulesBlockingCharge": 0 if lim.allow_to_charge else 1,
            "/System/NrOfModulesBlockingDischarge": 0 if lim.allow_to_discharge else 1,
            "/System/NrOfCellsPerBattery": self.params.cells_series,
        }

    def _alarm_values(self, lim: PackLimits, vmin: float, vmax: float) -> dict[str, Any]:
        """/Alarms/*: 2 alarm, 1 warning, 0 ok."""
        p = self.params
        n, v, i, t = p.cells_series, self.voltage, self.current, self.temperature_c
        spread_mv = (vmax - vmin) * 1000.0
        mcc = float(p.max_charge_current)
        mdc = float(p.max_discharge_current)

        def lvl(bad: bool, warn: bool) -> int:
            return 2 if bad else (1 if warn else 0)

        return {
            "/Alarms/LowVoltage": lvl(v < n * 2.8, v < n * 3.0),
            "/Alarms/HighVoltage": lvl(v > n * 3.65, v > n * 3.55),
            "/Alarms/LowSoc": lvl(self.soc < 5.0, self.soc < 10.0),
            "/Alarms/HighChargeCurrent": lvl(i > 1.2 * mcc, i > lim.ccl + max(1.0, 0.05 * mcc)),
            "/Alarms/HighDischargeCurrent": lvl(-i > 1.2 * mdc, -i > lim.dcl + max(1.0, 0.05 * mdc)),
            "/Alarms/CellImbalance": lvl(spread_mv > 100.0, spread_mv > 50.0),
            "/Alarms/LowCellVoltage": lvl(vmin < 2.8, vmin < 3.0),
            "/Alarms/HighCellVoltage": lvl(vmax > 3.65, vmax > 3.6),
            "/Alarms/LowTemperature": lvl(t <= -10.0, t < 3.0),
            "/Alarms/HighTemperature": lvl(t > 55.0, t > 45.0),
            "/Alarms/InternalFailure": 2 if self.forced_fets_open else 0,
        }

    def __repr__(self) -> str:
        return (
            f"Pack({self.service!r}, soc={self.soc:.2f}, V={self.voltage:.3f}, "
            f"I={self.current:.2f}, T={self.temperature_c:.1f})"
        )


# ---------------------------------------------------------------------------
# Bank of packs in parallel
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BankState:
    voltage: float  # bus voltage, V
    currents: list[float] = field(default_factory=list)  # per pack, + = charging
    i_actual: float = 0.0  # sum of currents actually flowing


class Bank:
    """Packs in parallel on one bus: V = OCV_k + I_k*R_k for each conducting pack.

    A pack whose charge FET is off only allows I_k <= 0, one whose discharge FET
    is off only allows I_k >= 0 (both off: I_k = 0). The per-pack current as a
    function of the bus voltage is then monotone piecewise linear, so the bus
    voltage is found exactly by locating the segment where the sum equals the
    requested total.
    """

    max_substep_s: float = 5.0
    max_substeps: int = 400

    def __init__(self, packs: Sequence[Pack]) -> None:
        if not packs:
            raise ValueError("a bank needs at least one pack")
        self.packs: list[Pack] = list(packs)
        self.voltage = sum(p.voltage for p in self.packs) / len(self.packs)

    def pack(self, service: str) -> Pack:
        for p in self.packs:
            if p.service == service:
                return p
        raise KeyError(service)

    @staticmethod
    def _current(v: float, e: float, g: float, chg: bool, dis: bool) -> float:
        i = (v - e) * g
        if not chg and i > 0:
            return 0.0
        if not dis and i < 0:
            return 0.0
        return i

    def solve(self, i_total: float) -> BankState:
        """Split ``i_total`` (A, + = charging) among the packs; does not step them.

        FET states are refreshed from each pack's ``limits()`` allow flags.
        """
        i_total = float(i_total)
        for p in self.packs:
            p.refresh_fets()
        e = [p.ocv() for p in self.packs]
        g = [1.0 / p.resistance() for p in self.packs]
        chg = [p.charge_fet_on for p in self.packs]
        dis = [p.discharge_fet_on for p in self.packs]
        n = len(self.packs)
        mean_ocv = sum(e) / n

        can_sink = any(chg)
        can_source = any(dis)
        if (i_total > 0 and not can_sink) or (i_total < 0 and not can_source) or not (can_sink or can_source):
            return BankState(voltage=mean_ocv, currents=[0.0] * n, i_actual=0.0)

        def total(v: float) -> float:
            return sum(self._current(v, e[k], g[k], chg[k], dis[k]) for k in range(n))

        def linear_solve(v_probe: float) -> float | None:
            # Packs conducting around v_probe behave linearly in that segment.
            gs = 0.0
            ges = 0.0
            for k in range(n):
                i = (v_probe - e[k]) * g[k]
                if (chg[k] and dis[k]) or (chg[k] and i > 0) or (dis[k] and i < 0):
                    gs += g[k]
                    ges += g[k] * e[k]
            if gs == 0.0:
                return None
            return (i_total + ges) / gs

        breaks = sorted({e[k] for k in range(n) if not (chg[k] and dis[k])})
        v: float | None = None
        if not breaks:
            v = linear_solve(0.0)
        else:
            lo = -math.inf
            for b in breaks:
                if total(b) >= i_total:
                    probe = b - 1.0 if lo == -math.inf else 0.5 * (lo + b)
                    v = linear_solve(probe)
                    if v is None:
                        v = b
                    break
                lo = b
            else:
                v = linear_solve(breaks[-1] + 1.0)
        if v is None:  # pragma: no cover - excluded by the reachability checks above
            return BankState(voltage=mean_ocv, currents=[0.0] * n, i_actual=0.0)
        currents = [self._current(v, e[k], g[k], chg[k], dis[k]) for k in range(n)]
        return BankState(voltage=v, currents=currents, i_actual=sum(currents))

    def step(self, i_total: float, dt: float) -> BankState:
        """Solve the split for ``i_total`` then advance every pack by ``dt`` s.

        Long steps are split into sub-steps of at most ``max_substep_s`` (at most
        ``max_substeps`` of them) so that circulating currents between packs near
        full/empty, where the OCV curve is steep, stay stable. With one sub-step
        the returned state is the solve result; otherwise currents and i_actual
        are the time averages over the step and voltage is the last bus voltage.
        """
        dt = float(dt)
        n_sub = 1
        if dt > self.max_substep_s:
            n_sub = min(self.max_substeps, math.ceil(dt / self.max_substep_s))
        h = dt / n_sub
        sums = [0.0] * len(self.packs)
        state = BankState(voltage=self.voltage, currents=[0.0] * len(self.packs), i_actual=0.0)
        for _ in range(n_sub):
            state = self.solve(i_total)
            for k, (p, i) in enumerate(zip(self.packs, state.currents)):
                p.step(i, h)
                sums[k] += i
        self.voltage = state.voltage
        if n_sub == 1:
            return state
        avg = [s / n_sub for s in sums]
        return BankState(voltage=state.voltage, currents=avg, i_actual=sum(avg))


# ---------------------------------------------------------------------------
# Load / charge profiles: pure functions of simulated time t (s) -> bank current (A)
# ---------------------------------------------------------------------------

Profile = Callable[[float], float]


def constant(current: float) -> Profile:
    c = float(current)
    return lambda t: c


def steps(points: Sequence[Sequence[float]], period: float | None = None) -> Profile:
    """Piecewise-constant current: ``[[t, current], ...]`` sorted by t, holding the last.

    Before the first time the current is 0. With ``period`` the pattern repeats
    (t is taken modulo period).
    """
    pts = sorted((float(a), float(b)) for a, b in points)
    if not pts:
        raise ValueError("steps profile needs at least one [t, current] point")
    times = [a for a, _ in pts]
    vals = [b for _, b in pts]
    per = float(period) if period else None

    def f(t: float) -> float:
        if per:
            t = t % per
        idx = -1
        for k, tk in enumerate(times):
            if tk <= t:
                idx = k
            else:
                break
        return vals[idx] if idx >= 0 else 0.0

    return f


def daily(
    solar_peak_a: float,
    load_a: float,
    day_seconds: float = 86400.0,
    start_hour: float = 0.0,
) -> Profile:
    """Net bank current over a day: half-sine solar 06:00-18:00 minus a load with
    morning (~07:30) and evening (~19:30) bumps. ``t`` = 0 is ``start_hour``."""
    peak = float(solar_peak_a)
    base = float(load_a)
    day = float(day_seconds)
    h0 = float(start_hour)

    def f(t: float) -> float:
        h = (h0 + t / day * 24.0) % 24.0
        solar = peak * math.sin(math.pi * (h - 6.0) / 12.0) if 6.0 <= h <= 18.0 else 0.0
        bump = 0.8 * math.exp(-(((h - 7.5) / 1.0) ** 2)) + 1.5 * math.exp(-(((h - 19.5) / 1.5) ** 2))
        return solar - base * (1.0 + bump)

    return f


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def make_profile(profile_model: Any) -> Profile:
    """Build a profile from a scenario profile model (or an equivalent dict)."""
    kind = _get(profile_model, "kind")
    if kind == "constant":
        return constant(_get(profile_model, "current", 0.0))
    if kind == "steps":
        return steps(_get(profile_model, "steps"), _get(profile_model, "period"))
    if kind == "daily":
        return daily(
            _get(profile_model, "solar_peak_a", 0.0),
            _get(profile_model, "load_a", 0.0),
            _get(profile_model, "day_seconds", 86400.0),
            _get(profile_model, "start_hour", 0.0),
        )
    raise ValueError(f"unknown profile kind {kind!r}; allowed: 'constant', 'steps', 'daily'")
