"""aiomqtt's Client with its housekeeping on the service's beats.

aiomqtt calls paho's loop_misc (the keep-alive check, against a keep-alive of tens of seconds) once a second on a
timer of its own: a wake-up of the process of its own every second. Here it runs on the 1-second beats the
service's tick wakes at anyway. Should aiomqtt rename the method this overrides, its own loop runs instead.
"""
from __future__ import annotations

import aiomqtt
import paho.mqtt.client as paho

from ..bus.beats import beat


class Client(aiomqtt.Client):
    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:
            await beat(1.0)
