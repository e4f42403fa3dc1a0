"""Type stubs of the native module gr2._gr2 (rust/src/py)."""

__version__: str

# --- reward verification (rust/src/py/reward.rs; wrapped by gr2.rewards.verify_rewards) ---
import numpy as np
import numpy.typing as npt

INVALID_REASON_NAMES: list[str]
NO_ITEM: int

def _verify_rewards_text(
    texts: list[str],
    trailers: list[str],
    items: npt.NDArray[np.uint64],
    sids: npt.NDArray[np.uint16],
    targets: npt.NDArray[np.uint64],
    catalog: npt.NDArray[np.uint16] | None,
    relevance: npt.NDArray[np.float32] | None,
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
    tag_ids: list[int],
    code_ids: npt.NDArray[np.int64],
    whitespace_ids: list[int],
    trailer_ids: list[int],
    items: npt.NDArray[np.uint64],
    sids: npt.NDArray[np.uint16],
    targets: npt.NDArray[np.uint64],
    catalog: npt.NDArray[np.uint16] | None,
    relevance: npt.NDArray[np.float32] | None,
    alpha: float,
    conditional: bool,
    invalid_reward: float,
    metric_ks: list[int],
    graded_k: int,
    kind: str,
) -> dict[str, np.ndarray]: ...
