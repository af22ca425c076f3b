"""``unique_ints`` is ``np.unique`` for index arrays without numpy 2's ~18 ms first-call cost (issue 14, speed)."""

import numpy as np
import pytest

from brainsurgeon.graph.maps import unique_ints


@pytest.mark.parametrize("seed", range(5))
def test_same_values_as_np_unique(seed):
    rng = np.random.default_rng(seed)
    for n in (0, 1, 2, 7, 100):
        a = rng.integers(-5, 20, size=n).astype(np.int64)
        got = unique_ints(a)
        assert got.dtype == a.dtype and np.array_equal(got, np.unique(a))
    a2 = rng.integers(0, 9, size=(3, 4))
    assert np.array_equal(unique_ints(a2), np.unique(a2))   # flattened, as np.unique
