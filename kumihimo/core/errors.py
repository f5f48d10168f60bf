"""The one exception type for problems a user can fix (bad config, missing file, bad input).

The CLI prints its message as one line and exits with code 2; anything else is a bug and keeps its
traceback.
"""


class UserError(ValueError):
    """Something the user can fix. The message says what was wrong and how to fix it."""
