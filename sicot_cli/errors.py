"""The one exception type for errors a user can cause (bad path, bad recipe, bad row).

The CLI turns a :class:`SicotError` into one red line and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno


class SicotError(Exception):
    """A user-facing error: the message names the file, row or key and says what to do."""


# What to do where a write fails for the place, not the data: another folder (every command that
# writes names its output: --out, --run-dir, data.out).
WHERE_ELSE = {
    errno.EROFS: "; the filesystem is read-only: write to a folder on a writable one (--out, --run-dir or data.out)",
    errno.ENOSPC: "; free some space or write to another disk (--out, --run-dir or data.out)",
    errno.EDQUOT: "; over the disk quota: free some space or write to another disk (--out, --run-dir or data.out)",
}
