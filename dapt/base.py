"""What every package shares with the command line.

`DaptError` is a problem the user can fix (a bad config value, a missing file);
the CLI prints its message as one line and exits non-zero, without a traceback.
`StrictModel` is the base of every config section: unknown keys are refused so
that a typo never passes silently.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class DaptError(Exception):
    """A user-fixable error; the message names the file, line or field and the fix."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def disk_size(num_bytes: float) -> str:
    """A file or disk size as people read it: 512 KB, 3.2 MB, 14.0 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes / 1e3:.0f} KB"
