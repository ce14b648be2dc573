"""Aspect-ratio buckets: batches whose samples share one canvas size.

With the default reference strip a sample's canvas is ``resolution`` wide and ``strip + resolution``
high, the strip's height following its reference's aspect ratio, so a dataset of mixed references
holds several canvas sizes and only samples of one size can be stacked. Batches are cut from a keyed
order (an epoch's permutation, an RL pass's), so they stay a pure function of that order: resume and
any number of processes see the same batches. Pure functions over indices; no torch, no images.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def same_size_batches(order: Sequence[int], sizes: Sequence[Hashable] | None, batch: int) -> list[list[int]]:
    """``order`` cut into batches of ``batch`` indices of one size each, in the order they fill up.

    Walking ``order``, each index joins the open batch of its size; a batch is emitted when full, and the
    open batches left at the end (fewer than ``batch`` of a size) are dropped. ``sizes[i]`` is index
    ``i``'s size; ``sizes=None`` means one size, when the result is ``order`` cut into consecutive runs.
    Every size contributes ``count // batch`` batches whatever the order, so their number is fixed.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    open_batches: dict[Hashable, list[int]] = {}
    out = []
    for i in order:
        group = open_batches.setdefault(None if sizes is None else sizes[i], [])
        group.append(i)
        if len(group) == batch:
            out.append(group)
            open_batches[None if sizes is None else sizes[i]] = []
    return out


def size_groups(order: Sequence[int], sizes: Sequence[Hashable], batch: int) -> list[list[int]]:
    """Every index of ``order`` in batches of at most ``batch`` of one size (evaluation: nothing dropped);
    sizes in first-seen order, indices in ``order``'s order within each."""
    by_size: dict[Hashable, list[int]] = {}
    for i in order:
        by_size.setdefault(sizes[i], []).append(i)
    return [g[s:s + batch] for g in by_size.values() for s in range(0, len(g), batch)]


def batches_per_order(sizes: Sequence[Hashable] | None, n: int, batch: int) -> int:
    """How many batches :func:`same_size_batches` cuts from any order of the ``n`` indices."""
    if sizes is None:
        return n // batch
    return sum(c // batch for c in Counter(sizes).values())


def describe(sizes: Sequence[tuple[int, int]]) -> str:
    """``"64x80: 4, 64x96: 4"``: samples per canvas size (width x height), smallest first."""
    return ", ".join(f"{w}x{h}: {c}" for (w, h), c in sorted(Counter(sizes).items(), key=lambda kv: kv[0][::-1]))


def undersized(sizes: Sequence[tuple[int, int]], batch: int) -> dict[tuple[int, int], int]:
    """The canvas sizes with fewer than ``batch`` samples (they could never fill a batch), and their counts."""
    return {size: c for size, c in sorted(Counter(sizes).items()) if c < batch}
