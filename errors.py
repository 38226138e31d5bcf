"""The one exception type for mistakes a user can fix (bad config, missing file, corrupt shard).

The CLI turns it into a single line `error: <what> (<where>)` and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input, reported as `error: <what> (<where>)`."""

    def __init__(self, what: str, where: str | None = None):
        self.what = what
        self.where = where
        super().__init__(self.line())

    def line(self) -> str:
        return f"error: {self.what}" + (f" ({self.where})" if self.where else "")
