"""The floor `bench/api_load.py` measures the API against: the least an ASGI app can do to
answer `GET /v1/classes/{id}/samples` as the API does.

No framework: one key checked against its hash (as a cached principal is), the query string
parsed, the very SQL the API runs (its statements, compiled by SQLAlchemy for psycopg) on a
psycopg async pool of the same size, the same JSON fields serialized once by orjson, URLs from
a template. It answers nothing else (404) and validates only what it needs. Served by uvicorn:

    ALIGNDIFF_DATABASE_URL=… FLOOR_KEY=… uvicorn --factory bench.api_floor:create_floor
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Any
from urllib.parse import parse_qsl

import orjson
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import make_url
from sqlalchemy.dialects import postgresql
from starlette.types import Receive, Scope, Send

from service.contexts.samples import _LISTED, _listing
from service.pagination import decode_cursor, encode_cursor
from service.settings import Settings

_PATH = re.compile(r"/v1/classes/([0-9a-f-]{36})/samples")
_NAMES = tuple(column.key for column in _LISTED)
_INDEX = _NAMES.index("index")
_ID = _NAMES.index("id")


def _sql(accepted: bool | None, after: bool, min_clip: bool) -> str:
    statement = _listing(admin=False, after=after, accepted=accepted, min_clip=min_clip)
    return statement.compile(dialect=postgresql.psycopg.dialect()).string  # type: ignore[attr-defined]


class Floor:
    def __init__(self) -> None:
        settings = Settings()
        url = make_url(settings.resolved_database_url).set(drivername="postgresql")
        self.pool = AsyncConnectionPool(
            url.render_as_string(hide_password=False),
            min_size=1,
            max_size=settings.read_pool_size,
            kwargs={"autocommit": True},
            open=False,
        )
        self.key_hash = hashlib.sha256(os.environ["FLOOR_KEY"].encode()).hexdigest()
        self.owner_id = os.environ["FLOOR_OWNER_ID"]
        self.sql = {
            (accepted, after, min_clip): _sql(accepted, after, min_clip)
            for accepted in (None, True, False)
            for after in (False, True)
            for min_clip in (False, True)
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["path"] == "/healthz":  # what `api_server` waits for
            await _send(send, 200, b'{"status":"ok"}')
            return
        match = _PATH.fullmatch(scope["path"])
        if match is None:
            await _send(send, 404, b'{"status":404}')
            return
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode()
        digest = hashlib.sha256(authorization.removeprefix("Bearer ").encode()).hexdigest()
        if not hmac.compare_digest(digest, self.key_hash):
            await _send(send, 401, b'{"status":401}')
            return
        query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
        limit = int(query.get("limit", "50"))
        cursor = query.get("cursor")
        after = decode_cursor(cursor, arity=1)[0] if cursor else None
        accepted = {"true": True, "false": False}.get(query.get("accepted", ""))
        min_clip = float(query["min_clip_score"]) if "min_clip_score" in query else None
        params = {
            "class_id": match.group(1), "owner_id": self.owner_id, "after": after,
            "min_clip_score": min_clip, "limit": limit + 1,
        }  # fmt: skip
        sql = self.sql[(accepted, after is not None, min_clip is not None)]
        async with self.pool.connection() as connection:
            rows = await (await connection.execute(sql.encode(), params)).fetchall()
        base = f"http://{dict(scope['headers']).get(b'host', b'').decode()}/v1/samples/"
        items: list[dict[str, Any]] = []
        for row in rows[:limit]:
            item = dict(zip(_NAMES, row, strict=True))
            item["image_url"] = f"{base}{row[_ID]}/image"
            item["mask_url"] = f"{base}{row[_ID]}/mask"
            items.append(item)
        next_cursor = encode_cursor([rows[limit - 1][_INDEX]]) if len(rows) > limit else None
        body = {"items": items, "next_cursor": next_cursor}
        await _send(send, 200, orjson.dumps(body, option=orjson.OPT_UTC_Z))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.pool.open()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _send(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_floor() -> Floor:
    return Floor()
