"""The one exception type for errors a user can cause (bad path, bad recipe, bad row).

The CLI turns a :class:`SicotError` into one red line and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class SicotError(Exception):
    """A user-facing error: the message names the file, row or key and says what to do."""
