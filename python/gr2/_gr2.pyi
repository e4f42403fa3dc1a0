"""Type stubs of the native module gr2._gr2 (rust/src/py)."""

__version__: str

# --- RQ encoding (rust/src/rq, rust/src/py/rq.rs) -------------------------------------------------
import numpy as np
import numpy.typing as npt

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
    def encode(self, x: npt.NDArray[np.float32], beam: int = 1) -> npt.NDArray[np.uint16]:
        """Encodes float32 (n, D) rows into uint16 (n, L) codes.

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
