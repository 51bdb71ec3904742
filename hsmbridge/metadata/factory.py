"""Which engine holds the metadata: a URL's scheme mapped to a `MetadataStore` implementation.

Owns: `open_metadata_store(url)` and the table of engines. The URL grammar (and the refusal of an
unsupported scheme at configuration load) lives in `hsmbridge.config`; the set of schemes it
accepts and the engines here are the same set, checked by the unit tests. Nothing above this
module names an engine: the service receives a `MetadataStore`.
Must not import keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from hsmbridge.config import POSTGRESQL_SCHEME, SQLITE_SCHEME, mask_url, parse_metadata_url
from hsmbridge.errors import ConfigError
from hsmbridge.metadata.sqlite import SqliteMetadataStore
from hsmbridge.metadata.store import MetadataStore


def _open_sqlite(url: str, file: Path | None) -> MetadataStore:
    if file is None:  # parse_metadata_url always gives SQLite a file; guard the contract
        raise ConfigError("a SQLite metadata URL needs a database file path")
    return SqliteMetadataStore(file)


def _open_postgresql(url: str, file: Path | None) -> MetadataStore:
    # Imported here: the SQLite default never loads the PostgreSQL driver.
    from hsmbridge.metadata.postgres import PostgresMetadataStore

    return PostgresMetadataStore(url)


# (URL, SQLite file or None) -> an open store, per scheme.
ENGINES: Final[dict[str, Callable[[str, Path | None], MetadataStore]]] = {
    SQLITE_SCHEME: _open_sqlite,
    POSTGRESQL_SCHEME: _open_postgresql,
}


def open_metadata_store(url: str) -> MetadataStore:
    """Open (creating or migrating as needed) the metadata store `url` names.

    A relative SQLite path is relative to the working directory here; `Settings.metadata_url`
    is already resolved against the data directory. An unsupported scheme is a ConfigError that
    lists the supported ones. A PostgreSQL server that cannot be reached is a
    DependencyTimeoutException; one that refuses the credentials or lacks the database, a
    ConfigError.
    """
    scheme, file = parse_metadata_url(url)
    opener = ENGINES.get(scheme)
    if opener is None:  # accepted by config but not wired here: a programming error, said plainly
        raise ConfigError(
            f"metadata engine {scheme!r} of {mask_url(url)!r} has no implementation; supported "
            f"schemes: {', '.join(sorted(ENGINES))}"
        )
    return opener(url, file)
