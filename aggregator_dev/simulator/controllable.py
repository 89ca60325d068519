"""A simulated battery that takes a power setpoint, for the dispatcher's tests and demos.

The device does not do exactly what it is told: its measured power follows `gain x setpoint` with a first-order
lag, inside its own charge and discharge limits (and not at all below a dead band), and stops charging when
full / discharging when empty. The dispatcher has to learn the gain from what it measures. With
--setpoint-timeout S it has a watchdog: no setpoint for S seconds and it falls back to 0 (as a device that
honours a setpoint expiry does when its controller dies).

On D-Bus, --layout acsystem (the default) publishes what Victron's services publish for a Multi RS system in
ESS mode 3 ("External control"):
  com.victronenergy.acsystem.<name>
    /Ess/InverterPowerSetpoint     writeable, W on the DC side, + charges the battery (used while
                                   /Ess/UseInverterPowerSetpoint is 1, the default here)
    /Ess/AcPowerSetpoint           writeable, W at AC-in, + takes from the grid (used while it is 0)
    /Ess/UseInverterPowerSetpoint, /Settings/Ess/Mode (3)
    /Ac/In/1/P, /Ac/Out/P          AC-in power (no loads on AC-out here: the battery's power), 0
  com.victronenergy.battery.<name> (the battery's own monitor)
    /Dc/0/Power, /Dc/0/Voltage, /Dc/0/Current, /Soc, /InstalledCapacity (Ah)
--layout generic publishes one service (--service, default com.batteryaggregator.controllable.<name>) with
  /Setpoint (writeable, W in the device's sign: --setpoint-sign -1 means + discharges), /Dc/0/Power (in the
  device's sign: --measured-sign), /Soc, /CapacityWh, /Info/MaxChargePower, /Info/MaxDischargePower.
With --mqtt-host it also takes its setpoint from --command-topic (a number or {"setpoint": W}) and publishes
{"power", "soc", "capacity", "maxCharge", "maxDischarge"} to --state-topic every tick.

    python -m aggregator.simulator.controllable --name A --gain 0.6 --max-discharge 300
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from typing import Any

from aggregator import __version__
from aggregator.bus.lib import connect
from aggregator.bus.service import VeService

_LOG = logging.getLogger("aggregator.simulator.controllable")

SIM_PRODUCT_ID = 0xB0F1
LAYOUTS = ("acsystem", "generic")
NOMINAL_V = 52.0


@dataclass(slots=True)
class ControllableParams:
    gain: float = 1.0  # measured = gain x setpoint (the hidden part the dispatcher learns)
    lag_s: float = 1.0  # time constant of the response
    max_charge_w: float = 3000.0
    max_discharge_w: float = 3000.0
    dead_band_w: float = 0.0  # setpoints smaller than this do nothing
    capacity_wh: float = 5000.0
    soc: float = 50.0
    setpoint_timeout_s: float = 0.0  # > 0: the watchdog; no setpoint for this long and it falls back to 0


class ControllableBattery:
    """The physics, in our convention (+ charge). Pure: step(dt) advances it."""

    def __init__(self, params: ControllableParams) -> None:
        self.params = params
        self.setpoint_w = 0.0
        self.measured_w = 0.0
        self.soc = params.soc
        self.since_command_s = 0.0
        self.expired = False  # the watchdog set the setpoint to 0

    def command(self, setpoint_w: float) -> None:
        """A new setpoint arrives."""
        self.setpoint_w = setpoint_w
        self.heartbeat()

    def heartbeat(self) -> None:
        """Any write of the setpoint (the same value too) restarts the watchdog."""
        self.since_command_s = 0.0
        self.expired = False

    def response(self) -> float:
        """Where the measured power settles for the current setpoint."""
        p = self.params
        if abs(self.setpoint_w) < p.dead_band_w:
            return 0.0
        target = p.gain * self.setpoint_w
        target = min(target, p.max_charge_w if self.soc < 100.0 else 0.0)
        target = max(target, -p.max_discharge_w if self.soc > 0.0 else 0.0)
        return target

    def step(self, dt: float) -> None:
        if dt <= 0:
            return
        self.since_command_s += dt
        timeout = self.params.setpoint_timeout_s
        if timeout > 0 and self.since_command_s > timeout and not self.expired:
            self.setpoint_w = 0.0
            self.expired = True
            _LOG.info("no setpoint for %.1f s: the watchdog sets 0", self.since_command_s)
        target = self.response()
        alpha = 1.0 if self.params.lag_s <= 0 else 1.0 - math.exp(-dt / self.params.lag_s)
        self.measured_w += (target - self.measured_w) * alpha
        if self.params.capacity_wh > 0:
            self.soc = min(100.0, max(0.0, self.soc + self.measured_w * dt / 3600.0 / self.params.capacity_wh * 100))


class ControllableOnBus:
    """The battery as a D-Bus service (and optionally on MQTT)."""

    def __init__(self, battery: ControllableBattery, service_name: str, *, setpoint_sign: int = 1,
                 measured_sign: int = 1, rate_hz: float = 5.0, device_instance: int = 40,
                 layout: str = "generic", battery_service_name: str | None = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
        self.battery = battery
        self.service_name = service_name
        self.battery_service_name = battery_service_name
        self.setpoint_sign = setpoint_sign
        self.measured_sign = measured_sign
        self.rate_hz = rate_hz
        self.device_instance = device_instance
        self.layout = layout
        self.service: VeService | None = None
        self.battery_service: VeService | None = None
        self.use_inverter_setpoint = 1

    @property
    def setpoint_path(self) -> str:
        """Where the setpoint in force is shown."""
        if self.layout == "generic":
            return "/Setpoint"
        return "/Ess/InverterPowerSetpoint" if self.use_inverter_setpoint else "/Ess/AcPowerSetpoint"

    async def start(self, bus_address: str | None = None) -> None:
        bus = await connect(bus_address)
        # Before the service's own handler: a write of the value already there is answered without a change, and
        # the watchdog has to see it too (Victron's acsystem reacts to every write of its setpoints).
        bus.add_message_handler(self._see_write)
        service = VeService(bus, self.service_name)
        acsystem = self.layout == "acsystem"
        service.add_mandatory_paths(
            process_name="battery-aggregator controllable", process_version=__version__,
            connection="Simulated", device_instance=self.device_instance, product_id=SIM_PRODUCT_ID,
            product_name="Simulated Multi RS system" if acsystem else "Simulated controllable battery",
        )
        p = self.battery.params
        if acsystem:
            for path, description in (("/Ess/InverterPowerSetpoint", "W on the DC side, + charges the battery"),
                                      ("/Ess/AcPowerSetpoint", "W at AC-in, + takes from the grid")):
                service.add_path(path, None, writeable=True, value_types=(int, float),
                                 on_change=self._on_setpoint, text="{:.0f} W", description=description)
            service.add_path("/Ess/UseInverterPowerSetpoint", 1, writeable=True, value_types=(int,),
                             on_change=self._on_use_inverter)
            service.add_path("/Settings/Ess/Mode", 3)  # External control: the only mode the setpoints act in
            service.add_path("/Ac/In/1/P", 0.0, text="{:.0f} W")
            service.add_path("/Ac/Out/P", 0.0, text="{:.0f} W")
            service.add_path("/Ac/NumberOfPhases", 1)
            battery = VeService(await connect(bus_address), self.battery_service_name or "com.victronenergy.battery."
                                + self.service_name.rsplit(".", 1)[-1])
            battery.add_mandatory_paths(
                process_name="battery-aggregator controllable", process_version=__version__,
                connection="Simulated", device_instance=self.device_instance + 500, product_id=SIM_PRODUCT_ID,
                product_name="Simulated battery of a Multi RS",
            )
            battery.add_path("/Dc/0/Power", 0.0, text="{:.0f}W")
            battery.add_path("/Dc/0/Voltage", NOMINAL_V, text="{:.2f}V")
            battery.add_path("/Dc/0/Current", 0.0, text="{:.1f}A")
            battery.add_path("/Soc", round(self.battery.soc, 1), text="{:.1f}%")
            battery.add_path("/InstalledCapacity", round(p.capacity_wh / NOMINAL_V, 1), text="{:.0f}Ah")
            await battery.register()
            self.battery_service = battery
        else:
            service.add_path("/Setpoint", 0.0, writeable=True, value_types=(int, float), on_change=self._on_setpoint,
                             text="{:.0f}W", description="power setpoint in W")
            service.add_path("/Dc/0/Power", 0.0, text="{:.0f}W")
            service.add_path("/Soc", round(self.battery.soc, 1), text="{:.1f}%")
            service.add_path("/CapacityWh", p.capacity_wh, text="{:.0f}Wh")
            service.add_path("/Info/MaxChargePower", p.max_charge_w, text="{:.0f}W")
            service.add_path("/Info/MaxDischargePower", p.max_discharge_w, text="{:.0f}W")
        await service.register()
        self.service = service

    def _see_write(self, msg: Any) -> None:
        if msg.member == "SetValue" and msg.path == self.setpoint_path and msg.body:
            value = getattr(msg.body[0], "value", None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.battery.heartbeat()
        return None  # not answered here

    def _on_setpoint(self, path: str, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if path != self.setpoint_path:
            return True  # accepted and kept, as the real service does, but not the one in force
        self.set_device_setpoint(float(value))
        return True

    def _on_use_inverter(self, _path: str, value: Any) -> bool:
        if value not in (0, 1) or isinstance(value, bool):
            return False
        self.use_inverter_setpoint = int(value)
        return True

    def set_device_setpoint(self, value: float) -> None:
        self.battery.command(value * self.setpoint_sign)

    def values(self) -> dict[str, Any]:
        b = self.battery
        power = round(b.measured_w * self.measured_sign)
        if self.layout == "acsystem":
            return {"/Ac/In/1/P": power}
        return {"/Dc/0/Power": power, "/Soc": round(b.soc, 1)}

    def battery_values(self) -> dict[str, Any]:
        b = self.battery
        return {"/Dc/0/Power": round(b.measured_w), "/Dc/0/Current": round(b.measured_w / NOMINAL_V, 1),
                "/Soc": round(b.soc, 1)}

    def tick(self, dt: float) -> None:
        expired = self.battery.expired
        self.battery.step(dt)
        if self.service is not None:
            values = self.values()
            if self.battery.expired and not expired:
                values[self.setpoint_path] = 0.0  # what a reader sees: the device dropped the setpoint
            self.service.set_values(values)
        if self.battery_service is not None:
            self.battery_service.set_values(self.battery_values())

    async def run(self, stop: asyncio.Event) -> None:
        period = 1.0 / self.rate_hz
        last = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), period)
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            self.tick(now - last)
            last = now

    def close(self) -> None:
        for service in (self.service, self.battery_service):
            if service is not None:
                service.close()
        self.service = None
        self.battery_service = None


async def run_mqtt(sim: ControllableOnBus, host: str, port: int, command_topic: str, state_topic: str,
                   stop: asyncio.Event, username: str | None = None, password: str | None = None) -> None:
    """Take setpoints from `command_topic`, publish the state to `state_topic`; reconnect when the broker goes."""
    import aiomqtt

    period = 1.0 / sim.rate_hz
    while not stop.is_set():
        try:
            async with aiomqtt.Client(host, port, username=username, password=password) as mqtt:
                await mqtt.subscribe(command_topic, qos=1)

                async def publish_state() -> None:
                    while True:
                        b = sim.battery
                        state = {"power": round(b.measured_w * sim.measured_sign), "soc": round(b.soc, 1),
                                 "capacity": b.params.capacity_wh, "maxCharge": b.params.max_charge_w,
                                 "maxDischarge": b.params.max_discharge_w}
                        await mqtt.publish(state_topic, json.dumps(state))
                        await asyncio.sleep(period)

                publisher = asyncio.get_running_loop().create_task(publish_state())
                try:
                    async for message in mqtt.messages:
                        value = _setpoint_of(message.payload)
                        if value is not None:
                            sim.set_device_setpoint(value)
                            if sim.service is not None:
                                sim.service.set_value(sim.setpoint_path, value)
                finally:
                    publisher.cancel()
        except aiomqtt.MqttError as exc:
            _LOG.info("MQTT: %s; retrying", exc)
            await asyncio.sleep(1.0)


def _setpoint_of(payload: Any) -> float | None:
    try:
        data = json.loads(payload)
    except (ValueError, TypeError):
        return None
    if isinstance(data, dict):
        data = data.get("setpoint")
    if isinstance(data, bool) or not isinstance(data, (int, float)) or not math.isfinite(data):
        return None
    return float(data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aggregator.simulator.controllable", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="battery name (service suffix)")
    parser.add_argument("--layout", choices=LAYOUTS, default="acsystem", help="which paths (see above)")
    parser.add_argument("--service", help="full D-Bus service name (default com.victronenergy.acsystem.<name>, "
                        "or com.batteryaggregator.controllable.<name> with --layout generic)")
    parser.add_argument("--battery-service", help="acsystem layout: the battery's service (default "
                        "com.victronenergy.battery.<name>)")
    parser.add_argument("--setpoint-timeout", type=float, default=0.0, help="s without a setpoint before the "
                        "watchdog sets 0 (0: no watchdog)")
    parser.add_argument("--gain", type=float, default=1.0)
    parser.add_argument("--lag", type=float, default=1.0, help="response time constant, s")
    parser.add_argument("--max-charge", type=float, default=3000.0, help="W")
    parser.add_argument("--max-discharge", type=float, default=3000.0, help="W (positive)")
    parser.add_argument("--dead-band", type=float, default=0.0, help="W")
    parser.add_argument("--capacity", type=float, default=5000.0, help="Wh")
    parser.add_argument("--soc", type=float, default=50.0, help="%%")
    parser.add_argument("--setpoint-sign", type=int, choices=(1, -1), default=1)
    parser.add_argument("--measured-sign", type=int, choices=(1, -1), default=1)
    parser.add_argument("--rate", type=float, default=5.0, help="ticks per second")
    parser.add_argument("--device-instance", type=int, default=40)
    parser.add_argument("--no-dbus", action="store_true", help="MQTT only")
    parser.add_argument("--mqtt-host")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--mqtt-username")
    parser.add_argument("--mqtt-password")
    parser.add_argument("--command-topic", help="default sim/<name>/setpoint")
    parser.add_argument("--state-topic", help="default sim/<name>/state")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    params = ControllableParams(gain=args.gain, lag_s=args.lag, max_charge_w=args.max_charge,
                                max_discharge_w=args.max_discharge, dead_band_w=args.dead_band,
                                capacity_wh=args.capacity, soc=args.soc, setpoint_timeout_s=args.setpoint_timeout)
    default = (f"com.victronenergy.acsystem.{args.name}" if args.layout == "acsystem"
               else f"com.batteryaggregator.controllable.{args.name}")
    sim = ControllableOnBus(ControllableBattery(params), args.service or default,
                            setpoint_sign=args.setpoint_sign, measured_sign=args.measured_sign, rate_hz=args.rate,
                            device_instance=args.device_instance, layout=args.layout,
                            battery_service_name=args.battery_service)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if not args.no_dbus:
            await sim.start()
        tasks = [loop.create_task(sim.run(stop))]
        if args.mqtt_host:
            tasks.append(loop.create_task(run_mqtt(
                sim, args.mqtt_host, args.mqtt_port, args.command_topic or f"sim/{args.name}/setpoint",
                args.state_topic or f"sim/{args.name}/state", stop, args.mqtt_username, args.mqtt_password)))
        _LOG.info("controllable battery %s running", sim.service_name)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sim.close()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
