"""gr2.RQCodebooks and gr2.encode_npy against a plain numpy reference.

Reference distances are sum((r - c)^2) in float64. The native kernel computes ||c||^2 - 2 r.c in
float32, so on arbitrary data codes may differ from the reference only on near-ties: we check
that the chosen code is within a tiny tolerance of the reference minimum at every level (following
the chosen path). On data where every float32 operation is exact (small integers) or where codes
are separated by clear margins, the codes must be identical, ties going to the lowest index.
"""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gr2
from gr2 import InvalidInputError, RQCodebooks, encode_npy


# ---------------------------------------------------------------------------------------------
# numpy reference
def ref_distances(residual: np.ndarray, level_codes: np.ndarray) -> np.ndarray:
    diff = residual[:, None, :].astype(np.float64) - level_codes[None, :, :].astype(np.float64)
    return (diff**2).sum(-1)


def ref_greedy(codebooks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Greedy RQ: per level, argmin of squared distance (np.argmin keeps the first minimum)."""
    residual = x.astype(np.float32).copy()
    codes = np.zeros((x.shape[0], codebooks.shape[0]), dtype=np.uint16)
    for level, level_codes in enumerate(codebooks):
        chosen = ref_distances(residual, level_codes).argmin(axis=1) if len(x) else np.zeros(0, int)
        codes[:, level] = chosen
        residual = residual - level_codes[chosen]
    return codes


def ref_decode(codebooks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Sum of the chosen codes, added in level order in float32."""
    out = codebooks[0][codes[:, 0].astype(np.int64)]
    for level in range(1, codebooks.shape[0]):
        out = out + codebooks[level][codes[:, level].astype(np.int64)]
    return out


def squared_errors(codebooks: np.ndarray, x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    residual = x.astype(np.float64).copy()
    for level, level_codes in enumerate(codebooks):
        residual -= level_codes[codes[:, level].astype(np.int64)]
    return (residual**2).sum(1)


def assert_near_optimal(codebooks: np.ndarray, x: np.ndarray, codes: np.ndarray, rtol: float = 1e-5) -> None:
    """At every level (along the path taken) the chosen code is a minimum up to rounding."""
    assert codes.dtype == np.uint16 and codes.shape == (x.shape[0], codebooks.shape[0])
    assert (codes < codebooks.shape[1]).all()
    residual = x.astype(np.float32).copy()
    max_norm = float((codebooks.astype(np.float64) ** 2).sum(-1).max())
    for level, level_codes in enumerate(codebooks):
        d = ref_distances(residual, level_codes)
        chosen = d[np.arange(len(x)), codes[:, level]]
        scale = (residual.astype(np.float64) ** 2).sum(1) + max_norm + 1e-30
        slack = chosen - d.min(axis=1)
        assert (slack <= rtol * scale).all(), f"level {level}: worst slack {slack.max()} (scale {scale.max()})"
        residual = residual - level_codes[codes[:, level]]


def random_case(rng, n, levels, k, dim, scale=1.0):
    codebooks = (rng.standard_normal((levels, k, dim)) * scale * 0.5 ** np.arange(levels)[:, None, None]).astype(np.float32)
    x = (rng.standard_normal((n, dim)) * scale).astype(np.float32)
    return codebooks, x


# ---------------------------------------------------------------------------------------------
# encode against the reference
@pytest.mark.parametrize(
    "n,levels,k,dim",
    [(0, 4, 256, 32), (1, 4, 256, 32), (1000, 4, 256, 32), (257, 3, 1, 8), (100, 2, 7, 1), (99, 3, 13, 3),
     (130, 2, 50, 17), (70, 4, 31, 33), (40, 1, 300, 5), (20, 5, 2, 64)],
)
def test_encode_random_near_reference(n, levels, k, dim):
    rng = np.random.default_rng(n * 1000 + k)
    codebooks, x = random_case(rng, n, levels, k, dim)
    codes = RQCodebooks(codebooks).encode(x)
    assert codes.shape == (n, levels) and codes.dtype == np.uint16
    assert_near_optimal(codebooks, x, codes)
    # On random gaussian data near-ties are rare: nearly all rows equal the reference outright.
    if n >= 100:
        assert (codes == ref_greedy(codebooks, x)).all(axis=1).mean() > 0.95


def test_integer_data_is_exact_including_ties():
    # Small integers make every float32 sum exact, so ties are real ties and must go low.
    rng = np.random.default_rng(1)
    codebooks = rng.integers(-2, 3, size=(3, 24, 5)).astype(np.float32)
    x = rng.integers(-4, 5, size=(2000, 5)).astype(np.float32)
    codes = RQCodebooks(codebooks).encode(x)
    np.testing.assert_array_equal(codes, ref_greedy(codebooks, x))


def test_clear_margins_are_exact():
    # Codes far apart and points close to one code each: no near-ties, exact agreement.
    rng = np.random.default_rng(2)
    k, dim = 64, 16
    level0 = rng.standard_normal((k, dim)).astype(np.float32) * 10
    level1 = rng.standard_normal((k, dim)).astype(np.float32)
    codebooks = np.stack([level0, level1])
    pick = rng.integers(0, k, size=(500, 2))
    x = (level0[pick[:, 0]] + level1[pick[:, 1]] + rng.standard_normal((500, dim)) * 0.01).astype(np.float32)
    codes = RQCodebooks(codebooks).encode(x)
    np.testing.assert_array_equal(codes, ref_greedy(codebooks, x))
    np.testing.assert_array_equal(codes, pick.astype(np.uint16))


@pytest.mark.parametrize("magnitude", [1e-12, 1e6, 1e15])
def test_large_and_small_values(magnitude):
    rng = np.random.default_rng(3)
    k, dim = 32, 8
    codebooks = (rng.standard_normal((1, k, dim)) * magnitude).astype(np.float32)
    pick = rng.integers(0, k, size=300)
    x = (codebooks[0][pick] * (1 + rng.standard_normal((300, dim)) * 1e-3)).astype(np.float32)
    codes = RQCodebooks(codebooks).encode(x)
    np.testing.assert_array_equal(codes[:, 0], pick)


def test_values_that_overflow_float32_raise():
    cb = RQCodebooks(np.array([[[1e18], [-1e18]]], dtype=np.float32))
    with pytest.raises(InvalidInputError, match="overflow"):
        cb.encode(np.array([[3e38]], dtype=np.float32))
    with pytest.raises(InvalidInputError, match="overflows"):
        RQCodebooks(np.full((1, 2, 4), 3e38, dtype=np.float32))


def test_degenerate_codebooks_go_to_lowest_index():
    x = np.random.default_rng(4).standard_normal((50, 6)).astype(np.float32)
    all_equal = np.full((3, 10, 6), 0.25, dtype=np.float32)
    assert (RQCodebooks(all_equal).encode(x) == 0).all()
    duplicates = np.random.default_rng(5).standard_normal((1, 8, 6)).astype(np.float32)
    duplicates[0, 5] = duplicates[0, 2]
    near_code_2 = duplicates[0, 2][None] + np.float32(1e-3)
    assert RQCodebooks(duplicates).encode(near_code_2.astype(np.float32))[0, 0] == 2
    zeros = np.zeros((2, 4, 3), dtype=np.float32)
    assert (RQCodebooks(zeros).encode(x[:, :3]) == 0).all()


def test_k_equal_one_and_max_k():
    x = np.random.default_rng(6).standard_normal((10, 3)).astype(np.float32)
    assert (RQCodebooks(np.ones((2, 1, 3), np.float32)).encode(x) == 0).all()
    big = np.zeros((1, 65536, 1), dtype=np.float32)
    big[0, 65535, 0] = 1.0
    big[0, 3, 0] = -1.0
    cb = RQCodebooks(big)
    np.testing.assert_array_equal(cb.encode(np.array([[0.9], [-0.8], [0.1]], np.float32))[:, 0], [65535, 3, 0])
    with pytest.raises(InvalidInputError, match="65536"):
        RQCodebooks(np.zeros((1, 65537, 1), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# decode
def test_decode_matches_reference_exactly():
    rng = np.random.default_rng(7)
    codebooks, _ = random_case(rng, 0, 4, 256, 17)
    codes = rng.integers(0, 256, size=(3000, 4)).astype(np.uint16)
    np.testing.assert_array_equal(RQCodebooks(codebooks).decode(codes), ref_decode(codebooks, codes))
    empty = RQCodebooks(codebooks).decode(np.zeros((0, 4), np.uint16))
    assert empty.shape == (0, 17) and empty.dtype == np.float32


def test_decode_rejects_out_of_range_codes():
    cb = RQCodebooks(np.zeros((2, 5, 3), np.float32))
    codes = np.zeros((4, 2), np.uint16)
    codes[2, 1] = 5
    with pytest.raises(InvalidInputError, match="code 5 at row 2, level 1"):
        cb.decode(codes)


# ---------------------------------------------------------------------------------------------
# beam search
def test_beam_one_is_greedy_and_beam_never_worse():
    rng = np.random.default_rng(8)
    codebooks, x = random_case(rng, 400, 4, 16, 8)
    cb = RQCodebooks(codebooks)
    greedy = cb.encode(x)
    np.testing.assert_array_equal(cb.encode(x, beam=1), greedy)
    greedy_err = squared_errors(codebooks, x, greedy)
    improved = 0
    for beam in (2, 5, 16):
        codes = cb.encode(x, beam=beam)
        err = squared_errors(codebooks, x, codes)
        assert (err <= greedy_err * (1 + 1e-5) + 1e-6).all()
        improved = max(improved, int((err < greedy_err * (1 - 1e-4)).sum()))
    assert improved > 0  # beam search does find better encodings on random data


def test_wide_beam_is_exhaustive_search():
    rng = np.random.default_rng(9)
    levels, k, dim = 3, 4, 3
    codebooks, x = random_case(rng, 60, levels, k, dim)
    codes = RQCodebooks(codebooks).encode(x, beam=k**levels)
    grid = np.stack(np.meshgrid(*[np.arange(k)] * levels, indexing="ij"), -1).reshape(-1, levels)
    all_err = np.stack([squared_errors(codebooks, x, np.tile(g, (len(x), 1))) for g in grid], 1)
    got = squared_errors(codebooks, x, codes)
    assert (got <= all_err.min(1) * (1 + 1e-5) + 1e-6).all()


def test_beam_validation():
    cb = RQCodebooks(np.zeros((1, 2, 2), np.float32))
    x = np.zeros((1, 2), np.float32)
    for beam in (0, -3, 1025):
        with pytest.raises(InvalidInputError, match="beam"):
            cb.encode(x, beam=beam)


# ---------------------------------------------------------------------------------------------
# input validation
def test_wrong_dtype_shape_and_values():
    cb = RQCodebooks(np.zeros((2, 4, 3), np.float32))
    x = np.zeros((5, 3), np.float32)
    cases = [
        (x.astype(np.float64), "must be float32, got float64; use x.astype"),
        (x.astype(np.int32), "must be float32, got int32"),
        (x.tolist(), "numpy.ndarray"),
        (x[0], r"shape \(n, D\)"),
        (x[None], r"shape \(n, D\)"),
        (np.zeros((5, 4), np.float32), "4 columns but the codebooks have dimension 3"),
    ]
    for bad, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            cb.encode(bad)
    for bad, message in [(np.zeros((2, 2), np.int64), "must be uint16, got int64"), (np.zeros((2, 3), np.uint16), "3 columns")]:
        with pytest.raises(InvalidInputError, match=message):
            cb.decode(bad)
    for bad, message in [(np.zeros((2, 4, 3)), "float64"), (np.zeros((4, 3), np.float32), r"\(L, K, D\)"),
                         (np.zeros((0, 4, 3), np.float32), "L, K, D >= 1"), ("abc", "numpy.ndarray")]:
        with pytest.raises(InvalidInputError, match=message):
            RQCodebooks(bad)
    # Errors are ValueErrors too, so generic handlers catch them.
    assert issubclass(InvalidInputError, ValueError)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_named(bad):
    codebooks = np.random.default_rng(10).standard_normal((2, 8, 4)).astype(np.float32)
    x = np.zeros((700, 4), np.float32)
    x[613, 2] = bad
    with pytest.raises(InvalidInputError, match="row 613, column 2"):
        RQCodebooks(codebooks).encode(x)
    codebooks[1, 5, 3] = bad
    with pytest.raises(InvalidInputError, match="level 1, code 5, dimension 3"):
        RQCodebooks(codebooks)


def test_layouts_readonly_and_views():
    rng = np.random.default_rng(11)
    codebooks, x = random_case(rng, 301, 3, 40, 9)
    cb = RQCodebooks(codebooks)
    expected = cb.encode(x)
    np.testing.assert_array_equal(cb.encode(np.asfortranarray(x)), expected)
    np.testing.assert_array_equal(cb.encode(x[::2]), expected[::2])
    np.testing.assert_array_equal(cb.encode(np.ascontiguousarray(x.T).T), expected)
    frozen = x.copy()
    frozen.setflags(write=False)
    np.testing.assert_array_equal(cb.encode(frozen), expected)
    # Codebooks in Fortran order are read in logical order.
    np.testing.assert_array_equal(RQCodebooks(np.asfortranarray(codebooks)).encode(x), expected)
    np.testing.assert_array_equal(cb.decode(np.asfortranarray(expected)), cb.decode(expected))


def test_properties_copy_repr_and_pickle():
    codebooks = np.random.default_rng(12).standard_normal((3, 5, 2)).astype(np.float32)
    cb = RQCodebooks(codebooks)
    assert (cb.levels, cb.codebook_size, cb.dim) == (3, 5, 2)
    assert repr(cb) == "RQCodebooks(levels=3, codebook_size=5, dim=2)"
    copy = cb.codebooks
    np.testing.assert_array_equal(copy, codebooks)
    copy[:] = 0
    np.testing.assert_array_equal(cb.codebooks, codebooks)
    codebooks[:] = 0  # the native object holds its own copy
    assert cb.codebooks.any()
    again = pickle.loads(pickle.dumps(cb))
    np.testing.assert_array_equal(again.codebooks, cb.codebooks)
    assert gr2.RQCodebooks is RQCodebooks


def test_concurrent_threads_give_identical_results():
    rng = np.random.default_rng(13)
    codebooks, x = random_case(rng, 20_000, 4, 64, 16)
    cb = RQCodebooks(codebooks)
    expected = cb.encode(x)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = cb.encode(x, beam=1) if i % 2 else cb.decode(cb.encode(x))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, result in results.items():
        np.testing.assert_array_equal(result, expected if i % 2 else cb.decode(expected))
    assert len(results) == 6


# ---------------------------------------------------------------------------------------------
# streaming
def test_encode_npy_streams_in_chunks(tmp_path):
    rng = np.random.default_rng(14)
    codebooks, x = random_case(rng, 1003, 4, 32, 12)
    src, dst = tmp_path / "x.npy", tmp_path / "out" / "codes.npy"
    np.save(src, x)
    assert encode_npy(codebooks, src, dst, chunk_size=128, progress=False) == dst
    cb = RQCodebooks(codebooks)
    np.testing.assert_array_equal(np.load(dst), cb.encode(x))
    encode_npy(cb, src, dst, chunk_size=100, beam=3, progress=False)  # overwrites atomically
    np.testing.assert_array_equal(np.load(dst), cb.encode(x, beam=3))
    assert sorted(p.name for p in dst.parent.iterdir()) == ["codes.npy"]  # no temp files left
    np.save(src, np.asfortranarray(x))
    encode_npy(cb, src, dst, chunk_size=1000, progress=False)
    np.testing.assert_array_equal(np.load(dst), cb.encode(x))
    np.save(src, x[:0])
    encode_npy(cb, src, dst, progress=False)
    assert np.load(dst).shape == (0, 4)


def test_encode_npy_errors(tmp_path):
    cb = RQCodebooks(np.zeros((2, 3, 4), np.float32))
    dst = tmp_path / "codes.npy"
    with pytest.raises(gr2.Gr2IOError, match="not found"):
        encode_npy(cb, tmp_path / "missing.npy", dst, progress=False)
    (tmp_path / "junk.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(gr2.CorruptFileError):
        encode_npy(cb, tmp_path / "junk.npy", dst, progress=False)
    np.save(tmp_path / "f64.npy", np.zeros((3, 4)))
    with pytest.raises(InvalidInputError, match="float64"):
        encode_npy(cb, tmp_path / "f64.npy", dst, progress=False)
    np.save(tmp_path / "d5.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(InvalidInputError, match=r"expected \(n, 4\)"):
        encode_npy(cb, tmp_path / "d5.npy", dst, progress=False)
    bad = np.zeros((50, 4), np.float32)
    bad[37, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InvalidInputError, match=r"nan\.npy: x contains a non-finite value \(NaN\) at row 37, column 1"):
        encode_npy(cb, tmp_path / "nan.npy", dst, chunk_size=10, progress=False)
    with pytest.raises(InvalidInputError, match="chunk_size"):
        encode_npy(cb, tmp_path / "d5.npy", dst, chunk_size=0, progress=False)
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_encode_npy_reports_the_file_row_in_every_chunk(tmp_path):
    cb = RQCodebooks(np.zeros((2, 3, 4), np.float32))
    for row in (0, 9, 10, 49):
        bad = np.zeros((50, 4), np.float32)
        bad[row, 2] = np.inf
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(InvalidInputError, match=rf"at row {row}, column 2"):
            encode_npy(cb, tmp_path / "bad.npy", tmp_path / "codes.npy", chunk_size=10, progress=False)


def test_encode_npy_refuses_to_overwrite_its_input(tmp_path):
    import os

    cb = RQCodebooks(np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32))
    x = np.random.default_rng(4).standard_normal((20, 4)).astype(np.float32)
    src = tmp_path / "x.npy"
    np.save(src, x)
    link = tmp_path / "link.npy"
    os.link(src, link)
    for out in (src, str(src), tmp_path / "." / "x.npy", link):
        with pytest.raises(InvalidInputError, match="input"):
            encode_npy(cb, src, out, progress=False)
    (tmp_path / "sub").mkdir()
    os.symlink(src, tmp_path / "sub" / "sym.npy")
    with pytest.raises(InvalidInputError, match="input"):
        encode_npy(cb, tmp_path / "sub" / "sym.npy", src, progress=False)
    np.testing.assert_array_equal(np.load(src), x)


def test_encode_npy_removes_stale_temporary_files(tmp_path):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    cb = RQCodebooks(np.zeros((2, 3, 4), np.float32))
    np.save(tmp_path / "x.npy", np.zeros((5, 4), np.float32))
    stale = tmp_path / f".codes.npy.tmp-{child.pid}-abc"
    stale.write_bytes(b"half")
    encode_npy(cb, tmp_path / "x.npy", tmp_path / "codes.npy", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "x.npy"]


@pytest.mark.parametrize("beam", [2**63, 2**64, -(2**63) - 1, 0, 1025, 2.5, "3", [2]])
def test_encode_beam_conversion_errors_name_the_argument(beam):
    cb = RQCodebooks(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(InvalidInputError, match="beam"):
        cb.encode(np.zeros((2, 4), np.float32), beam=beam)
    with pytest.raises(InvalidInputError, match="beam"):
        cb.encode(np.zeros((0, 4), np.float32), beam=beam)


def test_encode_npy_checks_beam_even_for_an_empty_file(tmp_path):
    cb = RQCodebooks(np.zeros((2, 3, 4), np.float32))
    np.save(tmp_path / "x.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(InvalidInputError, match="beam"):
        encode_npy(cb, tmp_path / "x.npy", tmp_path / "codes.npy", beam=0, progress=False)
    assert not (tmp_path / "codes.npy").exists()


def test_encode_row_offset_numbers_error_rows():
    cb = RQCodebooks(np.zeros((2, 3, 4), np.float32))
    x = np.zeros((5, 4), np.float32)
    x[3, 1] = np.nan
    with pytest.raises(InvalidInputError, match="at row 3, column 1"):
        cb.encode(x)
    with pytest.raises(InvalidInputError, match="at row 1003, column 1"):
        cb.encode(x, row_offset=1000)
    with pytest.raises(InvalidInputError, match="row_offset"):
        cb.encode(x, row_offset=-1)


# ---------------------------------------------------------------------------------------------
# property tests
@st.composite
def rq_cases(draw, integer=False):
    levels = draw(st.integers(1, 4))
    k = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 20))
    n = draw(st.integers(0, 40))
    if integer:
        values = st.integers(-3, 3).map(float)
    else:
        values = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)
    codebooks = draw(hnp.arrays(np.float32, (levels, k, dim), elements=values))
    x = draw(hnp.arrays(np.float32, (n, dim), elements=values))
    return codebooks, x


@given(rq_cases())
def test_property_greedy_near_reference(case):
    codebooks, x = case
    assert_near_optimal(codebooks, x, RQCodebooks(codebooks).encode(x))


@given(rq_cases(integer=True))
def test_property_integer_data_exact(case):
    codebooks, x = case
    np.testing.assert_array_equal(RQCodebooks(codebooks).encode(x), ref_greedy(codebooks, x))


@given(rq_cases(), st.integers(2, 6))
def test_property_beam_never_worse_and_decode_exact(case, beam):
    codebooks, x = case
    cb = RQCodebooks(codebooks)
    greedy, beamed = cb.encode(x), cb.encode(x, beam=beam)
    g, b = squared_errors(codebooks, x, greedy), squared_errors(codebooks, x, beamed)
    scale = (x.astype(np.float64) ** 2).sum(1) + (codebooks.astype(np.float64) ** 2).sum((1, 2)).max() + 1e-30
    assert (b <= g + 1e-5 * scale).all()
    np.testing.assert_array_equal(cb.decode(beamed), ref_decode(codebooks, beamed))
