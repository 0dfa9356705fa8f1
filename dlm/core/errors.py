"""The one exception class for what the user can fix."""


class UserError(ValueError):
    """A bad option, file or destination that the user can fix: the command line prints its message
    as one line, with no traceback. Any other exception is a bug in dlm and shows its traceback."""
