"""gr2: a generative reasoning reranker (GR2) for recommender systems.

Semantic IDs for a catalog (Rust RQ encoder + index), LLM mid-training on them, reasoning SFT on
teacher traces, DAPO reinforcement learning on verifiable ranking rewards, and constrained
decoding that guarantees the output is a permutation of the candidates given.
"""

from gr2._gr2 import RQCodebooks, SidIndex, SidIndexWriter, __version__
from gr2.errors import (
    ConfigError,
    ConstraintError,
    CorruptFileError,
    DataError,
    Gr2Error,
    Gr2IOError,
    IncompleteGenerationError,
    InternalError,
    InvalidInputError,
    TrainingError,
    UnknownItemError,
    UnknownSidError,
)
from gr2.rq import encode_npy
from gr2.rewards import RewardBatch, verify_rewards
from gr2.tokens import SidTokens, add_sid_tokens, sid_to_text
from gr2._gr2 import ConstraintBatch, SidTrie, TokenMap

__all__ = [
    "__version__",
    "ConfigError",
    "ConstraintError",
    "CorruptFileError",
    "DataError",
    "Gr2Error",
    "Gr2IOError",
    "IncompleteGenerationError",
    "InternalError",
    "InvalidInputError",
    "TrainingError",
    "UnknownItemError",
    "UnknownSidError",
    "RQCodebooks",
    "SidIndex",
    "SidIndexWriter",
    "encode_npy",
    "encode_parquet",
    "sids_parquet",
    "SidTokens",
    "add_sid_tokens",
    "sid_to_text",
    "ConstraintBatch",
    "SidTrie",
    "TokenMap",
    "RerankLogitsProcessor",
    "RerankResult",
    "constrained_decode",
    "catalog_decode",
    "RewardBatch",
    "verify_rewards",
]


_LAZY = {  # heavy (torch, transformers, pyarrow): imported on first use, so `import gr2` stays fast
    "encode_parquet": "gr2.rq_parquet",
    "sids_parquet": "gr2.rq_parquet",
    "constrained_decode": "gr2.decoding",
    "catalog_decode": "gr2.decoding",
    "RerankResult": "gr2.decoding",
    "RerankLogitsProcessor": "gr2.decoding",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gr2' has no attribute {name!r}")
