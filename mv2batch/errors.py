"""The small family of errors the core raises; the CLI turns each into one line and an exit code."""


class Mv2batchError(Exception):
    """A user-facing failure: bad input, model, configuration or output directory."""

    exit_code = 1


class ConfigError(Mv2batchError):
    """An option or combination of options that cannot work."""

    exit_code = 2


class InputError(Mv2batchError):
    """The input folder or dataset is missing, empty or unreadable."""

    exit_code = 3


class ModelError(Mv2batchError):
    """The checkpoint cannot be found, reached, or is not a MobileViTV2 of the right head."""

    exit_code = 4


class OutputError(Mv2batchError):
    """The output directory holds another run, or cannot be written (full disk, permissions)."""

    exit_code = 5
