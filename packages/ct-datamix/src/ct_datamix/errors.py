"""The one exception type for bad datamix input (the CLI reports it in one line, exit status 2)."""


class DatamixError(ValueError):
    """Bad input to a datamix computation; the message names the file, source or checkpoint."""
