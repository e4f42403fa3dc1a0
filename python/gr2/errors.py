"""The gr2 exception hierarchy.

Every error gr2 raises on bad input derives from :class:`Gr2Error` and, where it fits, from the
builtin a caller would naturally catch (``ValueError``, ``KeyError``, ``OSError``). The Rust core
raises these same classes (mapped once, in ``rust/src/py/errors.rs``).
"""

from __future__ import annotations


class Gr2Error(Exception):
    """Base class of every gr2 error."""


class InvalidInputError(Gr2Error, ValueError):
    """Wrong dtype, shape or value (NaN/inf, a code out of range, duplicate ids, bad parameter)."""


class UnknownItemError(Gr2Error, KeyError):
    """An item id the index or the request's candidates do not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownSidError(Gr2Error, KeyError):
    """A semantic ID that maps to no item."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptFileError(Gr2Error, OSError):
    """A file that is truncated, has a bad header, or fails its checksum."""


class Gr2IOError(Gr2Error, OSError):
    """An operating-system error while reading or writing a gr2 file."""


class ConstraintError(Gr2Error, RuntimeError):
    """A constrained-decoding state with no allowed token, or a forbidden token fed to it."""


class InternalError(Gr2Error, RuntimeError):
    """A bug in gr2: a Rust panic caught at the binding layer (the message says where). Raised
    instead of letting the panic reach Python as ``pyo3_runtime.PanicException``, which
    ``except Exception`` would not catch."""


class IncompleteGenerationError(ConstraintError):
    """Generation stopped (e.g. at ``max_new_tokens``) before the constraint finished the ranking:
    the output is not a complete permutation of the candidates."""


class DataError(Gr2Error, ValueError):
    """Input data that cannot be used: missing columns, unknown format, empty after filtering."""


class ConfigError(Gr2Error, ValueError):
    """A configuration value that is missing, of the wrong type, or out of range."""


class TrainingError(Gr2Error, RuntimeError):
    """Training diverged (a non-finite loss or weight, e.g. from a learning rate far too high); the
    stage stops before it commits a model."""


__all__ = [
    "Gr2Error",
    "InvalidInputError",
    "UnknownItemError",
    "UnknownSidError",
    "CorruptFileError",
    "Gr2IOError",
    "ConstraintError",
    "InternalError",
    "IncompleteGenerationError",
    "DataError",
    "ConfigError",
    "TrainingError",
]
