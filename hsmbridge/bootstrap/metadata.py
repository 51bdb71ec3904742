"""The metadata store the configuration names (`[metadata] url`, else `[paths] metadata_db`).

Owns: `open_metadata_store(settings)`. The engine is chosen by the URL's scheme in
`hsmbridge.metadata.factory`; everything above receives the `MetadataStore` and never names an
engine. Callers that open the store for a service go through `open_service`, which runs the
start-up checks first.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

from hsmbridge.config import Settings
from hsmbridge.metadata import factory
from hsmbridge.metadata.store import MetadataStore


def open_metadata_store(settings: Settings) -> MetadataStore:
    return factory.open_metadata_store(settings.metadata_url)
