"""The bearer token that guards the operations endpoints (`GET /health`, `GET /metrics`).

Owns: `read_ops_token(settings)`. `[service] ops_token_file` names a file (relative to the
configuration file) holding one token on its first line; the file must be private to the service
user like every other secret (`bootstrap.secret_files`), and the token at least 16 characters
of printable ASCII so a scraper can send it as `Authorization: Bearer TOKEN`. Not set: the
endpoints answer anyone who can reach the port, as load balancer health checks that cannot send
headers need.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

from typing import Final

from hsmbridge.bootstrap.secret_files import check_private
from hsmbridge.config import Settings
from hsmbridge.errors import ConfigError

MIN_TOKEN_CHARS: Final = 16


def read_ops_token(settings: Settings) -> str | None:
    path = settings.ops_token_file
    if path is None:
        return None
    check_private("operations token file", path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(
            f"operations token file {path} (ops_token_file) does not exist; create it with "
            f"`umask 077; openssl rand -hex 32 > {path}`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"operations token file {path} cannot be read: {exc}") from None
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise ConfigError(
            f"operations token file {path} must hold one token of at least {MIN_TOKEN_CHARS} "
            "printable characters without spaces on its first line"
        )
    return token
