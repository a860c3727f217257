"""The one base class of user errors (bad configuration, missing or malformed input).

Every package's input errors derive from it, so an entry point reports any of them in one line
with exit status 2 instead of a traceback. It lives in the lowest package so that all can share it.
"""


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a file's contents. The message names it."""


class HFFormatError(UserError):
    """An HF checkpoint directory is missing something or describes an unsupported model.

    Here rather than in hf.py so that the format modules (hf_llama, hf_deepseek) raise it without
    importing hf.py, which imports them."""
