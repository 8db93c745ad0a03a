"""Errors lorafit raises for bad user input. The CLI prints them without a traceback and exits 2.

Every message names the place (file:line, config key, module name) and says how to fix it.
"""


class LorafitError(Exception):
    """A problem with the user's input or files; the message is meant for the user."""


class ConfigError(LorafitError):
    """A bad config file, key or value."""


class DataError(LorafitError):
    """A bad dataset file or record."""


class AdapterError(LorafitError):
    """An adapter that does not fit, is corrupt, or is missing."""
