"""The cut of a flat range of a tensor into boxes (the distributed optimizer's per-rank slices
are saved this way): the boxes hold exactly the range's elements, in order, without overlap."""

import itertools

import numpy as np
import pytest

from moe_parallel.ckpt.optimizer_state import flat_range_boxes


def _covered(shape, start, end):
    index = np.arange(int(np.prod(shape))).reshape(shape)
    seen = []
    for offset, size, flat in flat_range_boxes(shape, start, end):
        box = index[tuple(slice(o, o + n) for o, n in zip(offset, size))]
        assert box.reshape(-1)[0] == flat  # the box starts where its flat index says
        # contiguous in the flattened tensor, so a view of the flat slice is the box
        assert list(box.reshape(-1)) == list(range(flat, flat + box.size))
        seen += list(box.reshape(-1))
    return seen


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 5), (2, 3, 2, 4)])
def test_every_range_is_cut_into_boxes_that_hold_exactly_its_elements(shape):
    n = int(np.prod(shape))
    for start, end in itertools.combinations(range(n + 1), 2):
        assert _covered(shape, start, end) == list(range(start, end)), (shape, start, end)
        boxes = list(flat_range_boxes(shape, start, end))
        assert len(boxes) <= 2 * len(shape) - 1


def test_an_empty_range_has_no_boxes():
    assert list(flat_range_boxes((4, 4), 5, 5)) == []


def test_whole_rows_make_one_box():
    assert list(flat_range_boxes((6, 4), 8, 20)) == [((2, 0), (3, 4), 8)]
