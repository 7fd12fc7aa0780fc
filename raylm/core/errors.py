"""The one exception type for mistakes a user can fix (a bad path, key, record or request).

The CLI prints a UserError as one line, without a traceback; everything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the thing and what would be right."""
