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


class ConfigError(CoderError, ValueError):
    """A config file, key or value is wrong; the message names the key."""


class CheckpointError(CoderError, ValueError):
    """A checkpoint file is missing, unreadable, not ours, or does not match the config."""


class DataError(CoderError, ValueError):
    """A data file is missing or malformed; the message names the file and the row/line/shape at fault."""


class ModelFileError(MissingFileError):
    """A pretrained model or tokenizer directory is missing or unreadable."""


class NonFiniteLossError(CoderError, RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


class EvaluationError(CoderError, ValueError):
    """An evaluation protocol asked of a split it does not fit."""


class NonFiniteScoresError(CoderError, ValueError):
    """Embeddings or similarities hold NaN/inf: a diverged model has no recall to report."""


class EccvSplitError(CoderError, ValueError):
    """ECCV Caption metrics were asked for a split that is not COCO's 5K test."""


class ReportError(CoderError, ValueError):
    """A report input is missing or inconsistent (images folder, image file, checkpoint contents)."""


class ConceptError(CoderError, ValueError):
    """Bad input for the concept vocabulary (file, key or shape named in the message)."""


class VocabularyError(CoderError, ValueError):
    """A word vocabulary or word-vector file (the BiGRU text encoder's) is unreadable, truncated or does not
    fit the model; the message names the file."""
