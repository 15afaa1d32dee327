"""The Python codec API (mapl.codec) on numpy: round trips, properties, and error messages."""

import pytest

from conftest import need_module

np = need_module("numpy")
mapl = need_module("mapl")
codec = need_module("mapl.codec")


def decaying(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)) * np.exp(-np.arange(dim) / 16.0)).astype(np.float32)


def rel_mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x - y) ** 2).sum() / (x ** 2).sum())


def test_rvq_fit_encode_decode_round_trip():
    x = decaying(4096, 32)
    rvq = codec.RVQ(dim=32, levels=4, codebook_size=256, seed=0)
    assert not rvq.fitted
    rvq.fit(x, iterations=10)
    codes = rvq.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (4096, 4)
    y = rvq.decode(codes)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert rel_mse(x, y) < 0.3
    # Decode is the sum of the chosen centroids.
    cb = rvq.codebooks
    assert cb.shape == (4, 256, 32)
    manual = sum(cb[l][codes[:, l]] for l in range(4))
    np.testing.assert_allclose(y, manual, rtol=1e-5, atol=1e-6)
    # Beam search is never worse than greedy, row by row.
    beam = rvq.decode(rvq.encode(x[:500], beam=4))
    eg = ((x[:500] - y[:500]) ** 2).sum(1)
    eb = ((x[:500] - beam) ** 2).sum(1)
    assert np.all(eb <= eg + 1e-6)


def test_rvq_matches_numpy_brute_force_first_level():
    x = decaying(1000, 16, seed=1)
    rvq = codec.RVQ(dim=16, levels=1, codebook_size=64).fit(x, iterations=5)
    cb = rvq.codebooks[0]
    d = ((x[:, None, :] - cb[None, :, :]) ** 2).sum(-1)
    want = d.argmin(1)
    got = rvq.encode(x)[:, 0]
    chosen = d[np.arange(len(x)), got]
    assert np.all(chosen <= d.min(1) + 1e-5)
    assert (got == want).mean() > 0.999


def test_rvq_streaming_update_and_gain_shape():
    rvq = codec.RVQ(dim=16, levels=2, codebook_size=32, gain_shape=True)
    stats = [rvq.update(decaying(1024, 16, seed=s) * 3.0, decay=0.9) for s in range(20)]
    assert rvq.fitted  # the first update initialised the codebooks from its batch
    assert set(stats[0]) == {"relative_mse", "reseeded"}
    # Later batches (new samples of the same distribution) are coded better than the first
    # (which was fitted on itself, but with the EMA pulling towards the stream).
    assert stats[-1]["relative_mse"] < 0.5
    assert np.mean([s["relative_mse"] for s in stats[-5:]]) <= stats[1]["relative_mse"] * 1.05
    codes, norms = rvq.encode(decaying(100, 16, seed=99) * 3.0)
    assert norms.shape == (100,) and codes.shape == (100, 2)
    with pytest.raises(ValueError, match="norms"):
        rvq.decode(codes)
    assert rvq.decode(codes, norms).shape == (100, 16)


def test_int8_codec():
    x = np.random.default_rng(2).standard_normal((64, 48)).astype(np.float32)
    q, s = codec.Int8Codec().encode(x)
    assert q.dtype == np.int8 and s.shape == (64,)
    y = codec.Int8Codec().decode(q, s)
    assert np.all(np.abs(x - y) <= s[:, None] / 2 + 1e-6)


def test_int4_codec():
    rng = np.random.default_rng(6)
    for k in (48, 47):
        x = rng.standard_normal((64, k)).astype(np.float32)
        x[3] = 0.0
        q, s = codec.Int4Codec().encode(x)
        assert q.dtype == np.uint8 and q.shape == (64, (k + 1) // 2) and s.shape == (64,)
        # The codes by hand: nibbles, low first, as 4-bit two's complement.
        nibbles = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(64, -1)[:, :k].astype(np.int8)
        codes = np.where(nibbles >= 8, nibbles - 16, nibbles)
        assert codes.min() >= -7 and codes.max() <= 7
        np.testing.assert_array_equal(np.abs(codes).max(axis=1)[[0, 1, 2, 4]], 7)
        if k % 2:
            assert np.all(q[:, -1] >> 4 == 0)  # the padding nibble
        y = codec.Int4Codec().decode(q, s, k)
        np.testing.assert_array_equal(y, codes * s[:, None])
        assert np.all(np.abs(x - y) <= s[:, None] / 2 + 1e-6)
        assert s[3] == 0.0 and np.all(y[3] == 0.0)
        # Each scale is max|x| / 7 rounded up to a bfloat16 value.
        want = np.abs(x).max(axis=1) / 7
        assert np.all(s >= want * (1 - 1e-6)) and np.all(s <= want * (1 + 2 ** -7) + 1e-30)
        assert np.all(s.view(np.uint32) & 0xFFFF == 0)
    with pytest.raises(ValueError, match="k: 5 values"):
        codec.Int4Codec().decode(q, s, 5)
    with pytest.raises(ValueError, match="scales"):
        codec.Int4Codec().decode(q, s[:-1], 47)
    with pytest.raises(ValueError, match="invalid scale"):
        codec.Int4Codec().decode(q, np.full(64, np.nan, np.float32), 47)
    with pytest.raises(ValueError, match="non-finite"):
        codec.Int4Codec().encode(np.full((2, 2), np.inf, np.float32))


def test_bf16_codec():
    x = np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32)
    b = codec.Bf16Codec().encode(x)
    assert b.dtype == np.uint16 and b.shape == x.shape
    y = codec.Bf16Codec().decode(b)
    assert np.all(np.abs(x - y) <= np.abs(x) / 256)
    with pytest.raises(ValueError, match="non-finite"):
        codec.Bf16Codec().encode(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        codec.Bf16Codec().decode(np.full((2, 2), 0x7fc0, np.uint16))  # a NaN off the wire
    # Bit-exact against torch's bfloat16 rounding.
    torch = need_module("torch")
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(y, want)


def test_msign_and_spel_keep_orthonormal():
    rng = np.random.default_rng(3)
    y = rng.standard_normal((128, 8)).astype(np.float32)
    o = codec.msign(y)
    np.testing.assert_allclose(o.T @ o, np.eye(8), atol=1e-3)
    # msign equals the polar factor from the SVD.
    uu, _, vt = np.linalg.svd(y.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(o, uu @ vt, atol=2e-3)
    u = codec.retract(y)
    m = np.zeros_like(u)
    for _ in range(50):
        u, m = codec.spel_step(u, rng.standard_normal(u.shape).astype(np.float32), m, 0.05, 0.9)
    assert np.abs(u.T @ u - np.eye(8)).max() < 1e-5
    h = rng.standard_normal((20, 128)).astype(np.float32)
    z = codec.project(h, u)
    np.testing.assert_allclose(z, h @ u, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(codec.lift(z, u), z @ u.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call,match", [
    (lambda r: r.encode(np.zeros((4, 16), np.float64)), "expected dtype float32, got float64"),
    (lambda r: r.encode(np.zeros((4, 15), np.float32)), r"x: expected shape \(\*, 16\)"),
    (lambda r: r.encode(np.zeros(16, np.float32)), "expected a 2-D array"),
    (lambda r: r.encode([[0.0] * 16]), "expected a numpy array"),
    (lambda r: r.encode(np.full((4, 16), np.nan, np.float32)), "non-finite"),
    (lambda r: r.decode(np.full((4, 2), 200, np.uint8)), "out of range"),
    (lambda r: r.decode(np.zeros((4, 3), np.uint8)), r"codes: expected shape \(n, 2\)"),
    (lambda r: r.update(np.full((64, 16), np.inf, np.float32)), "non-finite"),
])
def test_bad_input_raises_value_error_naming_the_problem(call, match):
    rvq = codec.RVQ(dim=16, levels=2, codebook_size=32).fit(decaying(256, 16))
    with pytest.raises(ValueError, match=match):
        call(rvq)


def test_other_bad_input():
    with pytest.raises(ValueError, match="not trained"):
        codec.RVQ(dim=8, levels=2).encode(np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match="levels"):
        codec.RVQ(dim=8, levels=0)
    with pytest.raises(ValueError):
        codec.msign(np.full((8, 2), np.nan, np.float32))
    with pytest.raises(ValueError):
        codec.spel_step(np.eye(8, 2, dtype=np.float32), np.zeros((8, 3), np.float32),
                        np.zeros((8, 2), np.float32), 0.1, 0.9)
    with pytest.raises(ValueError, match="scales"):
        codec.Int8Codec().decode(np.zeros((4, 4), np.int8), np.ones(3, np.float32))


def test_threads_share_one_rvq_safely():
    import threading
    x = decaying(2048, 16, seed=11)
    rvq = codec.RVQ(dim=16, levels=2, codebook_size=64).fit(x, iterations=3)
    errors = []

    def encoder():
        try:
            for _ in range(30):
                assert rvq.decode(rvq.encode(x)).shape == x.shape
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=encoder) for _ in range(2)]
    for t in threads:
        t.start()
    for s in range(30):  # fit and update swap the codebooks while the others encode
        rvq.update(decaying(512, 16, seed=100 + s), decay=0.9)
        if s % 10 == 0:
            rvq.fit(x, iterations=2, refine_passes=0)
    for t in threads:
        t.join()
    assert not errors


def test_package_surface():
    assert mapl.__version__
    assert codec.distance_kernel() in {"generic", "avx2", "avx512"}
