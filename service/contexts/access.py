"""Who sees what: an owner sees its own rows; an admin sees every owner's."""

from __future__ import annotations

import uuid

from sqlalchemy import ColumnElement, bindparam, true
from sqlalchemy.orm import InstrumentedAttribute

from service.auth import Principal


def visible_to(
    principal: Principal, owner_column: InstrumentedAttribute[uuid.UUID]
) -> ColumnElement[bool]:
    """A WHERE clause keeping the rows `principal` may see.

    NOTE: rows of other owners are filtered out rather than refused, so their ids answer 404,
    never 403: an id alone must not reveal that another owner's resource exists.
    """
    return true() if principal.is_admin else owner_column == principal.owner_id


OWNER_PARAM = "owner_id"


def visible_to_any(
    admin: bool, owner_column: InstrumentedAttribute[uuid.UUID]
) -> ColumnElement[bool]:
    """`visible_to` for a statement compiled once and run for many principals (a hot read):
    for a non-admin the owner is the bind parameter `owner_id` (`owner_param` gives its
    value)."""
    return true() if admin else owner_column == bindparam(OWNER_PARAM)


def owner_param(principal: Principal) -> dict[str, uuid.UUID]:
    return {OWNER_PARAM: principal.owner_id}
