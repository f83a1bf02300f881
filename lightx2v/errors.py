"""User-facing errors.

Anything a user can cause (bad flags, missing files, corrupt checkpoints) raises
`LX2VError` with one line that names the problem; the CLI prints it and exits non-zero.
Programming errors stay ordinary exceptions with tracebacks.
"""


class LX2VError(Exception):
    """An error caused by input the user controls; its message is one readable line."""


class CheckpointError(LX2VError):
    """A checkpoint directory is missing, incomplete, corrupt or of an unknown layout."""
