"""A live table of the battery services on the bus, for the demo (and later `status --watch`)."""
from __future__ import annotations

import textwrap
from typing import Any, Iterable

from .bus.monitor import WatchedService

AGGREGATE_PRODUCT = "Battery Aggregator"
VIRTUAL_PRODUCT = "Virtual Battery"
GRID_PRODUCT = "Grid battery"
WIDTH = 100  # the screen fits a terminal of 100 columns (every row would wrap otherwise)

# (title, width, numeric): numbers are right-aligned, text is cut to its width so the columns stay put
_COLUMNS = (
    ("Service", 18, False), ("Name", 15, False), ("SoC", 6, True), ("Voltage", 7, True), ("Current", 7, True),
    ("Power", 6, True), ("Temp", 4, True), ("CCL", 5, True), ("DCL", 5, True), ("Mode", 10, False),
    ("State", 6, False),
)


def _num(value: Any, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "---" if value is None else str(value)[:7]
    return fmt.format(value)


def member_states(services: Iterable[WatchedService]) -> dict[str, str]:
    """service name -> its State as the aggregates' rows say (online, stale, lost, duplicate). Victron services
    signal only changes, so how long a service has been quiet says nothing: the aggregate asks, we read it."""
    states: dict[str, str] = {}
    for service in services:
        v = service.values
        if v.get("/ProductName") != AGGREGATE_PRODUCT:
            continue
        for path, name in v.items():
            if path.startswith("/Batteries/") and path.endswith("/Service") and isinstance(name, str):
                state = v.get(path[:-len("Service")] + "State")
                if isinstance(state, str):
                    states[name] = state
    return states


def member_row(service: WatchedService, state: str | None = None) -> list[str]:
    """One row; `state` is what the aggregate says of it, else whether it says it has its device."""
    v = service.values
    if state is None:
        state = "online" if v.get("/Connected") != 0 else "no device"
    return [
        service.name.removeprefix("com.victronenergy."),
        str(v.get("/CustomName") or v.get("/ProductName") or ""),
        _num(v.get("/Soc"), "{:.1f}%"),
        _num(v.get("/Dc/0/Voltage"), "{:.2f}V"),
        _num(v.get("/Dc/0/Current"), "{:+.1f}A"),
        _num(v.get("/Dc/0/Power"), "{:+.0f}W"),
        _num(v.get("/Dc/0/Temperature"), "{:.0f}C"),
        _num(v.get("/Info/MaxChargeCurrent"), "{:.0f}A"),
        _num(v.get("/Info/MaxDischargeCurrent"), "{:.0f}A"),
        str(v.get("/Info/ChargeMode") or "---"),
        state,
    ]


def _fit(cell: str, width: int, numeric: bool) -> str:
    if len(cell) > width:
        return cell if numeric else cell[:width - 1] + "…"  # a long number is shown whole: never a wrong value
    return cell.rjust(width) if numeric else cell.ljust(width)


def format_row(cells: list[str]) -> str:
    return " ".join(_fit(cell, width, numeric) for cell, (_, width, numeric) in zip(cells, _COLUMNS)).rstrip()


def wrap(text: str) -> list[str]:
    """A line of prose within WIDTH columns (continued lines indented)."""
    return textwrap.wrap(text, WIDTH, subsequent_indent="  ", break_on_hyphens=False) or [""]


def render(services: Iterable[WatchedService], bank: dict[str, Any] | None, title: str) -> str:
    """The whole screen as text: batteries on the bus, then virtual batteries, then the aggregate, then the
    simulator's truth. A member's State is the aggregate's (online, stale, lost, duplicate)."""
    services = list(services)
    states = member_states(services)
    header = format_row([name for name, _, _ in _COLUMNS])
    rule = "-" * len(" ".join(name.ljust(width) for name, width, _ in _COLUMNS))
    lines = [*wrap(title), "", header, rule]
    def rank(s: WatchedService) -> tuple[int, str]:
        product = s.values.get("/ProductName")
        return (3 if product == AGGREGATE_PRODUCT else 2 if product == GRID_PRODUCT
                else 1 if product == VIRTUAL_PRODUCT else 0, s.name)

    services = sorted(services, key=rank)
    if not services:
        lines.append("(no battery services on the bus yet)")
    previous_rank = 0
    for service in services:
        if rank(service)[0] != previous_rank:
            lines.append(rule)
            previous_rank = rank(service)[0]
        row = member_row(service, states.get(service.name))
        lines.append(format_row(row))
    lines += summary_lines(services)
    if bank:
        lines += ["", *wrap("Simulator (the physical truth): bus {} at {}, requested {}, simulated time {}".format(
            _num(bank.get("/Bank/Voltage"), "{:.2f}V"), _num(bank.get("/Bank/Current"), "{:+.1f}A"),
            _num(bank.get("/Bank/RequestedCurrent"), "{:+.1f}A"), _num(bank.get("/SimTime"), "{:.0f}s")))]
        faults = [f"{p.split('/')[2]}: {v}" for p, v in sorted(bank.items()) if p.endswith("/Fault") and v]
        if faults:
            lines += wrap("Faults: " + ", ".join(faults))
    return "\n".join(lines)


def summary_lines(services: Iterable[WatchedService]) -> list[str]:
    """Below the table: each aggregate's charge limit and status in words, its energy totals and levels, and the
    grid batteries' levels."""
    lines: list[str] = []
    for service in services:
        v = service.values
        product = v.get("/ProductName")
        if product == AGGREGATE_PRODUCT:
            name = service.name.removeprefix("com.victronenergy.")
            lines += wrap(f"Charge limit of {name}: {v.get('/Info/ChargeLimitation') or '---'}")
            lines += wrap(f"Status of {name}: {v.get('/Aggregator/Status') or '---'}")
        if product == AGGREGATE_PRODUCT and "/Energy/Status" in v:
            text = "Energy of {}: charged {}, discharged {}; level {} (capacity-weighted), {} (average); {}"
            lines += wrap(text.format(
                service.name.removeprefix("com.victronenergy."), _num(v.get("/History/ChargedEnergy"), "{:.3f} kWh"),
                _num(v.get("/History/DischargedEnergy"), "{:.3f} kWh"),
                _num(v.get("/Energy/CapacityWeightedSoc"), "{:.1f}%"), _num(v.get("/Energy/AverageSoc"), "{:.1f}%"),
                v.get("/Energy/Status") or "---"))
        elif product == GRID_PRODUCT:
            lines += wrap("Grid battery {}: level {} ({}), exported {}, imported {}; {}".format(
                service.name.removeprefix("com.victronenergy."), _num(v.get("/GridBattery/LevelKwh"), "{:.2f} kWh"),
                _num(v.get("/Soc"), "{:.1f}%"), _num(v.get("/History/ChargedEnergy"), "{:.2f} kWh"),
                _num(v.get("/History/DischargedEnergy"), "{:.2f} kWh"), v.get("/GridBattery/Status") or "---"))
    return [""] + lines if lines else []


def _rows(values: dict[str, Any], prefix: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The numbered rows under `prefix` (/Energy/External/<k>/..., /Dispatcher/Batteries/<i>/...) as dicts."""
    rows: dict[int, dict[str, Any]] = {}
    for path, value in values.items():
        if path.startswith(prefix):
            index, _, key = path[len(prefix):].partition("/")
            if index.isdigit() and key in keys:
                rows.setdefault(int(index), {})[key] = value
    return [rows[i] for i in sorted(rows)]


def external_lines(values: dict[str, Any], last_reports: str) -> list[str]:
    """The batteries reported from outside D-Bus, as the aggregate counts them, and how the last reports went."""
    lines = ["", f"Energy reports (every few seconds; last answers: {last_reports[:160]})"]
    rows = [r for r in _rows(values, "/Energy/External/", ("Id", "State", "Soc", "ChargedEnergy",
                                                           "DischargedEnergy")) if r.get("Id")]
    for r in rows:
        lines.append("  {:<12} {:<8} level {}, charged {}, discharged {}".format(
            str(r["Id"])[:12], str(r.get("State") or "---")[:8], _num(r.get("Soc"), "{:.2f}%"),
            _num(r.get("ChargedEnergy"), "{:.4f} kWh"), _num(r.get("DischargedEnergy"), "{:.4f} kWh")))
    if not rows:
        lines.append("  (none counted yet)")
    return lines


def dispatcher_lines(values: dict[str, Any]) -> list[str]:
    """The dispatcher's target, what the batteries achieve, and what it learned of each."""
    if "/Dispatcher/TargetPower" not in values:
        return ["", "Dispatcher: not running yet"]
    lines = ["", "Dispatcher: target {}, achieved {} ({}); {}".format(
        _num(values.get("/Dispatcher/TargetPower"), "{:+.0f} W"), _num(values.get("/Dispatcher/AchievedPower"),
                                                                       "{:+.0f} W"),
        "saturated" if values.get("/Dispatcher/Saturated") else "within the limits",
        str(values.get("/Dispatcher/Status") or "---")[:80])]
    for r in _rows(values, "/Dispatcher/Batteries/", ("Name", "Setpoint", "Measured", "Gain", "ChargeLimit",
                                                        "DischargeLimit", "Status")):
        lines.append("  {:<12} asked {:>8}, gives {:>8}, gain {}, limits +{} / -{}; {}".format(
            str(r.get("Name"))[:12], _num(r.get("Setpoint"), "{:+.0f} W"), _num(r.get("Measured"), "{:+.0f} W"),
            _num(r.get("Gain"), "{:.2f}"), _num(r.get("ChargeLimit"), "{:.0f} W"),
            _num(r.get("DischargeLimit"), "{:.0f} W"), str(r.get("Status") or "---")[:40]))
    return lines


def coop_lines(sites: dict[str, dict[str, Any]], broker_port: int) -> list[str]:
    """Each household of the cooperative as its own GX shows it (/Coop/* of its aggregate)."""
    averages = {round(v["/Coop/AverageLevel"], 1) for v in sites.values()
                if isinstance(v.get("/Coop/AverageLevel"), (int, float))}
    lines = ["", "Cooperative: {} households on one broker (127.0.0.1:{}), fleet average {}".format(
        len(sites), broker_port, " / ".join(f"{a:.1f}%" for a in sorted(averages)) or "---"),
        "  {:<10} {:>7} {:>9} {:>9} {:>9} {:>5}  {}".format("site", "level", "battery", "target", "transfer",
                                                           "peers", "status")]
    for name, v in sorted(sites.items()):
        lines.append("  {:<10} {:>7} {:>9} {:>9} {:>9} {:>5}  {}".format(
            name[:10], _num(v.get("/Coop/OwnLevel"), "{:.1f}%"), _num(v.get("/Dc/0/Power"), "{:+.0f}W"),
            _num(v.get("/Coop/OwnTarget"), "{:+.0f}W"), _num(v.get("/Coop/Transfer"), "{:+.0f}W"),
            _num(v.get("/Coop/PeersOnline"), "{:.0f}"), str(v.get("/Coop/Status") or "starting")[:70]))
    return lines
