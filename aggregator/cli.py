"""The command line: `battery-aggregator <command>` (also `python -m aggregator <command>`)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import __version__

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _cmd_run(args: argparse.Namespace) -> int:
    from .daemon import run

    logging.basicConfig(level=args.log_level or "INFO", format=_LOG_FORMAT)
    return asyncio.run(run(args.config, exit_delay=args.exit_delay, log_level=args.log_level))


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulator.bus_bank import simulate
    from .simulator.scenario import ScenarioError, load_scenario, with_pack_count

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

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await simulate(scenario, stop)

    asyncio.run(main())
    return 0


def _cmd_fault(args: argparse.Namespace) -> int:
    from .bus import client
    from .bus.lib import connect
    from .simulator.bus_bank import CONTROL_SERVICE

    async def main() -> int:
        bus = await connect()
        try:
            base = f"/Packs/{args.pack}"
            await client.set_value(bus, CONTROL_SERVICE, base + "/FaultDuration", float(args.duration or 0))
            code = await client.set_value(bus, CONTROL_SERVICE, base + "/Fault", "" if args.kind == "clear" else args.kind)
        except client.CallError as exc:
            print(f"battery-aggregator fault: {exc} (is the simulator running?)", file=sys.stderr)
            return 1
        finally:
            bus.disconnect()
        if code != 0:
            print(f"battery-aggregator fault: the simulator refused {args.kind!r} (code {code})", file=sys.stderr)
        return 0 if code == 0 else 1

    return asyncio.run(main())


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main

    logging.basicConfig(level="WARNING", format=_LOG_FORMAT)
    return main(args.scenario, args.duration, args.refresh)


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
    print("OK")
    if args.live:
        from .live import print_live_roles

        return asyncio.run(print_live_roles(result.config))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import status

    try:
        return asyncio.run(status(args.service, args.watch, args.interval))
    except KeyboardInterrupt:
        return 0


def _cmd_dump(args: argparse.Namespace) -> int:
    from .status import dump

    return asyncio.run(dump(args.file))


def _cmd_schema(args: argparse.Namespace) -> int:
    from .schema import SCHEMA_FILE, schema_text

    text = schema_text()
    if args.check:
        current = SCHEMA_FILE.read_text() if SCHEMA_FILE.exists() else ""
        if current != text:
            print(f"{SCHEMA_FILE} differs from the config model: run `battery-aggregator schema --write`",
                  file=sys.stderr)
            return 1
        print("config.schema.json is up to date")
        return 0
    if args.write:
        SCHEMA_FILE.write_text(text)
        print(f"wrote {SCHEMA_FILE}")
        return 0
    sys.stdout.write(text)
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

    sim = sub.add_parser("simulate", help="publish a simulated battery bank on D-Bus",
                         description="Publish the packs of a scenario as com.victronenergy.battery.<name> services, "
                                     "driven by physics (parallel LiFePO4 packs). SCENARIO is a name of a bundled "
                                     "scenario (default, solar_day, faults) or a path to a JSON file. Faults can be "
                                     "injected at run time with `battery-aggregator fault`.")
    sim.add_argument("scenario", nargs="?", default="default", metavar="SCENARIO")
    sim.add_argument("--packs", type=int, help="publish this many packs (the scenario's packs repeated)")
    sim.add_argument("--rate", type=float, help="publish rate in Hz (overrides the scenario)")
    sim.add_argument("--time-scale", type=float, help="simulated seconds per second (overrides the scenario)")
    sim.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sim.set_defaults(func=_cmd_simulate)

    fault = sub.add_parser("fault", help="inject a fault into a running simulator",
                           description="Inject a fault into one pack of a running simulator: freeze (stops "
                                       "updating), vanish (leaves the bus), invalid (measured values invalid), absurd "
                                       "(NaN, strings, negative capacity, SoC 150), slow (answers calls late), "
                                       "fets_open (the BMS opens its FETs); clear ends all faults of the pack.")
    fault.add_argument("pack", help="the pack's service suffix, e.g. sim_b")
    fault.add_argument("kind", choices=["freeze", "vanish", "invalid", "absurd", "slow", "fets_open", "clear"])
    fault.add_argument("--duration", type=float, help="seconds (default: until cleared)")
    fault.set_defaults(func=_cmd_fault)

    demo = sub.add_parser("demo", help="the whole thing on a private bus with a live view",
                          description="Start a private dbus-daemon, a localsettings stand-in, the simulated bank and "
                                      "the aggregator, and show the batteries live until Ctrl-C. Nothing touches the "
                                      "machine's own D-Bus.")
    demo.add_argument("--scenario", default="default", help="simulator scenario (default: default)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--refresh", type=float, default=1.0, help="seconds between screen updates")
    demo.set_defaults(func=_cmd_demo)
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

    schema = sub.add_parser("schema", help="print, write or check config.schema.json",
                            description="config.schema.json is generated from the config model in "
                                        "aggregator/config.py. Without options it is printed.")
    schema.add_argument("--write", action="store_true", help="write config.schema.json at the repo root")
    schema.add_argument("--check", action="store_true", help="exit 1 when the committed file is out of date")
    schema.set_defaults(func=_cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
