"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""


class UserError(Exception):
    """Bad input (arguments, data, checkpoints, paths). Shown without a traceback."""
