"""The one use of the standard library's logging internals, with its test in
tests/test_library_internals.py (it fails when Python changes underneath it)."""

from __future__ import annotations

import logging


def skip_caller_lookup() -> None:
    """No stack walk per record to find the caller's file and line: nobody reads them here.
    The logging HOWTO's "Optimization" section names this module attribute as the switch."""
    logging._srcfile = None
