"""CoopSite: one household on the cooperative's MQTT broker.

Topics (prefix `coop` by default, `<site>` = the site id = its MQTT username):

    coop/<site>/state          JSON PeerState (core.WIRE_KEYS), retained, every publishSeconds and on change
    coop/<site>/status         "online" at connect, "offline" as last will (and on a clean stop), retained
    coop/<site>/curtail        "1" stop production / "0" run (the MQTT curtailment adapter), retained
    coop/<site>/fleet/<obj>    the fleet as this site sees it, for Home Assistant, retained
    homeassistant/sensor/<site>/coop_<obj>/config    Home Assistant discovery, retained

The connection is the MQTT link's (mqtt/link.py: TLS, credentials, the status topic as its availability with
the last will, back-off); the site subscribes its wildcard topics through it and publishes while it is up.
The broker's ACL lets a site write only under coop/<username>/# (and its own discovery node), so a site
cannot speak for another; what peers send is still checked (core.check_peer) before it counts.

Time: `clock` gives the site's time in seconds (wall time, or the bench's accelerated clock); periods in the
settings are in that clock's seconds and `time_scale` converts them to real waits.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from typing import Any, Callable, Protocol

from ...bounded import bounded_text
from ...bus.beats import beat, next_beat
from ...mqtt.link import MqttLink
from .core import (MAX_JSON_DEPTH, Curtailment, Fleet, FleetView, PeerState, PublishGate, Rejected, SiteTarget,
                   is_site_id, json_depth, site_target)
from .settings import CoopSettings

log = logging.getLogger("aggregator.coop.mqtt")

MAX_PAYLOAD = 4096  # a state is ~250 bytes; anything far larger is not one
MAX_LOGGED = 200  # characters of a peer's text (a reason quoting its values, a topic) in a log line or status


def _shape(reason: str) -> str:
    return re.sub(r"[-+]?\d[\d.e+-]*", "#", reason)


def calendar_day(now: float) -> str:
    """The books' day: the local calendar day."""
    return time.strftime("%Y-%m-%d", time.localtime(now))


class CurtailAdapter(Protocol):
    """Carries the stop/start command for local production to whatever controls the inverter."""

    async def apply(self, curtailed: bool) -> None: ...


class MqttCurtailAdapter:
    """Publishes "1" (stop) / "0" (run), retained, on the site's own connection."""

    def __init__(self, site: CoopSite, topic: str) -> None:
        self.site = site
        self.topic = topic

    async def apply(self, curtailed: bool) -> None:
        await self.site.publish(self.topic, "1" if curtailed else "0", retain=True)


class DbusCurtailAdapter:
    """Writes a D-Bus path of a Victron service, e.g. a solar charger's /Mode (4 off, 1 on)."""

    def __init__(self, bus: Any, service: str, path: str, curtailed_value: int = 4, released_value: int = 1) -> None:
        self.bus = bus
        self.service = service
        self.path = path
        self.curtailed_value = curtailed_value
        self.released_value = released_value

    async def apply(self, curtailed: bool) -> None:
        from ...bus.client import set_value  # D-Bus only where it is used: the MQTT side runs without it

        value = self.curtailed_value if curtailed else self.released_value
        code = await set_value(self.bus, self.service, self.path, value)
        if code != 0:
            log.warning("curtailment: %s %s refused %r (code %d)", self.service, self.path, value, code)


FLEET_SENSORS = (  # object, name, unit, device class
    ("peers_online", "Coop peers online", None, None),
    ("average_level", "Coop fleet average level", "%", "battery"),
    ("own_target", "Coop own target power", "W", "power"),
)


class CoopSite:
    """The MQTT side of one site. Feed it the site's state with `step()` each control cycle; `run()` keeps the
    connection (reconnecting with back-off) until cancelled."""

    def __init__(self, settings: CoopSettings, *, clock: Callable[[], float] = time.time, time_scale: float = 1.0,
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 60.0,
                 curtail_adapter: CurtailAdapter | None = None, announce_offline_on_stop: bool = True,
                 day_of: Callable[[float], Any] = calendar_day) -> None:
        if not settings.enabled or settings.siteId is None or settings.broker is None:
            raise ValueError("CoopSite needs an enabled coop section with siteId and broker")
        self.settings = settings
        self.site_id: str = settings.siteId
        self.broker = settings.broker
        self.clock = clock
        self.time_scale = time_scale
        self.announce_offline_on_stop = announce_offline_on_stop
        self.site_settings = settings.site_settings()
        self.peer_policy = settings.peer_policy()
        if self.peer_policy.registered is None:
            log.info("coop: no peers list: any site may take part, claiming up to %g kWh",
                     self.peer_policy.max_capacity_kwh)
        prefix = settings.topicPrefix
        self.prefix = prefix
        self.state_topic = f"{prefix}/{self.site_id}/state"
        self.status_topic = f"{prefix}/{self.site_id}/status"
        self.curtail_topic = settings.curtail.topic or f"{prefix}/{self.site_id}/curtail"
        c = settings.curtail
        self.curtailment = Curtailment(c.fullPercent, c.releasePercent, c.dischargeReleaseW, c.minHoldSeconds)
        if curtail_adapter is None and c.adapter == "mqtt":
            curtail_adapter = MqttCurtailAdapter(self, self.curtail_topic)
        self.curtail_adapter = curtail_adapter
        self.view = FleetView(self.site_id, self.site_settings, self.peer_policy, day_of)
        self.peers = self.view.peers  # believed states
        self.offline = self.view.offline
        self.ignored = self.view.ignored  # site -> why its latest state was not believed (until one is)
        self.rejected: Counter[str] = Counter()  # by site id ("?" when unknown)
        self.last_rejection: dict[str, str] = {}
        self.stale = 0  # states that were too old when they arrived (dropped: they could not count)
        self.unreadable = 0  # messages that failed in a way no check foresaw (logged with their topic)
        self._last_unreadable: tuple[str, type] | None = None
        self.own: PeerState | None = None
        self.last_target: SiteTarget | None = None
        self._changed = asyncio.Event()
        self._gate = PublishGate()
        self._curtail_sent: bool | None = None
        self._fleet_sent: dict[str, str] = {}  # the fleet view's values last published on this connection
        self._publishing: asyncio.Task[None] | None = None
        self.link = self._make_link(settings, (reconnect_min_s, reconnect_max_s))

    # --- the control side -------------------------------------------------------------------------------

    def update_own(self, state: PeerState) -> None:
        self.own = state
        if self._gate.changed(state):
            self._changed.set()

    def fleet(self, now: float | None = None) -> Fleet | None:
        self.view.own = self.own
        return self.view.fleet(self.clock() if now is None else now)

    def peers_online(self, now: float | None = None) -> list[str]:
        """Other sites that count now: online and fresh."""
        return self.view.peers_online(self.clock() if now is None else now)

    def target(self, now: float | None = None) -> SiteTarget:
        """Our target from what we believe now (step() also keeps the books)."""
        if self.own is None:
            raise RuntimeError("no own state yet (call update_own or step first)")
        now = self.clock() if now is None else now
        self.last_target = site_target(self.own, self.fleet(now), self.site_settings, self.view.capped(now))
        return self.last_target

    def capped(self, now: float | None = None) -> dict[str, float]:
        """The sites that drew the day's bound from the fleet, with the kWh they drew."""
        capped = self.view.capped(self.clock() if now is None else now)
        return {site: self.view.books[site].sent_kwh for site in sorted(capped)}

    async def step(self, own: PeerState, battery_w: float) -> SiteTarget:
        """One control cycle: share our state, keep the books, compute our target, stop or run production.
        `battery_w` is the battery's present power (+ charging), which releases curtailment when the battery
        is used."""
        self.update_own(own)
        # Freshness and the books by our clock, which peers' states are judged by when they arrive, too.
        target, dropped = self.view.step(own, self.clock())
        for rejected in dropped:
            self._reject(rejected)
        self.last_target = target
        self.curtailment.update(own.level, battery_w, own.timestamp)
        await self._send_curtailment()
        return target

    async def _send_curtailment(self) -> None:
        wanted = self.curtailment.curtailed
        if self.curtail_adapter is None or wanted == self._curtail_sent:
            return
        try:
            await self.curtail_adapter.apply(wanted)
            self._curtail_sent = wanted
        except (OSError, RuntimeError) as err:  # retried at the next step
            log.debug("curtailment command not sent: %s", err)

    # --- the MQTT side ----------------------------------------------------------------------------------

    def _make_link(self, settings: CoopSettings, reconnect_s: tuple[float, float]) -> MqttLink:
        """Our user name is the siteId unless the broker section gives one (the same, settings.py checks it)."""
        assert self.broker is not None
        link = MqttLink(self.broker.model_copy(update={"username": settings.username}),
                        availability_topic=self.status_topic, clock=self.clock, client_id=f"coop-{self.site_id}",
                        backoff_s=reconnect_s, log=log,
                        missing="the cooperative needs the Python package aiomqtt")
        link.subscribe(f"{self.prefix}/+/state", self._receive)
        link.subscribe(f"{self.prefix}/+/status", self._receive)
        if settings.homeAssistant.enabled:
            link.subscribe(f"{settings.homeAssistant.discoveryPrefix}/status", self._receive)
        link.on_connect(self._on_connect)
        link.on_lost(self._on_lost)
        return link

    @property
    def connected(self) -> asyncio.Event:
        return self.link.connected

    @property
    def connects(self) -> int:
        return self.link.connections

    async def run(self) -> None:
        """Connect, and reconnect after a lost link with back-off, until cancelled (the link's loop)."""
        await self.link.run(announce_offline=self.announce_offline_on_stop)

    async def _on_connect(self) -> None:
        self._curtail_sent = None  # the command topic is ours: state it again on every connection
        self._fleet_sent = {}  # and so are the fleet view's
        self._changed.set()
        self._on_lost()
        self._publishing = asyncio.get_running_loop().create_task(self._publisher())
        if self.settings.homeAssistant.enabled:
            try:
                await self._publish_discovery()
            except RuntimeError as err:  # the link went down again: this runs at the next connect
                log.debug("coop: discovery not published: %s", err)

    def _on_lost(self) -> None:
        if self._publishing is not None:
            self._publishing.cancel()
            self._publishing = None

    async def publish(self, topic: str, payload: str | bytes, retain: bool = False, qos: int = 1) -> None:
        """Publish on the current connection (RuntimeError when there is none)."""
        if not self.link.connected.is_set():
            raise RuntimeError("not connected to the coop broker")
        await self._send(topic, payload, retain, qos)

    async def _send(self, topic: str, payload: str | bytes, retain: bool, qos: int) -> None:
        """Every publish passes here (the bench delays a link by overriding it)."""
        if not await self.link.publish(topic, payload, retain=retain, qos=qos):
            raise RuntimeError(f"not handed to the coop broker: {bounded_text(topic, 80)}")

    def encode_state(self, state: PeerState) -> bytes:
        return json.dumps(state.to_wire(), separators=(",", ":")).encode()

    async def _publisher(self) -> None:
        period = self.settings.publishSeconds / self.time_scale
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation (run() hangs). Until the
            # period's next beat, so that the periodic publish wakes the process with the service's reads.
            try:
                async with asyncio.timeout_at(next_beat(asyncio.get_running_loop().time(), period)):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            try:
                if self.own is not None:
                    await self.publish(self.state_topic, self.encode_state(self.own), retain=True)
                    self._gate.last = self.own
                    await self._publish_fleet_view()
                await self._send_curtailment()
            except RuntimeError as err:  # the link is going down: it reconnects and starts us again
                log.debug("coop: not published: %s", err)
            await beat(period / 10)  # "on change" at most ten times a period, at the service's beats

    async def _receive(self, topic: str, payload: bytes, _retained: bool) -> None:
        try:
            await self.handle(topic, payload)
        except Exception as err:  # noqa: BLE001
            # One message must never end the loop: a retained one would end it again at every connect, at
            # every site. Its sender is not known here for sure, so the topic names it.
            self.unreadable += 1
            if self._last_unreadable != (topic, type(err)):  # not once per message of a chatty peer
                log.warning("coop: ignoring a message on %s: %s: %s", bounded_text(topic, 80),
                            type(err).__name__, bounded_text(str(err), MAX_LOGGED))
            self._last_unreadable = (topic, type(err))

    async def handle(self, topic: str, payload: bytes) -> None:
        ha = self.settings.homeAssistant
        if ha.enabled and topic == f"{ha.discoveryPrefix}/status":
            if payload == b"online":  # Home Assistant restarted: it wants the discovery again
                await self._publish_discovery()
            return
        if not topic.startswith(self.prefix + "/"):
            return
        site, _, kind = topic[len(self.prefix) + 1:].partition("/")
        if site == self.site_id:
            return  # our own retained messages
        if not is_site_id(site):  # no site has such an id: a key we would keep, a text we would log
            if kind == "state":
                self._reject(Rejected(None, f"a state under a topic that names no site ({bounded_text(topic, 80)})"))
            return
        if kind == "status":
            if payload == b"offline":
                self.offline.add(site)
            elif payload == b"online":
                self.offline.discard(site)
        elif kind == "state":
            self._on_state(site, payload)

    def _on_state(self, site: str, payload: bytes) -> None:
        if not payload:  # the retained state was cleared: the site left the cooperative
            self.view.leave(site)
            return
        if len(payload) > MAX_PAYLOAD:
            self._reject(Rejected(site, f"{len(payload)} bytes, not a state (at most {MAX_PAYLOAD})"))
            return
        depth = json_depth(payload)
        if depth > MAX_JSON_DEPTH:  # before json.loads: "[[[[..." within MAX_PAYLOAD exhausts its recursion
            self._reject(Rejected(site, f"JSON nested {depth} deep, not a state"))
            return
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self._reject(Rejected(site, "not JSON"))
            return
        result = self.view.receive(site, data, self.clock())
        if isinstance(result, Rejected) and result.stale:  # a slow link, a retained state of a site long gone
            self.stale += 1
            log.debug("coop: dropping %s/%s/state: %s", self.prefix, site, result.reason)
        elif isinstance(result, Rejected):
            self._reject(result)

    def _reject(self, rejected: Rejected) -> None:
        site = rejected.site_id or "?"
        reason = bounded_text(rejected.reason, MAX_LOGGED)  # it may quote what the peer sent: a log line stays a line
        self.rejected[site] += 1
        self.ignored[site] = reason
        # Once per new kind of reason, not per message: the numbers in a reason change with every message.
        if _shape(self.last_rejection.get(site, "")) != _shape(reason):
            log.warning("coop: ignoring %s/%s/state: %s", self.prefix, site, reason)
        self.last_rejection[site] = reason

    # --- Home Assistant -----------------------------------------------------------------------------------

    def fleet_topic(self, obj: str) -> str:
        return f"{self.prefix}/{self.site_id}/fleet/{obj}"

    def discovery(self) -> list[tuple[str, dict[str, Any]]]:
        """(config topic, config) per fleet sensor, in Home Assistant's MQTT discovery format."""
        prefix = self.settings.homeAssistant.discoveryPrefix
        device = {"identifiers": [f"coop_{self.site_id}"], "name": f"Coop site {self.site_id}",
                  "manufacturer": "battery-aggregator", "model": "communicating vessels"}
        out = []
        for obj, name, unit, device_class in FLEET_SENSORS:
            config: dict[str, Any] = {
                "name": name, "unique_id": f"coop_{self.site_id}_{obj}", "state_topic": self.fleet_topic(obj),
                "availability_topic": self.status_topic, "payload_available": "online",
                "payload_not_available": "offline", "state_class": "measurement", "device": device}
            if unit:
                config["unit_of_measurement"] = unit
            if device_class:
                config["device_class"] = device_class
            out.append((f"{prefix}/sensor/{self.site_id}/coop_{obj}/config", config))
        return out

    async def _publish_discovery(self) -> None:
        for topic, config in self.discovery():
            await self.publish(topic, json.dumps(config), retain=True)

    async def _publish_fleet_view(self) -> None:
        if not self.settings.homeAssistant.enabled:
            return
        fleet = self.fleet()
        values = {"peers_online": str(len(self.peers_online())),
                  "average_level": f"{fleet.level:.1f}" if fleet else "",
                  "own_target": f"{self.last_target.battery_w:.0f}" if self.last_target else ""}
        for obj, value in values.items():
            if self._fleet_sent.get(obj) == value:
                continue  # retained on the broker already: Home Assistant has it
            await self.publish(self.fleet_topic(obj), value, retain=True)
            self._fleet_sent[obj] = value
