"""The one base class of user mistakes, which `main.py` prints as one line without a traceback.

A `UserError` means the user gave something that cannot work (a config key or value, a data
file or folder, weights, the workdir, a model folder); its message names the file or key and
says what to do. Any other exception is a defect of the program and keeps its traceback.
Specific errors subclass it together with the builtin they refine (ValueError,
FileNotFoundError), so callers that catch the builtin keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the run's inputs; the message says which file or key and what to change."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the run needs does not exist; the message names it."""
