"""The dashboard's browser sessions: an admin key exchanged for a signed cookie, and CSRF
protection for every state-changing request a browser makes with that cookie.

The cookie holds the key's id, a synchronizer token and when it was issued, signed
(itsdangerous) with the session secret, and nothing secret itself. Every request looks the key
up again, so a session stops working as soon as its key is revoked, or once the key's sessions
are signed out (`ApiKey.sessions_not_before`: a copy of the cookie is refused too).

CSRF: a state-changing request must come from this site (`Origin`, else `Sec-Fetch-Site`) and
carry the session's token (a form field or the `X-CSRF-Token` header). The sign-in form, made
before any session exists, carries a token that must match a short-lived signed cookie instead
(double submit).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

from anyio import to_thread
from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.orm import Session

from service.auth import Principal, record_use_of, use_is_due
from service.db import db_now
from service.models import ApiKey
from service.problems import Problem, problem_response
from service.reads import ReadDatabase
from service.settings import Settings

log = logging.getLogger(__name__)

SESSION_COOKIE = "aligndiff_session"
SIGN_IN_COOKIE = "aligndiff_sign_in"
COOKIE_PATH = "/admin"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SIGN_IN_PATH = "/admin/sign-in"
SECRET_FILE = "session-secret"
SIGN_IN_FORM_SECONDS = 3600


def session_secret(settings: Settings) -> str:
    """`ALIGNDIFF_SESSION_SECRET`, else the secret kept in `data_dir/session-secret`, created
    on first use (so sessions survive a restart of `aligndiff serve`)."""
    if settings.session_secret is not None:
        return settings.session_secret.get_secret_value()
    path = settings.data_dir / SECRET_FILE
    if not path.exists():
        _create_secret_file(path)
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise RuntimeError(f"{path} holds no usable session secret; delete it to make a new one")
    return secret


def _create_secret_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".session-secret.")
    try:
        with os.fdopen(fd, "w") as handle:  # mkstemp makes it readable by the owner only
            handle.write(secrets.token_urlsafe(48))
        # NOTE: link, not rename: when two processes start at once, the first link wins and
        # both read the same secret.
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)


@dataclass(frozen=True)
class WebSession:
    """What the session cookie says: which key signed in, the session's CSRF token, and when
    it was issued."""

    key_id: uuid.UUID
    csrf_token: str
    issued_at: datetime


class SessionCodec:
    """Signs and reads the session and sign-in cookies."""

    def __init__(self, secret: str, *, max_age_seconds: int) -> None:
        self.max_age_seconds = max_age_seconds
        self._sessions = URLSafeTimedSerializer(secret, salt="aligndiff.dashboard.session")
        self._sign_in = URLSafeTimedSerializer(secret, salt="aligndiff.dashboard.sign-in")

    def issue(self, key_id: uuid.UUID, *, issued_at: datetime) -> tuple[str, WebSession]:
        """A new session (a fresh CSRF token) and its cookie value. `issued_at` is the
        database's now (`database_now`): the sign-out it is compared with is stamped in the
        database's time too, so API hosts whose clocks disagree agree on the order."""
        session = WebSession(
            key_id=key_id, csrf_token=secrets.token_urlsafe(32), issued_at=issued_at
        )
        # NOTE: the issue time in microseconds, not the signer's whole seconds: a sign-in in the
        # same second as a sign-out must outlive it.
        issued = int(session.issued_at.timestamp() * 1_000_000)
        value = self._sessions.dumps({"k": str(key_id), "c": session.csrf_token, "t": issued})
        return value, session

    def read(self, value: str | None) -> WebSession | None:
        """The session of a cookie value; None when it is missing, forged or expired."""
        if not value:
            return None
        try:
            data = self._sessions.loads(value, max_age=self.max_age_seconds)
            return WebSession(
                key_id=uuid.UUID(data["k"]),
                csrf_token=str(data["c"]),
                issued_at=datetime.fromtimestamp(int(data["t"]) / 1_000_000, UTC),
            )
        except (BadSignature, KeyError, TypeError, ValueError, OverflowError, OSError):
            return None

    def sign_in_token(self) -> tuple[str, str]:
        """A token for the sign-in form and the cookie value that vouches for it."""
        token = secrets.token_urlsafe(32)
        return token, self._sign_in.dumps(token)

    def sign_in_token_matches(self, cookie: str | None, submitted: str | None) -> bool:
        if not cookie or not submitted:
            return False
        try:
            expected = self._sign_in.loads(cookie, max_age=SIGN_IN_FORM_SECONDS)
        except BadSignature:
            return False
        return isinstance(expected, str) and hmac.compare_digest(expected, submitted)


def codec_for(settings: Settings) -> SessionCodec:
    return SessionCodec(session_secret(settings), max_age_seconds=settings.session_max_age_seconds)


# The key behind a session, read on every request (hot: the jobs page polls every 2 s).
_SESSION_KEY = select(
    ApiKey.owner_id, ApiKey.is_admin, ApiKey.revoked_at, ApiKey.sessions_not_before,
    ApiKey.last_used_at,
).where(ApiKey.id == bindparam("key_id"))  # fmt: skip


async def session_principal(
    reads: ReadDatabase, engine: Engine, web_session: WebSession
) -> Principal | None:
    """The admin behind a session, or None once its key is revoked or no longer admin, or the
    session was signed out. The key's use is recorded (on `engine`) when due."""
    found = await reads.rows(_SESSION_KEY, {"key_id": web_session.key_id})
    if not found:
        return None
    ((owner_id, is_admin, revoked_at, not_before, last_used_at),) = found
    if revoked_at is not None or not is_admin:
        return None
    if not_before is not None and web_session.issued_at < not_before:
        return None
    if use_is_due(last_used_at):
        await to_thread.run_sync(record_use_of, engine, web_session.key_id, last_used_at)
    return Principal(owner_id=owner_id, key_id=web_session.key_id, is_admin=True)


def end_sessions(session: Session, key_id: uuid.UUID) -> None:
    """Sign out every dashboard session of the key issued until now (each browser that signed
    in with it, and any copy of their cookies), by the database's clock, as sessions are
    issued."""
    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(sessions_not_before=db_now()))


def set_session_cookie(response: Response, value: str, settings: Settings) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=settings.session_max_age_seconds,
        path=COOKIE_PATH,
        secure=settings.session_cookie_secure,
        httponly=True,
        samesite="strict",
    )


def set_sign_in_cookie(response: Response, value: str, settings: Settings) -> None:
    response.set_cookie(
        SIGN_IN_COOKIE,
        value,
        max_age=SIGN_IN_FORM_SECONDS,
        path=COOKIE_PATH,
        secure=settings.session_cookie_secure,
        httponly=True,
        samesite="strict",
    )


def clear_cookies(
    response: Response,
    settings: Settings,
    names: tuple[str, ...] = (SESSION_COOKIE, SIGN_IN_COOKIE),
) -> None:
    for name in names:
        response.delete_cookie(
            name,
            path=COOKIE_PATH,
            secure=settings.session_cookie_secure,
            httponly=True,
            samesite="strict",
        )


def from_this_site(request: Request) -> bool:
    """Whether a browser says the request comes from this site: its `Origin` names this host,
    or (no Origin) `Sec-Fetch-Site` says same-origin. A client that sends neither is not a
    browser a third-party page can drive; the CSRF token alone guards it."""
    origin = request.headers.get("origin")
    if origin is not None:
        # NOTE: hosts, not schemes, are compared: behind a TLS-terminating proxy the request
        # arrives over http while the browser's Origin says https.
        return origin != "null" and urlsplit(origin).netloc == request.headers.get("host")
    site = request.headers.get("sec-fetch-site")
    return site is None or site in ("same-origin", "none")


def check_csrf(request: Request, expected: str, submitted: str | None) -> None:
    """403 unless the request comes from this site and carries the expected token."""
    if not from_this_site(request):
        raise Problem(403, "cross-site request refused")
    if not submitted or not hmac.compare_digest(expected, submitted):
        raise Problem(403, "the CSRF token is missing or does not match; reload the page")


def safe_next(path: str | None) -> str:
    """Where to go after signing in: a dashboard path of this site, never another site."""
    if path and path.startswith("/admin") and "\\" not in path and "//" not in path:
        return path
    return "/admin"


class SignInRequired(Exception):
    """A dashboard request without credentials: browsers asking for a page are sent to the
    sign-in form, everyone else gets 401."""

    def __init__(self, *, page: bool) -> None:
        super().__init__("sign in with an admin key")
        self.page = page


def install_sign_in_redirect(app: FastAPI) -> None:
    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        if exc.page and "text/html" in request.headers.get("accept", ""):
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            target = f"{SIGN_IN_PATH}?next={quote(safe_next(path), safe='/')}"
            return RedirectResponse(target, status_code=303)
        return problem_response(
            Problem(
                401,
                "an admin key is required: Authorization: Bearer <key>, or sign in at "
                f"{SIGN_IN_PATH}",
                headers={"WWW-Authenticate": "Bearer"},
            )
        )
