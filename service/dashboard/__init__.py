"""The dashboard's Jinja2 templates and static files (CSS and a little JavaScript; no build
step), packaged with the service."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def static_version() -> str:
    """A hash of the static files: their URLs carry it, so browsers may cache them for good."""
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.iterdir()):
        if path.suffix in STATIC_TYPES:
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["static_version"] = static_version()
