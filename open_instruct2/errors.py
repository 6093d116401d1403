"""The one exception type for problems the user can fix.

Anything raised as `UserError` reaches the user as a single line on stderr and exit code 2
(train_grpo.py). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix, in one line."""


class ConfigError(UserError, ValueError):
    """A flag, or a combination of flags, is invalid."""


class DataError(UserError):
    """A dataset source or row is unusable."""
