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
