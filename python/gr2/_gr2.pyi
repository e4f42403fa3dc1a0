"""Type stubs of the native module gr2._gr2 (rust/src/py)."""

__version__: str

# --- constrained decoding (rust/src/py/constraint.rs; helper `decode`) -----------------------
import numpy as np
import numpy.typing as npt

class TokenMap:
    """Token ids of the SID vocabulary and the format tags, for logits of width ``vocab_size``."""
    def __init__(
        self,
        code_ids: npt.NDArray[np.int64],  # (L, max_codes), -1 padding
        *,
        sid_begin: int,
        sid_end: int,
        think_open: int,
        think_close: int,
        answer_open: int,
        answer_close: int,
        eos: int,
        vocab_size: int,
        reasoning_vocab: int | None = None,
        forbidden_in_reasoning: list[int] | None = None,
    ) -> None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def words(self) -> int: ...  # ceil(vocab_size / 32)
    @property
    def levels(self) -> int: ...
    @property
    def eos(self) -> int: ...
    def reasoning_forbidden(self) -> npt.NDArray[np.int64]: ...

class SidTrie:
    """Prefix tree over a catalog's SIDs (catalog-mode decoding)."""
    def __init__(self, token_map: TokenMap, item_ids: npt.NDArray[np.uint64], codes: npt.NDArray[np.uint16]) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, item: int) -> bool: ...

class ConstraintBatch:
    """Many per-request decoding automata; batched mask fill with the GIL released."""
    def __init__(self, token_map: TokenMap) -> None: ...
    def __len__(self) -> int: ...
    def add_rerank(
        self,
        candidates: npt.NDArray[np.uint64],  # (B, K)
        codes: npt.NDArray[np.uint16],  # (B, K, L)
        *,
        reasoning: str = "think",  # "think" | "in_think" | "disabled"
        max_reasoning_tokens: int = 128,
        repeat: int = 1,
    ) -> int: ...
    def add_catalog(
        self,
        trie: SidTrie,
        *,
        rows: int | None = None,
        n_items: int = 1,
        exclude: list[npt.NDArray[np.uint64]] | None = None,
        reasoning: str = "disabled",
        max_reasoning_tokens: int = 0,
        answer_tags: bool = False,
    ) -> int: ...
    def select(self, rows: list[int]) -> ConstraintBatch: ...
    def advance(self, rows: npt.NDArray[np.int64], tokens: npt.NDArray[np.int64]) -> None: ...
    def fill_bitmask(self, out: npt.NDArray[np.int32], rows: npt.NDArray[np.int64] | None = None) -> None: ...
    def allowed(
        self, rows: npt.NDArray[np.int64] | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.bool_]]: ...
    def allowed_ids(self, row: int) -> npt.NDArray[np.int64]: ...
    def phases(self) -> npt.NDArray[np.uint8]: ...  # 0 free, 1 constrained, 2 in SID, 3 done
    def emitted(self, row: int) -> npt.NDArray[np.uint64]: ...
    def reasoning_tokens(self, row: int) -> int: ...
