"""`/admin`: the operators' dashboard (admin keys only); a placeholder for now."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from service.api.deps import AdminPrincipal
from service.api.responses import problem_responses

router = APIRouter(tags=["admin"])

PLACEHOLDER = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>AlignDiff admin</title></head>
<body><h1>AlignDiff admin — dashboard coming</h1></body>
</html>
"""


@router.get("/admin", response_class=HTMLResponse, responses=problem_responses(401, 403, 422))
def admin_dashboard(_: AdminPrincipal) -> HTMLResponse:
    """The admin dashboard (HTML)."""
    return HTMLResponse(PLACEHOLDER)
