"""Errors a user can cause, with where they happened.

CLIs turn these into one line on stderr and exit code 2; nothing else should be caught broadly.
"""


class MindRLHFError(Exception):
    """Base class for every error this package raises on purpose."""


class InputError(MindRLHFError):
    """Bad input data: names the file, the 1-based line and the field."""

    def __init__(self, path, line=None, field=None, reason=""):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        where = self.path
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {reason}")


class ConfigError(MindRLHFError):
    """A configuration that cannot run, caught before any compute starts."""


class OutputExistsError(MindRLHFError):
    """Refusing to overwrite an existing output without --overwrite."""


class OutputWriteError(MindRLHFError):
    """An output could not be written (disk full, I/O error): names the folder and the space it needed."""
