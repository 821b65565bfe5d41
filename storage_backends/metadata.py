"""Reading metadata that anyone may have written (a local sidecar, an object's x-amz-meta-*):
each field is taken only when it is something the gateway could have written, else it reads
as its default (DESIGN.md §8), and the backup is named in a warning once per process."""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

# Times outside these bounds overflow somewhere between the store and the response
# (astimezone, strftime's %Y, a float's round trip), so they read as the default too.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
_MAX_TIME_TEXT = 64
MAX_FILENAME = 1024
# control characters and lone surrogates: the latter cannot be encoded as UTF-8 at all
_UNFIT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# the most recent backups warned about are remembered, so hostile metadata cannot grow this
_WARNED_MAX = 4096
_warned: OrderedDict[str, None] = OrderedDict()
_warned_lock = threading.Lock()  # listings and reads run in several threads


def fit_filename(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_FILENAME
        and _UNFIT_TEXT.search(value) is None
    )


def parse_time(value: Any) -> datetime | None:
    """An aware ISO 8601 time between 1970 and 9999 (in UTC), else None."""
    if not isinstance(value, str) or len(value) > _MAX_TIME_TEXT:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            return None
        when = parsed.astimezone(UTC)  # OverflowError: 9999-12-31T23:59:59-12:00
    except (ValueError, OverflowError):
        return None
    return when if EARLIEST <= when <= LATEST else None


def held_in_range(when: datetime) -> datetime:
    """A store's own time (an mtime anyone may set, a Last-Modified) within the bounds."""
    return min(max(when, EARLIEST), LATEST)


def warn_once(log: logging.Logger, what: str, place: str, problems: list[str]) -> None:
    """`<what> of <place> read as defaults: <problems>`, once per place and process."""
    with _warned_lock:
        if place in _warned:
            _warned.move_to_end(place)
            return
        _warned[place] = None
        if len(_warned) > _WARNED_MAX:
            _warned.popitem(last=False)
    log.warning("%s of %s read as defaults: %s", what, place, ", ".join(problems))
