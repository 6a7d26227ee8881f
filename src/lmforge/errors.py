"""The one exception type for mistakes a user can fix (bad input, bad config, missing files).

The CLI prints its message as one line on stderr and exits with status 2. Anything else that
escapes is a bug in lmforge and gets a traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message says what was wrong and what to do."""


class PeerFailed(UserError):
    """Under torchrun: another rank refused the run; that rank's message says why (this one
    prints nothing)."""
