"""What the sans-IO parsers share: the sentinel that means "feed me more bytes first" (h11's NEED_DATA)."""

from __future__ import annotations

import enum
from typing import Final, Literal, TypeAlias


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by a parser when more bytes are needed before it can produce its next event."""

NeedData: TypeAlias = Literal[_NeedData.NEED_DATA]
