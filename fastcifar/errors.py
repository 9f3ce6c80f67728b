"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""


class UserError(Exception):
    """Bad input (arguments, data, checkpoints, paths). Shown without a traceback."""


class NothingToResume(Exception):
    """`--resume` of a run that already finished: said in one line, exit status 0."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
