"""Errors a user can fix. Their message is the whole report: what is wrong, where, and the fix."""


class FlexexpError(Exception):
    """Base of the errors the command-line entry points print without a traceback."""


class ConfigError(FlexexpError, ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


class DataError(FlexexpError, RuntimeError):
    """Data that cannot be loaded; the message names the dataset, the path and the fix."""


class DivergenceError(FlexexpError, FloatingPointError):
    """The training loss became NaN or infinite."""


class ReportError(FlexexpError, OSError):
    """The report cannot be written (out_dir is a file, not writable, or its disk is full);
    the message names the folder, the cause and the fix."""
