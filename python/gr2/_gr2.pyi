"""Type stubs of the native module gr2._gr2 (rust/src/py).

Errors are :class:`gr2.Gr2Error` subclasses only: bad arguments raise InvalidInputError (naming the
argument) and friends, and a Rust panic (a bug) is caught at the binding and raised as
:class:`gr2.InternalError`, never as ``pyo3_runtime.PanicException``."""

import numpy as np
import os
from typing import Any, Sequence
import numpy.typing as npt

__version__: str

MAX_SID_LEVELS: int
"""Most SID levels a TokenMap, SidTrie or reward verification accepts (26: code tokens are spelled
``<s_X_N>`` with one level letter X in a..z)."""

def _panic_for_tests() -> None:
    """Test hook: a deliberate Rust panic, which every binding's guard turns into
    :class:`gr2.InternalError` (never ``pyo3_runtime.PanicException``)."""

# --- RQ encoding (rust/src/rq, rust/src/py/rq.rs) -------------------------------------------------

class RQCodebooks:
    """Residual-quantization codebooks: ``levels`` (L) levels of ``codebook_size`` (K) codes of
    dimension ``dim`` (D).

    ``codebooks`` must be a float32 numpy array of shape (L, K, D) with 1 <= K <= 65536 and finite
    values. It is always copied (the encoder keeps its own packed layout), so any memory layout
    is accepted. Instances are immutable, picklable and safe to share between threads.

    Encoding is greedy residual assignment: at each level the code with the smallest squared L2
    distance to the residual, ties to the lowest index. Distances are computed in float32 as
    ``||c||^2 - 2 r.c`` (``||r||^2`` is constant per row); codes whose exact distances differ by
    less than about 1e-6 x (||r||^2 + ||c||^2) may be ordered differently than exact arithmetic
    would. Raises :class:`gr2.InvalidInputError` on a wrong dtype, shape or non-finite value.
    """

    def __init__(self, codebooks: npt.NDArray[np.float32]) -> None: ...
    @property
    def levels(self) -> int:
        """Number of levels L."""
    @property
    def codebook_size(self) -> int:
        """Codes per level K."""
    @property
    def dim(self) -> int:
        """Embedding dimension D."""
    @property
    def codebooks(self) -> npt.NDArray[np.float32]:
        """A float32 (L, K, D) copy of the codebooks."""
    def encode(self, x: npt.NDArray[np.float32], beam: int = 1, *, row_offset: int = 0) -> npt.NDArray[np.uint16]:
        """Encodes float32 (n, D) rows into uint16 (n, L) codes.

        ``row_offset``: the row number of ``x[0]`` in error messages, for chunks of a larger array.
        ``None`` for either means its default. A non-integer or out-of-range ``beam``/``row_offset``
        (``2.5``, ``2**63``) is an InvalidInputError naming the argument.

        ``beam == 1`` is greedy. ``beam = B > 1`` (at most 1024) keeps the B partial paths with the
        smallest squared error after each level and returns the best final one, or the greedy
        codes when those are at least as good (so beam search is never worse than greedy).
        C-contiguous input is read in place; other layouts are copied once. The GIL is released
        while encoding. Raises InvalidInputError for a non-float32 dtype, a shape other than
        (n, D), NaN/inf values (the message names the row and column), beam < 1 or > 1024, or
        values so large that squared distances overflow float32.
        """
    def decode(self, codes: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
        """Decodes uint16 (n, L) codes into float32 (n, D): the sum of the chosen codes in level
        order. Raises InvalidInputError for a non-uint16 dtype, a shape other than (n, L) or a
        code >= K (the message names the row and level)."""
    def __reduce__(self) -> tuple[type[RQCodebooks], tuple[npt.NDArray[np.float32]]]: ...
# --- constrained decoding (rust/src/py/constraint.rs) --------------------------------------------

class TokenMap:
    """Token ids of the SID vocabulary and the format tags, for logits of width ``vocab_size``
    (at most 2**26); at most :data:`MAX_SID_LEVELS` levels.

    The one token map of gr2: constrained decoding (``ConstraintBatch``) and the token-id path of
    :func:`gr2.verify_rewards` both read it. ``eos=None`` makes a map that only verifies
    completions (the verifier reads tags and codes only); ``ConstraintBatch`` refuses it."""
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
        vocab_size: int,
        eos: int | None = None,
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
    def eos(self) -> int | None: ...
    def reasoning_forbidden(self) -> npt.NDArray[np.int64]: ...

class SidTrie:
    """Prefix tree over a catalog's SIDs (catalog-mode decoding): ``codes[i]`` (uint16, one code per
    level, at most :data:`MAX_SID_LEVELS` levels) is the unique SID of ``item_ids[i]``.

    It holds codes, not token ids, so one trie serves any token map: ``ConstraintBatch.add_catalog``
    raises InvalidInputError when the batch's token map has other levels or lacks a token for one
    of the trie's codes."""
    def __init__(self, item_ids: npt.NDArray[np.uint64], codes: npt.NDArray[np.uint16]) -> None: ...
    @staticmethod
    def from_index(index: SidIndex) -> SidTrie:
        """The trie of every item of ``index``, read from it in Rust (no codes() copy). Built on
        the first call and kept with the index (which never changes; ``extend``/``remove`` return
        new indexes): later calls return the same trie, at no cost."""
    def __len__(self) -> int: ...
    def __contains__(self, item_id: int) -> bool:
        """Integers outside the uint64 range are not contained; a non-integer is an InvalidInputError."""

class ConstraintBatch:
    """Many per-request decoding automata; batched mask fill with the GIL released.

    Every argument is checked: a wrongly typed or out-of-range one is an InvalidInputError naming
    it; a token the constraint forbids is a ConstraintError (and no row changes)."""
    def __init__(self, token_map: TokenMap) -> None: ...
    def __len__(self) -> int: ...
    def add_rerank(
        self,
        candidates: npt.NDArray[np.uint64],  # (B, K)
        codes: npt.NDArray[np.uint16],  # (B, K, L)
        *,
        reasoning: str = "think",  # "think" | "in_think" | "disabled"
        max_reasoning_tokens: int = 128,
        repeat: int = 1,  # 1..=MAX_REPEAT (4096); a batch holds at most 2**20 rows
    ) -> int: ...
    def add_rerank_ragged(
        self,
        items: npt.NDArray[np.uint64],  # (N,) every request's candidates, flat
        codes: npt.NDArray[np.uint16],  # (N, L)
        offsets: npt.NDArray[np.int64],  # (B + 1,) request i = items[offsets[i]:offsets[i + 1]]
        *,
        reasoning: str = "think",
        max_reasoning_tokens: int = 128,
        repeat: int = 1,  # 1..=MAX_REPEAT (4096); a batch holds at most 2**20 rows
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
# --- reward verification (rust/src/py/reward.rs; wrapped by gr2.rewards.verify_rewards) ---

INVALID_REASON_NAMES: list[str]
NO_ITEM: int

def _verify_rewards_text(
    texts: list[str],
    trailers: list[str],
    items: npt.NDArray[np.uint64],  # (N,) flat candidates
    sids: npt.NDArray[np.uint16],  # (N, L)
    cand_offsets: npt.NDArray[np.int64] | None,  # (B + 1,) ragged rows; None: rows of `width`
    width: int,  # largest K
    targets: npt.NDArray[np.uint64],
    catalog: SidIndex | None,
    relevance: npt.NDArray[np.float32] | None,  # (N,)
    alpha: float,
    conditional: bool,
    invalid_reward: float,
    metric_ks: list[int],
    graded_k: int,
    kind: str,
) -> dict[str, np.ndarray]: ...
def _verify_rewards_tokens(
    ids: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    token_map: TokenMap,  # tags and codes (gr2.rewards builds it once per SidTokens, eos=None)
    whitespace_ids: list[int],
    trailer_ids: list[int],
    items: npt.NDArray[np.uint64],  # (N,) flat candidates
    sids: npt.NDArray[np.uint16],  # (N, L)
    cand_offsets: npt.NDArray[np.int64] | None,  # (B + 1,) ragged rows; None: rows of `width`
    width: int,  # largest K
    targets: npt.NDArray[np.uint64],
    catalog: SidIndex | None,
    relevance: npt.NDArray[np.float32] | None,  # (N,)
    alpha: float,
    conditional: bool,
    invalid_reward: float,
    metric_ks: list[int],
    graded_k: int,
    kind: str,
) -> dict[str, np.ndarray]: ...
def _parse_completions_text(
    texts: list[str], trailers: list[str], levels: int | None  # None: each answer's first SID's count
) -> list[dict[str, Any] | None]: ...  # think, answer, sids (str indices), codes (n, L) uint16; None: malformed
def _parse_completion_tokens(
    ids: list[int], token_map: TokenMap, whitespace_ids: list[int], trailer_ids: list[int]
) -> dict[str, Any] | None: ...  # as _parse_completions_text, positions are token indices
# --- SidIndex (rust/src/index, rust/src/py/index.rs) -------------------------------------------

import pathlib  # SidIndexWriter.temp_dir


class SidIndex:
    """Bijection between item ids (uint64) and semantic IDs (one uint16 code per level).

    ``build`` repairs colliding SIDs deterministically: per collision group the smallest item id
    keeps the SID; every other item moves to the nearest free last-level code under the same
    prefix (ties to the lower code), in ascending (SID, item id) order. Only when a prefix's last
    level is full is one disambiguation level appended to every SID (0 for items that need none;
    the items still sharing a SID are numbered 0, 1, 2, ... by ascending id). SIDs have at most
    64 levels, the appended one included (``build`` refuses more, so every index that builds also
    saves and loads). Immutable, safe to share between threads, and picklable (as the bytes of the
    file format). Every error is a :class:`gr2.Gr2Error` subclass; a wrongly typed argument is an
    InvalidInputError naming it.
    """

    @staticmethod
    def build(
        item_ids: npt.NDArray[np.uint64],
        codes: npt.NDArray[np.uint16],
        codebook_size: int | Sequence[int] | None = None,
    ) -> SidIndex:
        """``codes[i]`` (shape (n, L)) is the SID of ``item_ids[i]`` (shape (n,), unique).

        ``codebook_size``: exclusive upper bound of the codes, one int for all levels or one per
        level; default ``max(256, codes.max() + 1)``. Raises InvalidInputError on wrong
        dtype/shape, duplicate ids, or a code >= codebook_size."""
    def extend(self, item_ids: npt.NDArray[np.uint64], codes: npt.NDArray[np.uint16]) -> SidIndex:
        """A new index with ``item_ids`` (shape (m,)) added with ``codes`` (shape (m, L)); this
        index is unchanged and **every item it holds keeps its SID**.

        ``L`` is ``levels``, or for an index with a disambiguation level also ``levels - 1`` (the
        input levels; the disambiguation code is then 0). Collisions are repaired among the new
        items only: a new item whose SID is free keeps it (the smallest id of new items sharing a
        SID); every other moves to the free code nearest its own on the last input level under
        the same prefix (ties to the lower code), then, when that prefix is full and the index has
        a disambiguation level, to the nearest free code on it. InvalidInputError (naming the row)
        for an id already in the index, a duplicate new id, a wrong width or a code out of range,
        and when a new item could only be placed by adding a level or moving existing items
        (rebuild with ``build`` then). ``generation`` of the result is one more."""
    def remove(self, item_ids: npt.NDArray[np.uint64]) -> SidIndex:
        """A new index without ``item_ids``; every other item keeps its SID and the levels stay.
        UnknownItemError for an id the index lacks, InvalidInputError for a repeated id (both
        naming the row). ``generation`` of the result is one more."""
    @property
    def generation(self) -> int:
        """0 for an index fresh from ``build``; +1 per ``extend``/``remove`` (stored in the file
        header; files written before gr2 recorded it read as 0)."""
    @staticmethod
    def load(path: str | os.PathLike[str], mmap: bool = False, verify: bool = True) -> SidIndex:
        """Loads and validates a saved index (CorruptFileError, Gr2IOError; a directory is a
        Gr2IOError saying so).

        By default the whole file is read into memory the index owns and its checksum verified:
        the loaded index never changes, whatever later happens to the file (the right mode for
        long-lived servers). ``mmap=True`` memory-maps the file instead (validated once at load,
        pages shared with the page cache): the file must then **not be modified in place** while
        the index is alive: overwriting it changes the answers of the loaded index and truncating
        it kills the process with SIGBUS; only a change during the load itself is detected.
        Replacing the file by rename (what ``save`` does) is safe: the map keeps the old inode.

        ``verify=False`` trusts the file: the header and section table are still checked, but
        not the checksum nor the arrays (an O(n) pass: about 50 s at 1e9 items). With ``mmap=True``
        the load is then constant-time and pages come in as queries touch them -- the mode for an
        index larger than RAM. Use it for files your own pipeline wrote; a damaged file then gives
        wrong answers or an InternalError rather than a CorruptFileError at load."""
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the index atomically: a temporary file ``.{name}.tmp-{pid}-{nonce}`` in the same
        folder, fsync, rename over ``path``. The old file is never modified in place (an index
        loaded from it with ``mmap=True`` keeps seeing it). Temporary files left by killed saves
        to the same path (writer pid gone, lock free) are removed first."""
    def to_bytes(self) -> bytes:
        """The bytes ``save`` writes (the file format, checksummed)."""
    @staticmethod
    def from_bytes(data: bytes | bytearray) -> SidIndex:
        """An index from ``to_bytes()`` output, copied and validated like ``load``."""
    @property
    def is_mapped(self) -> bool:
        """Whether the index was loaded with ``mmap=True``."""
    def sids(self, item_ids: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint16]:
        """uint64 (m,) -> uint16 (m, levels); UnknownItemError names the first unknown id and row."""
    def items(self, sids: npt.NDArray[np.uint16]) -> npt.NDArray[np.uint64]:
        """uint16 (m, levels) -> uint64 (m,); UnknownSidError names the first unknown SID and row."""
    def item_ids(self) -> npt.NDArray[np.uint64]:
        """All item ids, in SID order (aligned with ``codes()``)."""
    def codes(self) -> npt.NDArray[np.uint16]:
        """All SIDs, ascending: uint16 (n, levels)."""
    def children(self, prefix: Sequence[int] | npt.NDArray[np.integer]) -> npt.NDArray[np.uint16]:
        """Distinct next-level codes under ``prefix`` (ascending); empty for an absent prefix or
        a complete SID. InvalidInputError for a code >= its level size or a too-long prefix."""
    def prefix_range(self, prefix: Sequence[int] | npt.NDArray[np.integer]) -> tuple[int, int]:
        """``(start, end)``: the rows of ``item_ids()``/``codes()`` whose SID starts with ``prefix``."""
    def repair_report(self) -> dict[str, object]:
        """items, levels_in, levels_out, uniqueness_before_repair, unique_items_before,
        distinct_sids_before, distinct_ratio_before, collision_groups, collision_group_sizes
        ({size: count}), items_moved, max_move_distance, full_prefixes, level_appended,
        appended_level_size, items_disambiguated."""
    @property
    def levels(self) -> int: ...
    @property
    def level_sizes(self) -> list[int]: ...
    @property
    def uniqueness_before_repair(self) -> float:
        """Share of items whose input SID no other item shared (1.0 when empty)."""
    @property
    def nbytes(self) -> int:
        """Bytes held for lookups: 20 per item when a packed SID fits 32 bits (e.g. 4 levels of 256
        codes), else 24, plus two bucket tables of 1/8 byte per item each."""
    def __len__(self) -> int: ...
    def __contains__(self, item_id: int | np.integer) -> bool:
        """Membership of an integer id (ints outside the uint64 range are never contained);
        anything that is not an integer (a float such as ``10.0``, a str) is InvalidInputError."""
    def __reduce__(self) -> tuple[object, tuple[bytes]]: ...


class SidIndexWriter:
    """Builds an index file larger than memory from chunks of items (``docs/sid-index.md``,
    "Building an index larger than memory"; Rust: ``rust/src/index/external.rs``).

    ``add`` packs each chunk's SIDs and, every ``chunk_items`` items, sorts them by id into a run
    on disk; ``finish`` merges the runs (duplicated ids are found here), repairs collisions in SID
    order and writes the ``.gr2sid`` file through a temporary file renamed over ``path``. The file
    is byte for byte what ``SidIndex.build(all_ids, all_codes, codebook_size=level_sizes).save(path)``
    writes (same repair, same report, same error messages); load it with ``SidIndex.load``.

    Peak memory: about 24 bytes x ``chunk_items`` plus 1 MiB per run merged plus the largest
    (L-1)-prefix group (at most K_last x 65536 items of 16 bytes); temporary disk about 40 bytes per item, in a folder
    ``.{name}.build-{pid}-{nonce}`` inside ``temp_dir`` (default: the folder of ``path``), removed
    when the writer finishes, fails, is closed or is garbage-collected. Leaving a ``with`` block
    closes the writer (an unfinished build is discarded). Every error is a :class:`gr2.Gr2Error`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        level_sizes: Sequence[int],
        *,
        chunk_items: int = 10_000_000,
        temp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """``level_sizes``: one codebook size per level (codes of level l are < level_sizes[l])."""
    def add(self, item_ids: npt.NDArray[np.uint64], codes: npt.NDArray[np.uint16]) -> None:
        """Adds uint64 (m,) ids with uint16 (m, levels) codes. InvalidInputError for a wrong
        dtype/shape or a code out of range (naming the row counted over every item added); an
        invalid chunk adds nothing. The GIL is released while it works."""
    def finish(self) -> None:
        """Writes the index file (atomically) and removes the temporary files; InvalidInputError
        for a duplicated id (naming both rows) or codes too degenerate to repair, Gr2IOError for
        a write that fails (the old file at ``path`` untouched). The writer is closed afterwards."""
    def close(self) -> None:
        """Discards an unfinished build and its temporary files (a no-op once closed)."""
    def __len__(self) -> int:
        """Items added so far (0 once closed)."""
    @property
    def closed(self) -> bool:
        """Whether ``finish`` or ``close`` was called."""
    @property
    def temp_dir(self) -> pathlib.Path | None:
        """This build's temporary folder (None once closed)."""
    def __enter__(self) -> SidIndexWriter: ...
    def __exit__(self, *args: object) -> bool: ...
