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


class SettingError(ConfigError, ValueError):
    """One setting's value is refused; ``setting`` names it, ``detail`` says why, after the name (``lead``) or alone.

    ``str()`` names the setting itself (``batch_size must be ...``): the library speaks of settings. ``named(name)``
    names it any other way: the command line shows its flag (``cli.common.error_line``, with ``flag_of``).
    """

    def __init__(self, setting: str, detail: str, *, lead: bool = True):
        super().__init__(setting, detail)
        self.setting, self.detail, self.lead = setting, detail, lead

    def named(self, name: str) -> str:
        return name + self.detail if self.lead else self.detail

    def __str__(self) -> str:
        return self.named(self.setting)
