"""The HSM connector the configuration names: PKCS#11, one login per token per process.

Owns: `default_connector(settings)`, the connector every entry point uses unless it injects its
own (a fake in unit tests, a fault- or crash-injecting wrapper in reliability tests, the HTTP
layer's timing wrapper around this one). Building it loads no PKCS#11 module: that happens at the
first login, after `prepare` exported the HSM environment.
Must not import pkcs11 directly (the backend package does).
"""

from __future__ import annotations

from hsmbridge.backend import HsmConnector
from hsmbridge.backend.pkcs11 import Pkcs11Connector
from hsmbridge.config import Settings


def default_connector(settings: Settings) -> HsmConnector:
    return Pkcs11Connector(settings.clusters)
