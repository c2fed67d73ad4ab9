"""The one base class for problems a user can fix: a file, key, shape or value that is wrong or missing.

`train.py` and `evaluate.py` print a `CoderError` as one `error: ...` line; every other exception is a bug
(or an environment failure) and keeps its traceback. The subclasses keep ValueError / FileNotFoundError as
a second base so code that catches those still works.
"""
from __future__ import annotations


class CoderError(Exception):
    """A user-fixable problem; the message names the file, key, row or shape at fault."""


class MissingFileError(CoderError, FileNotFoundError):
    """A file the run needs is not there; the message says how to obtain it."""


class VocabularyError(CoderError, ValueError):
    """A word vocabulary or word-vector file (the BiGRU text encoder's) is unreadable, truncated or does not
    fit the model; the message names the file."""
