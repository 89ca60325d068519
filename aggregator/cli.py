"""The command line: `battery-aggregator <command>` (also `python -m aggregator <command>`)."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys
from typing import Any, Callable, Coroutine

from . import __version__

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_BUS_HINT = ("On a GX these commands use the system bus there; for `./run.sh demo`, first export the "
             "DBUS_SESSION_BUS_ADDRESS the demo shows.")


def _on_bus(command: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command that talks to the bus; no bus is a message (which bus, what to do), not a traceback."""
    import asyncio

    from .bus.lib import BusUnreachable

    try:
        return asyncio.run(main())
    except BusUnreachable as exc:
        print(f"battery-aggregator {command}: {exc}. {_BUS_HINT}", file=sys.stderr)
        return 1


def _cmd_run(args: argparse.Namespace) -> int:
    from .host.config_check import load_first

    logging.basicConfig(level=args.log_level or "INFO", format=_LOG_FORMAT)
    first = load_first(args.config)  # before asyncio is loaded: what it loads may depend on the config (lean.py)
    import asyncio

    from .host.daemon import run

    return asyncio.run(run(args.config, exit_delay=args.exit_delay, log_level=args.log_level, first=first))


def _without_dev_tools(command: str) -> bool:
    """The simulator and the demo are development tools: a GX install does not have them. Says so (True)."""
    if importlib.util.find_spec("aggregator_dev") is not None:
        return False
    print(f"battery-aggregator {command}: a development tool, not part of this install; run it from a checkout "
          "of the project (./run.sh setup)", file=sys.stderr)
    return True


def _cmd_simulate(args: argparse.Namespace) -> int:
    if _without_dev_tools("simulate"):
        return 2
    from aggregator_dev.simulator.bus_bank import simulate
    from aggregator_dev.simulator.scenario import ScenarioError, load_scenario, with_pack_count

    logging.basicConfig(level=args.log_level or "INFO", format=_LOG_FORMAT)
    try:
        scenario = load_scenario(args.scenario)
        if args.packs:
            scenario = with_pack_count(scenario, args.packs)
        updates = {k: v for k, v in (("rate_hz", args.rate), ("time_scale", args.time_scale)) if v is not None}
        if updates:
            scenario = type(scenario).model_validate({**scenario.model_dump(), **updates})
    except (ScenarioError, ValueError) as exc:
        print(f"battery-aggregator simulate: {exc}", file=sys.stderr)
        return 1

    import asyncio

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await simulate(scenario, stop)

    asyncio.run(main())
    return 0


def _cmd_fault(args: argparse.Namespace) -> int:
    if _without_dev_tools("fault"):
        return 2
    from aggregator_dev.simulator.bus_bank import CONTROL_SERVICE

    from .bus import client
    from .bus.lib import connect

    async def main() -> int:
        bus = await connect()
        try:
            base = f"/Packs/{args.pack}"
            await client.set_value(bus, CONTROL_SERVICE, base + "/FaultDuration", float(args.duration or 0))
            kind = "" if args.kind == "clear" else args.kind
            code = await client.set_value(bus, CONTROL_SERVICE, base + "/Fault", kind)
        except client.CallError as exc:
            print(f"battery-aggregator fault: {exc} (is the simulator running?)", file=sys.stderr)
            return 1
        finally:
            bus.disconnect()
        if code != 0:
            print(f"battery-aggregator fault: the simulator refused {args.kind!r} (code {code})", file=sys.stderr)
        return 0 if code == 0 else 1

    return _on_bus("fault", main)


def _cmd_demo(args: argparse.Namespace) -> int:
    if _without_dev_tools("demo"):
        return 2
    from aggregator_dev.demo import main

    logging.basicConfig(level="WARNING", format=_LOG_FORMAT)
    return main(args.scenario, args.duration, args.refresh, everything=args.all, report_every=args.report_every)


def device_warnings(config: Any, installed: Callable[[str], bool]) -> list[str]:
    """What a valid config asks of this device that it cannot do, an optional package being missing here."""
    warnings = []
    if not installed("numpy"):
        if config.currentRatioMethod == "ir":
            warnings.append('currentRatioMethod is "ir", but numpy is not installed on this device: the IR '
                            "estimator is off and the shares fall back to capacity (32-bit ARM GX devices have "
                            'no numpy; "share" learns the split from the measured currents)')
        if config.dispatcher.batteries:
            warnings.append("dispatcher.batteries is set, but numpy is not installed on this device: the "
                            "dispatcher does not run")
    if not installed("aiomqtt") and config.coop.enabled:
        warnings.append("coop.enabled is true, but aiomqtt is not installed on this device: the cooperative "
                        "does not run")
    return warnings


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cmd_check(args: argparse.Namespace) -> int:
    from .config import DEFAULT_CONFIG_PATH, check_config_file

    path = args.path or DEFAULT_CONFIG_PATH
    result = check_config_file(path)
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.config is None:
        for error in result.errors:
            print(f"error: {error}")
        print(f"{path}: {len(result.errors)} error(s)")
        return 1
    for warning in device_warnings(result.config, _installed):
        print(f"warning: {warning}")
    print("OK")
    if args.live:
        from .live import print_live_roles

        config = result.config
        return _on_bus("check --live", lambda: print_live_roles(config))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import status

    try:
        return _on_bus("status", lambda: status(args.service, args.watch, args.interval))
    except KeyboardInterrupt:
        return 0


def _cmd_dump(args: argparse.Namespace) -> int:
    from .status import dump

    return _on_bus("dump", lambda: dump(args.file))


def _cmd_schema(args: argparse.Namespace) -> int:
    from .schema import DOCS_FILE, SCHEMA_FILE, config_reference, schema_text

    outputs = [(SCHEMA_FILE, schema_text()), (DOCS_FILE, config_reference())]
    if args.check:
        stale = [path for path, text in outputs if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path} differs from the config model: run `battery-aggregator schema --write`", file=sys.stderr)
        if stale:
            return 1
        print("config.schema.json and docs/configuration.md are up to date")
        return 0
    if args.write:
        for path, text in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
        return 0
    sys.stdout.write(outputs[1][1] if args.docs else outputs[0][1])
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .bus import client
    from .bus.lib import Variant, connect
    from .features.energy.core import ReportError
    from .features.energy.report import parse_report
    from .features.energy.runtime import ENERGY_INTERFACE

    if args.remove is not None:
        if args.id is not None or any(v is not None for v in (args.charged, args.discharged, args.soc,
                                                               args.capacity)) or args.reset:
            print("battery-aggregator report: --remove ID takes nothing else (report --remove shed)", file=sys.stderr)
            return 1
        method, signature, call_body = "Remove", "s", [args.remove]
    else:
        missing = [f"--{k}" for k in ("charged", "discharged", "soc") if getattr(args, k) is None]
        if args.id is None or missing:
            print("battery-aggregator report: give ID --charged KWH --discharged KWH --soc PCT, or --remove ID"
                  + (f" (missing: {', '.join((['ID'] if args.id is None else []) + missing)})"), file=sys.stderr)
            return 1
        fields = {"id": args.id, "charged": args.charged, "discharged": args.discharged, "soc": args.soc,
                  "capacity": args.capacity, "reset": args.reset}
        try:
            checked = parse_report(**fields)  # the service checks again; this names a mistake without a bus
        except ReportError as exc:
            print(f"battery-aggregator report: {exc}", file=sys.stderr)
            return 1
        body = {"id": Variant("s", checked.id), "charged": Variant("d", checked.charged),
                "discharged": Variant("d", checked.discharged), "soc": Variant("d", checked.soc),
                "reset": Variant("b", checked.reset)}
        if checked.capacity is not None:
            body["capacity"] = Variant("d", checked.capacity)
        method, signature, call_body = "Report", "a{sv}", [body]

    async def main() -> int:
        bus = await connect()
        try:
            reply = await client.call(bus, args.service, "/", method, signature, call_body,
                                      interface=ENERGY_INTERFACE)
        except client.CallError as exc:
            hint = " (is the aggregator running?)" if exc.error_name in ("timeout", "connection") or \
                "ServiceUnknown" in exc.error_name else ""
            reason = str(exc).split(": ", 1)[-1]
            print(f"battery-aggregator report: {reason}{hint}", file=sys.stderr)
            return 1
        finally:
            bus.disconnect()
        print(reply.body[0])
        return 0

    return _on_bus("report", main)


def _state_dir(args: argparse.Namespace) -> str | None:
    """--state-dir, else the config's stateDir; None (after a message) when the config is bad."""
    from .config import ConfigError, load_config

    if args.state_dir:
        return str(args.state_dir)
    try:
        return load_config(args.config).stateDir
    except ConfigError as exc:
        print(f"battery-aggregator: {exc}", file=sys.stderr)
        return None


def _cmd_energy(args: argparse.Namespace) -> int:
    from .features.energy.core import energy_csv
    from .features.energy.runtime import energy_table, load_ledgers

    state_dir = _state_dir(args)
    if state_dir is None:
        return 1
    if args.csv:
        sys.stdout.write(energy_csv(load_ledgers(state_dir)))
        return 0
    table = energy_table(state_dir)
    sys.stdout.write(table if table is not None else f"no energy kept under {state_dir} yet\n")
    return 0


def _cmd_coop(args: argparse.Namespace) -> int:
    from .features.coop.runtime import load_ledger

    state_dir = _state_dir(args)
    if state_dir is None:
        return 1
    ledger = load_ledger(state_dir)
    if args.csv:
        ledger.write_csv(sys.stdout)
        return 0
    if not ledger.accounts:
        print(f"no cooperative metering kept under {state_dir} yet")
        return 0
    print(f"{'site and month':<24} {'P kWh':>9} {'L kWh':>9} {'T kWh':>9} {'V kWh':>9} {'fleet in':>9} "
          f"{'fleet out':>9}")
    for key in sorted(ledger.accounts):
        a = ledger.accounts[key]
        print(f"{key:<24} {a.production:>9.2f} {a.grid_import:>9.2f} {a.grid_export:>9.2f} {a.use:>9.2f} "
              f"{a.transfer_import:>9.2f} {a.transfer_export:>9.2f}")
    return 0


def _cmd_grid_battery(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .features.grid_battery.runtime import grid_state_dir, history_csv, profile_csv
    from .features.grid_battery.settings import GridBatterySettings

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"battery-aggregator grid-battery: {exc}", file=sys.stderr)
        return 1
    state_dir = args.state_dir or config.stateDir
    configured = {g.serviceName: g for g in config.gridBatteries}
    name = args.name or (next(iter(configured)) if len(configured) == 1 else None)
    if name is None:
        names = ", ".join(configured) or "none in the config"
        print(f"battery-aggregator grid-battery: which one? --name SERVICE ({names})", file=sys.stderr)
        return 1
    settings = configured.get(name) or GridBatterySettings(meter=0, startDate="2000-01-01", serviceName=name)
    if args.profile:
        sys.stdout.write(profile_csv(grid_state_dir(state_dir, settings)))
        return 0
    text = history_csv(grid_state_dir(state_dir, settings))
    if args.csv:
        sys.stdout.write(text)
    else:
        rows = text.strip().splitlines()[1:]
        print(f"{name}: {len(rows)} days kept" + (f"; last: {rows[-1]}" if rows else "") +
              " (--csv for the daily levels)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="battery-aggregator",
        description="Merges several batteries into one Victron battery monitor on D-Bus (Venus OS / GX).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the service (on a GX: started by the service supervisor)",
                         description="Run the service: publish the aggregated battery and the virtual batteries of "
                                     "the config. Uses the session bus when DBUS_SESSION_BUS_ADDRESS is set, else "
                                     "the system bus. SIGHUP (or a change of the file) reloads the config; a bad "
                                     "config is logged and the last good one kept.")
    run.add_argument("--config", help="config.json (default /data/setupOptions/BatteryAggregator/config.json; "
                                      "all defaults when that file does not exist)")
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="overrides logLevel")
    run.add_argument("--exit-delay", type=float, default=10.0,
                     help="seconds to wait before exiting when no config is usable, so the supervisor does not "
                          "restart us in a tight loop (default 10)")
    run.set_defaults(func=_cmd_run)

    _add_development_commands(sub)
    _add_inspection_commands(sub)
    _add_record_commands(sub)
    return parser


def _add_development_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """simulate, fault, demo: the development tools (aggregator_dev, not in the GX package)."""
    sim = sub.add_parser("simulate", help="publish a simulated battery bank on D-Bus",
                         description="Publish the packs of a scenario as com.victronenergy.battery.<name> services, "
                                     "driven by physics (parallel LiFePO4 packs). SCENARIO is a name of a bundled "
                                     "scenario (default, solar_day, faults, quiet) or a path to a JSON file. Faults "
                                     "can be injected at run time with `battery-aggregator fault`.")
    sim.add_argument("scenario", nargs="?", default="default", metavar="SCENARIO")
    sim.add_argument("--packs", type=int, help="publish this many packs (the scenario's packs repeated)")
    sim.add_argument("--rate", type=float, help="publish rate in Hz (overrides the scenario)")
    sim.add_argument("--time-scale", type=float, help="simulated seconds per second (overrides the scenario)")
    sim.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sim.set_defaults(func=_cmd_simulate)

    fault = sub.add_parser("fault", help="inject a fault into a running simulator",
                           description="Inject a fault into one pack of a running simulator: quiet (its values "
                                       "stand still: it signals nothing but answers, a battery at rest), freeze (a "
                                       "frozen process: neither signals nor answers), vanish (leaves the bus), invalid "
                                       "(measured values invalid), absurd "
                                       "(NaN, strings, negative capacity, SoC 150), slow (answers calls late), "
                                       "fets_open (the BMS opens its FETs); clear ends all faults of the pack.")
    fault.add_argument("pack", help="the pack's service suffix, e.g. sim_b")
    fault.add_argument("kind", choices=["quiet", "freeze", "vanish", "invalid", "absurd", "slow", "fets_open",
                                        "clear"])
    fault.add_argument("--duration", type=float, help="seconds (default: until cleared)")
    fault.set_defaults(func=_cmd_fault)

    demo = sub.add_parser("demo", help="the whole thing on a private bus with a live view",
                          description="Start a private dbus-daemon, a localsettings stand-in, the simulated bank and "
                                      "the aggregator, and show the batteries live until Ctrl-C. Nothing touches the "
                                      "machine's own D-Bus.")
    demo.add_argument("--scenario", default="default", help="simulator scenario (default: default)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--refresh", type=float, default=1.0, help="seconds between screen updates")
    demo.add_argument("--all", action="store_true", help="the side features too: energy reports arriving, the "
                      "grid battery, the dispatcher following a target, and a cooperative of three households (a "
                      "private bus each) on one mosquitto")
    demo.add_argument("--report-every", type=float, default=5.0, metavar="S",
                      help="with --all: seconds between the energy reports (default 5); each covers 5 s of the "
                           "reporting batteries, so less is a time-lapse")
    demo.set_defaults(func=_cmd_demo)


def _add_inspection_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """check, status, dump, schema: the config and the bus as they are."""
    check = sub.add_parser("check", help="check a config.json (what check_config.sh runs)",
                           description="Validate a config.json against the schema and the semantic checks (a "
                                       "service in two roles, path typos, bad hooks, ...). Prints OK or each error "
                                       "with its key path, value, what is allowed and its line and column; exit "
                                       "status 0 or 1.")
    check.add_argument("path", nargs="?", help="default /data/setupOptions/BatteryAggregator/config.json")
    check.add_argument("--live", action="store_true",
                       help="also list the battery services on the bus and the role each would have")
    check.set_defaults(func=_cmd_check)

    status = sub.add_parser("status", help="the aggregate and a table of its members, from the bus",
                            description="Print the aggregate's values and one line per member (service, name, "
                                        "serial, state, SoC, V, I, share, CCL/DCL, IR) as read from the bus.")
    status.add_argument("--service", help="the aggregate's D-Bus name (default: every aggregate on the bus)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    status.set_defaults(func=_cmd_status)

    dump = sub.add_parser("dump", help="write every battery service's values to a JSON file (bug reports)",
                          description="Read every com.victronenergy.battery.* service on the bus and write its "
                                      "paths and values to FILE (- for standard output).")
    dump.add_argument("file", nargs="?", default="battery-dump.json")
    dump.set_defaults(func=_cmd_dump)

    schema = sub.add_parser("schema", help="print, write or check config.schema.json and docs/configuration.md",
                            description="config.schema.json and the configuration reference docs/configuration.md "
                                        "are generated from the config model in aggregator/config.py. Without "
                                        "options the schema is printed.")
    schema.add_argument("--write", action="store_true", help="write both files in the repo")
    schema.add_argument("--check", action="store_true", help="exit 1 when a committed file is out of date")
    schema.add_argument("--docs", action="store_true", help="print the configuration reference (Markdown)")
    schema.set_defaults(func=_cmd_schema)


def _add_record_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """report, energy, coop, grid-battery: external batteries and what the features keep."""
    report = sub.add_parser("report", help="report a battery that is not on D-Bus (energy and level), or remove one",
                            description="Send the running totals and the level of a battery that is not on D-Bus "
                                        "to the aggregate (its org.batteryaggregator.Energy.Report method). It "
                                        "counts in the energy totals and the levels, never in the DC values; the "
                                        "first report's totals count as its lifetime energy. `report --remove ID` "
                                        "forgets an external battery (its row and its energy). Exit status 1 with "
                                        "the reason when the report is refused.")
    report.add_argument("id", nargs="?", help="the battery's identity: 1 to 64 characters of A-Z a-z 0-9 _ . : -")
    # Numbers are checked by parse_report, which also reads a decimal comma (2010,66) as the battery shows it.
    report.add_argument("--charged", metavar="KWH", help="lifetime charged kWh (2010.66 or 2010,66)")
    report.add_argument("--discharged", metavar="KWH", help="lifetime discharged kWh")
    report.add_argument("--soc", metavar="PCT", help="state of charge, 0 to 100")
    report.add_argument("--remove", metavar="ID", help="forget this external battery: its row, level and energy")
    report.add_argument("--capacity", metavar="AH", help="installed capacity (weights the level)")
    report.add_argument("--reset", action="store_true", help="the counters really restarted (else a step back "
                        "is refused as a delta)")
    report.add_argument("--service", default="com.victronenergy.battery.aggregator", help="the aggregate's name")
    report.set_defaults(func=_cmd_report)

    energy = sub.add_parser("energy", help="charged/discharged kWh per battery and in all, from the saved state",
                            description="Per battery identity: the totals kept by the service (its "
                                        "<stateDir>/energy.json), then the totals over all batteries and the "
                                        "average level as last published; --csv: one row per identity and day.")
    energy.add_argument("--csv", action="store_true", help="daily kWh as CSV")
    energy.add_argument("--state-dir", help="default: stateDir of the config")
    energy.add_argument("--config", help="the config to take stateDir from")
    energy.set_defaults(func=_cmd_energy)

    coop = sub.add_parser("coop", help="the cooperative's metering per month (V = P + L - T), from the saved state",
                          description="Per settlement month: production P, grid import L and export T, use V, and "
                                      "the energy imported for the fleet and delivered to it (<stateDir>/"
                                      "coop_ledger.json); --csv for the cooperative's accounts.")
    coop.add_argument("--csv", action="store_true", help="one CSV row per site and month")
    coop.add_argument("--state-dir", help="default: stateDir of the config")
    coop.add_argument("--config", help="the config to take stateDir from")
    coop.set_defaults(func=_cmd_coop)

    grid = sub.add_parser("grid-battery", help="the level history of a grid battery",
                          description="The daily level and energy of a grid battery, from its saved state "
                                      "(<stateDir>/grid/<name>/); --profile: its 15-minute load profile.")
    grid.add_argument("--csv", action="store_true", help="one CSV row per day")
    grid.add_argument("--profile", action="store_true", help="the 15-minute load profile as CSV (import, export "
                      "and the level per quarter hour)")
    grid.add_argument("--name", help="its service name (default: the only one in the config)")
    grid.add_argument("--state-dir", help="default: stateDir of the config")
    grid.add_argument("--config", help="the config to take stateDir and the grid batteries from")
    grid.set_defaults(func=_cmd_grid_battery)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
