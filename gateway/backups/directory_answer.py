"""The one answer when the directory cannot answer (DESIGN.md §2, step 4): a 503
`directory unavailable` with Retry-After, its cause logged, nothing touched — never a stale
allow."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from ..directory import DirectoryUnavailable
from ..http.errors import directory_unavailable

log = logging.getLogger(__name__)


@contextlib.contextmanager
def directory_or_503() -> Iterator[None]:
    """Around the directory calls of a request: DirectoryUnavailable becomes the 503."""
    try:
        yield
    except DirectoryUnavailable as exc:
        log.warning("directory unavailable: %s", exc)
        raise directory_unavailable() from None
