"""The exceptions the CLI turns into one line, without a traceback, and an exit code.

- UserError: a mistake the user can fix (a bad path, key, record or request): `error: ...`, exit 2.
- RunFailed: a failure at run time, its details written to a log the line names: `error: ...`, exit 1.
- RunStopped: a run stopped by a signal, saying how to go on: exit 128 + the signal.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the thing and what would be right."""


class RunFailed(Exception):
    """A run that failed at run time (a full disk, a worker that kept failing): the message is the
    user's one line (what failed, the path, what to do, the log with the details); exit code 1."""

    exit_code = 1


class RunStopped(Exception):
    """A run stopped on request (a signal), after saving what it could: the message says how to go on."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code  # 128 + the signal's number, as a shell reports a process a signal ended
