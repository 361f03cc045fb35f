"""User-facing errors.

Every problem a user can cause (bad config, bad file, impossible budget) raises a subclass of
:class:`MoelabError` whose message is one line naming the problem and the fix. The CLI prints it as
``error: <message>`` and exits with status 1, without a traceback.
"""


class MoelabError(Exception):
    """A user-facing error: one line that names the problem and how to fix it."""


class ConfigError(MoelabError, ValueError):
    """An invalid configuration value or combination."""


class CheckpointError(MoelabError):
    """A missing, corrupt or incompatible checkpoint."""


class DataError(MoelabError):
    """A missing or malformed data file."""
