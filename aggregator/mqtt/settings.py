"""How we reach an MQTT broker: one settings model for every feature that talks to one.

The cooperative's `broker` and the dispatcher's `mqtt` sections derive from `BrokerConnection`: each keeps its own
defaults and adds its own rules, the keys and the credential rules are the same. The link (link.py) reads these
fields through a Protocol, so it loads no pydantic.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BrokerConnection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A section that knows our user name without the key (the cooperative: its siteId) takes a password alone.
    username_implied: ClassVar[bool] = False

    host: str = Field(min_length=1, description="broker host")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is usual with TLS)")
    tls: bool = Field(False, description="connect with TLS")
    caFile: str | None = Field(None, min_length=1, description="the CA certificate that signed the broker's "
                               "certificate (PEM, needs tls); none = the system's trust store")
    certFile: str | None = Field(None, min_length=1, description="TLS client certificate (PEM) we authenticate "
                                 "with; needs keyFile and tls")
    keyFile: str | None = Field(None, min_length=1, description="private key of certFile (PEM)")
    username: str | None = Field(None, min_length=1, description="our user name on the broker")
    password: str | None = Field(None, description="its password (needs username)")
    keepaliveSeconds: int = Field(30, ge=5, le=3600, description="the broker publishes our last will (offline) "
                                  "about 1.5 x this after our link dies")

    @model_validator(mode="after")
    def _credentials(self) -> BrokerConnection:
        if self.password is not None and self.username is None and not self.username_implied:
            raise ValueError("a password needs a username")
        if self.caFile is not None and not self.tls:
            raise ValueError('caFile is only used with "tls": true')
        if (self.certFile is None) != (self.keyFile is None):
            raise ValueError("certFile and keyFile go together (a client certificate and its key)")
        if self.certFile is not None and not self.tls:
            raise ValueError('certFile (a TLS client certificate) is only used with "tls": true')
        return self
