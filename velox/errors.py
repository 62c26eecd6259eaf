"""Exceptions that carry a one-sentence message meant for the user.

Every error a user can cause (bad config, bad input, missing data, wrong device)
derives from :class:`VeloxError`, so the CLI can print it as one line and exit
non-zero instead of showing a traceback.
"""


class VeloxError(Exception):
    """Caused by the user's input or environment; the message says how to fix it."""


class ConfigError(VeloxError, ValueError):
    """A setting has a wrong type, an unknown key, or a value out of range."""


class DeviceError(VeloxError, RuntimeError):
    """The requested compute device is not available."""


class InputError(VeloxError, ValueError):
    """Observations, vectors or ids passed to the model are invalid; nothing was changed."""


class DataError(VeloxError, ValueError):
    """A data file is missing, unreadable, or does not have the expected format."""
