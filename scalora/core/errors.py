"""The one exception type for input a user can fix."""

from __future__ import annotations


class UserError(ValueError):
    """A config value, path, file, adapter or model that cannot work, with what to do instead. The `scalora`
    commands print its message alone and exit with status 2; in Python it is a ValueError, as peft's are."""
