"""HTML from Jinja2 templates (autoescaped), and the console's stylesheet.

Owns: the template environment (package templates in `hsmbridge/console/templates`, autoescape
on for every template, undefined names are errors), `render(name, **context)`, the date filter,
and `STYLESHEET` (the only static file, `static/console.css`).
Must not import anything above `hsmbridge.request`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final

import jinja2

_ENV: Final = jinja2.Environment(
    loader=jinja2.PackageLoader("hsmbridge.console", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _date(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(float(epoch), UTC).strftime("%b %d, %Y %H:%M:%S UTC")


_ENV.filters["date"] = _date

STYLESHEET: Final = resources.files("hsmbridge.console").joinpath("static/console.css").read_bytes()


def render(name: str, **context: Any) -> bytes:
    return _ENV.get_template(name).render(**context).encode("utf-8")
