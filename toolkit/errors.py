"""The one exception type users see, and the exit statuses the `cellfuse` command ends with.

Every failure ends with one line starting "Error: " on standard error:

- exit 2 (EXIT_USER): what you gave is wrong: a mistyped command or option (Click's usage errors), a
  missing or malformed data file, a bad recipe or `--set`, an output that would replace something.
  Fix the command or the file and run it again. No traceback.
- exit 1 (EXIT_INTERNAL): cellfuse itself failed (a bug, or TensorFlow failing on good input): the
  traceback comes first, for a bug report.
"""

EXIT_INTERNAL = 1
EXIT_USER = 2  # the same status Click gives a usage error: both mean "fix what you typed or gave"
ERROR_PREFIX = "Error: "  # Click's own prefix for usage errors, so every failure reads alike


class CellfuseError(Exception):
    """Bad input or an impossible request, explained in the message (name the file and the problem)."""
