"""An external battery's report reaches the energy tracker two ways: `org.batteryaggregator.Energy` methods on the
aggregate's service, and an optional HTTP endpoint (off by default). Whatever a caller sends, it gets an answer
that says why a report was refused, and the service goes on.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Mapping

from ...bus.lib import Message
from ...bus.service import VeService
from ...bus.values import unwrap
from .core import ReportConflict, ReportError
from .runtime import ENERGY_INTERFACE

_LOG = logging.getLogger("aggregator.energy")

REPORT_ERROR = ENERGY_INTERFACE + ".Error.InvalidReport"
CONFLICT_ERROR = ENERGY_INTERFACE + ".Error.Conflict"


def add_report_methods(service: VeService, take: Callable[[Mapping[str, Any]], str],
                       remove: Callable[[Any], str] | None = None) -> None:
    """`org.batteryaggregator.Energy.Report(a{sv}) -> s` (keys id, charged, discharged, soc, capacity, reset),
    `ReportValues(s id, d charged, d discharged, d soc, d capacity) -> s` (capacity < 0: not known) for
    clients such as dbus-send that cannot build a{sv}, and `Remove(s id) -> s`. A refused call is an error
    reply whose text says why (`...Error.Conflict` when two batteries report under one id)."""

    def answer(msg: Message, action: Callable[[], str]) -> Message:
        try:
            return Message.new_method_return(msg, "s", [action()])
        except ReportConflict as exc:
            return Message.new_error(msg, CONFLICT_ERROR, str(exc))
        except ReportError as exc:
            return Message.new_error(msg, REPORT_ERROR, str(exc))

    def report(msg: Message) -> Message:
        if msg.signature != "a{sv}":
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs",
                                     "Report takes a{sv}: id, charged, discharged, soc[, capacity, reset]")
        fields = {str(k): unwrap(v) for k, v in msg.body[0].items()}
        return answer(msg, lambda: take(fields))

    def report_values(msg: Message) -> Message:
        if msg.signature != "sdddd":
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs",
                                     "ReportValues takes sdddd: id, charged, discharged, soc, capacity (-1: none)")
        ident, charged, discharged, soc, capacity = msg.body
        fields = {"id": ident, "charged": charged, "discharged": discharged, "soc": soc,
                  "capacity": None if capacity < 0 else capacity}
        return answer(msg, lambda: take(fields))

    def remove_id(msg: Message) -> Message:
        if msg.signature != "s" or remove is None:
            return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", "Remove takes s: the id")
        return answer(msg, lambda: remove(msg.body[0]))

    service.add_method(ENERGY_INTERFACE, "Report", report)
    service.add_method(ENERGY_INTERFACE, "ReportValues", report_values)
    if remove is not None:
        service.add_method(ENERGY_INTERFACE, "Remove", remove_id)


MAX_REQUEST = 16384  # bytes of a request's head and of its body: a report is a few hundred
HTTP_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error"}
_FIELDS = "id, charged, discharged, soc[, capacity, reset]"


class ReportHttpServer:
    """`POST /report` with a JSON object (the fields of `report`): 200 {"ok": true, "message": ...}, 400
    {"error": ...} (409 for two batteries under one id). `POST /remove` with {"id": ...} forgets an external
    battery. With a token every request needs `Authorization: Bearer <token>` (401 without). Tiny on purpose:
    one request per connection, bounded size and time, no dependency; whatever a request holds, the answer is
    an HTTP status and the server goes on serving."""

    def __init__(self, take: Callable[[Mapping[str, Any]], str], host: str, port: int, *,
                 remove: Callable[[Any], str] | None = None,
                 token: str | Callable[[], str | None] | None = None) -> None:
        self.take = take
        self.remove = remove
        self.host = host
        self.port = port
        self._token = token  # a callable follows a reloaded config without a restart of the server
        self._server: asyncio.AbstractServer | None = None

    @property
    def token(self) -> str | None:
        return self._token() if callable(self._token) else self._token

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST)
        _LOG.info("external reports over HTTP: POST http://%s:%d/report%s", self.host, self.port,
                  " (token required)" if self.token else "")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await asyncio.wait_for(self._answer(reader), HTTP_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            status, body = 400, {"error": "incomplete or too slow request"}
        except asyncio.LimitOverrunError:  # no end of the head within the limit
            status, body = 413, {"error": f"the request head must be at most {MAX_REQUEST} bytes"}
        except Exception:  # never let one request take the endpoint (or the service) down
            _LOG.exception("HTTP report request failed")
            status, body = 500, {"error": "internal error; the request was not taken"}
        payload = json.dumps(body).encode()
        extra = 'WWW-Authenticate: Bearer realm="battery-aggregator"\r\n' if status == 401 else ""
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(head + payload)
            await writer.drain()
            writer.close()
        except (ConnectionError, RuntimeError):
            pass

    def _authorised(self, headers: Mapping[str, str]) -> bool:
        token = self.token
        if not token:
            return True
        scheme, _, given = headers.get("authorization", "").partition(" ")
        import hmac  # with OpenSSL's library: loaded by the first request that needs it, not by the service

        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_REQUEST:
            return 413, {"error": "request too large"}
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return 400, {"error": "not an HTTP request"}
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/report", "/remove") or (target == "/remove" and self.remove is None):
            return 404, {"error": "only POST /report and POST /remove are here"}
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if not self._authorised(headers):
            return 401, {"error": "Authorization: Bearer <energy.httpToken> is required"}
        if method != "POST":
            return 405, {"error": "use POST with a JSON object"}
        try:
            length = int(headers.get("content-length", ""))
        except ValueError:
            return 400, {"error": "Content-Length is required"}
        if not 0 <= length <= MAX_REQUEST:
            return 413, {"error": f"the body must be at most {MAX_REQUEST} bytes"}
        raw = await reader.readexactly(length)
        try:
            data = json.loads(raw)
        except RecursionError:
            return 400, {"error": "the body is not a report: JSON nested too deeply; send a flat JSON object: "
                                  + _FIELDS}
        except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
            return 400, {"error": f"the body is not JSON: {exc}"}
        if not isinstance(data, dict):
            return 400, {"error": "the body must be a JSON object: " + (_FIELDS if target == "/report" else "id")}
        try:
            if target == "/remove":
                assert self.remove is not None
                return 200, {"ok": True, "message": self.remove(data.get("id"))}
            return 200, {"ok": True, "message": self.take(data)}
        except ReportConflict as exc:
            return 409, {"error": str(exc)}
        except ReportError as exc:
            return 400, {"error": str(exc)}
