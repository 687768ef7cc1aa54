"""The compiled transpose kernel against numpy: every permutation, dtype width and ragged edge.

`blocked_copy` takes the kernel when it applies and numpy's blocked copy otherwise; both must
give exactly `np.ascontiguousarray(view)`. WEIGHTBRIDGE_NO_KERNEL=1 forces the numpy path.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightbridge.streaming import transform
from weightbridge.streaming.transform import blocked_copy

pytestmark = pytest.mark.kernel

DTYPES = [np.uint8, np.int16, ml_dtypes.bfloat16, np.float16, np.float32, np.float64]


def _random(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(0, 256, (*shape, np.dtype(dtype).itemsize))
    return raw.astype(np.uint8).view(dtype).reshape(shape)


@pytest.fixture(params=["kernel", "numpy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "numpy":
        monkeypatch.setenv("WEIGHTBRIDGE_NO_KERNEL", "1")
        assert not transform.kernel_available()
    else:
        assert transform.kernel_available()
    return str(request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_permutation_across_block_edges(path: str, dtype: type) -> None:
    # 130 and 35 straddle the kernel's 128x32 blocks and its 8x8 and 4x4 register tiles.
    a = _random((3, 130, 35), dtype)
    for perm in itertools.permutations(range(3)):
        view = a.transpose(perm)
        out = np.empty(view.shape, a.dtype)
        blocked_copy(out, view)
        assert out.tobytes() == np.ascontiguousarray(view).tobytes(), (path, perm)


def test_a_weight_sized_transpose(path: str) -> None:
    a = _random((1031, 517), ml_dtypes.bfloat16, seed=1)
    out = np.empty((517, 1031), a.dtype)
    blocked_copy(out, a.T)
    assert np.array_equal(out.view(np.uint16), a.T.view(np.uint16))


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=2, max_size=4),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_random_views_match_numpy(shape: list[int], dtype: type, data: st.DataObject) -> None:
    a = _random(tuple(shape), dtype, seed=len(shape))
    perm = data.draw(st.permutations(range(len(shape))))
    view = a.transpose(perm)
    # Slices and reversed axes: strides the kernel must refuse (numpy then copies).
    index = tuple(
        data.draw(st.sampled_from([slice(None), slice(None, None, -1), slice(1, None, 2)]))
        for _ in shape
    )
    view = view[index]
    out = np.empty(view.shape, a.dtype)
    blocked_copy(out, view)
    assert out.tobytes() == np.ascontiguousarray(view).tobytes()


def test_kernel_refuses_what_it_cannot_address_safely() -> None:
    a = _random((64, 48), np.float32)
    view = a.T  # (48, 64): axis 0 is contiguous in the source, axis 1 in the output

    def fresh(shape: tuple[int, ...] = view.shape, dtype: type = np.float32) -> np.ndarray:
        return np.empty(shape, dtype)

    readonly = fresh()
    readonly.flags.writeable = False
    assert not transform._kernel_copy(readonly, view, 0, 1)
    assert not transform._kernel_copy(fresh((48, 63)), view, 0, 1)  # shapes differ
    assert not transform._kernel_copy(fresh(dtype=np.float64), view, 0, 1)  # item sizes differ
    assert not transform._kernel_copy(fresh(), view[::-1], 0, 1)  # inner axis reversed
    assert not transform._kernel_copy(fresh((24, 64)), view[::2], 0, 1)  # inner axis strided
    assert not transform._kernel_copy(fresh().T, view, 0, 1)  # output not C-contiguous
    reversed_columns = fresh()
    assert transform._kernel_copy(reversed_columns, view[:, ::-1], 0, 1)  # any outer stride
    assert reversed_columns.tobytes() == np.ascontiguousarray(view[:, ::-1]).tobytes()
