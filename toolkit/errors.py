"""The one exception type users see: the CLI prints its message on one line, no traceback."""


class CellfuseError(Exception):
    """Bad input or an impossible request, explained in the message (name the file and the problem)."""
