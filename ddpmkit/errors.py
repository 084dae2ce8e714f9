"""Errors a user can cause. The CLI prints them as one line and exits non-zero, never with a traceback."""


class DdpmkitError(Exception):
    """Base class of every error caused by user input (a path, a file, a flag, a configuration)."""


class FileError(DdpmkitError):
    """A file cannot be read, written, parsed or downloaded (the durable-file helpers of ``ddpmkit.files``)."""


class DataError(DdpmkitError):
    """A data source is missing, empty, corrupt, or too large."""


class CheckpointError(DdpmkitError):
    """A run directory or checkpoint is missing, corrupt, unsafe, or does not match."""


class ConfigError(DdpmkitError):
    """A configuration value is invalid or inconsistent."""
