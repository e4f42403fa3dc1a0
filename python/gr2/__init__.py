"""gr2: a generative reasoning reranker (GR2) for recommender systems.

Semantic IDs for a catalog (Rust RQ encoder + index), LLM mid-training on them, reasoning SFT on
teacher traces, DAPO reinforcement learning on verifiable ranking rewards, and constrained
decoding that guarantees the output is a permutation of the candidates given.
"""

from gr2._gr2 import SidIndex, __version__
from gr2.errors import (
    ConfigError,
    ConstraintError,
    CorruptFileError,
    DataError,
    Gr2Error,
    Gr2IOError,
    InvalidInputError,
    UnknownItemError,
    UnknownSidError,
)
from gr2.tokens import SidTokens, add_sid_tokens, sid_to_text

__all__ = [
    "__version__",
    "ConfigError",
    "ConstraintError",
    "CorruptFileError",
    "DataError",
    "Gr2Error",
    "Gr2IOError",
    "InvalidInputError",
    "UnknownItemError",
    "UnknownSidError",
    "SidIndex",
    "SidTokens",
    "add_sid_tokens",
    "sid_to_text",
]
