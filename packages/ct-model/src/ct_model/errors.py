"""The one base class of user errors (bad configuration, missing or malformed input).

Every package's input errors derive from it, so an entry point reports any of them in one line
with exit status 2 instead of a traceback. It lives in the lowest package so that all can share it.
"""


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a file's contents. The message names it."""
