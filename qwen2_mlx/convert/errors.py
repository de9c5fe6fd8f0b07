"""The one exception type the converter raises for bad input; the CLI prints it and exits 2."""


class ConvertError(Exception):
    """A user-facing problem (bad file, missing field, no disk space...), stated in one line."""
