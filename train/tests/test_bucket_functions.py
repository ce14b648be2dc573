"""The edges of the canvas-size bucketing functions by hand (:mod:`train.data.buckets`): a batch size below 1,
counts exactly at a batch, sizes that differ in width, and the batch count of any order."""

from __future__ import annotations

import pytest

from train.data import buckets


def test_a_batch_below_one_is_refused():
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        buckets.same_size_batches([0, 1], None, 0)


def test_a_size_with_exactly_one_batch_of_samples_is_not_undersized():
    assert buckets.undersized([(64, 80)] * 2 + [(64, 96)], 2) == {(64, 96): 1}


def test_batch_counts_are_per_size_and_equal_what_any_order_cuts():
    sizes = ["a"] * 3 + ["b"] * 3
    assert buckets.batches_per_order(sizes, 6, 2) == 2  # one of each size; not 6 // 2
    for order in ([0, 1, 2, 3, 4, 5], [5, 0, 4, 1, 3, 2], [3, 4, 5, 0, 1, 2]):
        assert len(buckets.same_size_batches(order, sizes, 2)) == 2
    assert buckets.batches_per_order(None, 6, 4) == 1


def test_sizes_are_described_smallest_height_first_as_width_x_height():
    assert buckets.describe([(96, 64), (64, 80), (64, 80)]) == "96x64: 1, 64x80: 2"
