"""aiomqtt's Client with its housekeeping on the service's beats.

aiomqtt calls paho's loop_misc (the keep-alive check, against a keep-alive of tens of seconds) once a second on a
timer of its own: a wake-up of the process of its own every second. Here it runs on the 1-second beats the
service's tick wakes at anyway; and a packet is sent when paho queues it (see _on_socket_register_write). Should
aiomqtt rename the methods this overrides, its own ways run instead.
"""
from __future__ import annotations

from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from ..bus.beats import beat


class Client(aiomqtt.Client):
    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:
            await beat(1.0)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        """paho has a packet to send. aiomqtt registers a writer through a thread-safe call (a wake-up of the
        loop through its self-pipe, then a turn for the writer) for what one send does, as the socket is almost
        always writable. Written here at once, as paho does itself without an event loop; a writer only for
        what the socket did not take. Not inside one of paho's callbacks (its lock is not re-entrant)."""
        in_callback = getattr(client, "_in_callback_mutex", None)
        if in_callback is None or not in_callback.acquire(False):
            super()._on_socket_register_write(client, userdata, sock)
            return
        in_callback.release()
        try:
            client.loop_write()
        except Exception:  # noqa: BLE001  # the connection broke: aiomqtt's writer says so the way it does
            super()._on_socket_register_write(client, userdata, sock)
            return
        if client.want_write():
            super()._on_socket_register_write(client, userdata, sock)
