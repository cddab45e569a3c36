"""Who sees what: an owner sees its own rows; an admin sees every owner's."""

from __future__ import annotations

import uuid

from sqlalchemy import ColumnElement, true
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
