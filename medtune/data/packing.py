"""Rows of several samples, built on Arrow columns: best-fit packing and the baseline's concatenation.

Rows are assembled with numpy gathers over a chunk's flat token buffer, so building them costs a copy of
the tokens, not a Python list per token: the placement loop is the only per-sample Python.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medtune.data.templates import IGNORE_INDEX

Example = dict[str, list[int]]
IDS = pa.list_(pa.int32())


def best_fit_decreasing(lengths: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """(samples in the order they were placed, each one's row): longest sample first, each into the open row
    it fills most tightly. Open rows are kept by their free space — a sorted list of the distinct free-space
    values (at most max_length of them, found by bisection) and a stack of rows for each — so placing a
    sample is O(log max_length), not a scan over every row as first-fit is."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    row_of = [0] * len(lengths)
    rows = 0
    frees: list[int] = []  # distinct free-space values of open rows, ascending
    rows_with: dict[int, list[int]] = {}  # free space → open rows with exactly that much
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(frees, n)
        if k == len(frees):  # no open row has room: a new one
            slot, free = rows, max_length
            rows += 1
        else:
            free = frees[k]
            slot = rows_with[free].pop()
            if not rows_with[free]:
                del rows_with[free], frees[k]
        row_of[i] = slot
        free -= n
        if free > 0:
            if free not in rows_with:
                rows_with[free] = []
                bisect.insort(frees, free)
            rows_with[free].append(slot)
    return order, row_of


def flat(column: pa.ChunkedArray | pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat int32 values, int64 offsets from 0), whatever its chunks and slicing."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return array.flatten().to_numpy(zero_copy_only=False), offsets


def list_column(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32, copy=False)))


def runs(starts: np.ndarray, firsts: np.ndarray, sizes: np.ndarray, total: int) -> np.ndarray:
    """The concatenation of range(firsts[k], firsts[k] + sizes[k]) placed at starts[k], for all k: a cumulative
    sum of steps of 1 that jumps at each start (two passes over int32, not numpy's repeat of int64)."""
    steps = np.ones(total, dtype=np.int32)
    if len(starts):
        steps[starts[0]] = firsts[0]
        steps[starts[1:]] = firsts[1:] - (firsts[:-1] + sizes[:-1] - 1)
    return np.cumsum(steps, dtype=np.int32)


def pack_table(table: pa.Table, max_length: int) -> pa.Table:
    """Several samples per row, kept apart: position ids restart at 0 for each sample (transformers then builds
    a block-diagonal causal mask, or varlen flash-attention on GPU), and the first label of every sample is
    masked, so nothing is predicted across a boundary. Samples are placed best-fit decreasing."""
    ids, offsets = flat(table.column("input_ids"))
    labels, _ = flat(table.column("labels"))
    lengths = np.diff(offsets)
    order, row_of = best_fit_decreasing(lengths.tolist(), max_length)
    order_a, row_a = np.asarray(order, dtype=np.int64), np.asarray(row_of, dtype=np.int64)
    members = order_a[np.argsort(row_a[order_a], kind="stable")]  # by row; within a row, in placing order
    sizes = lengths[members]
    starts = np.cumsum(sizes) - sizes  # where each sample begins in the packed buffer
    total = int(sizes.sum())
    gather = runs(starts, offsets[:-1][members], sizes, total)
    packed_labels = labels[gather]
    packed_labels[starts] = IGNORE_INDEX
    positions = runs(starts, np.zeros_like(sizes), sizes, total)
    row_offsets = np.zeros(int(row_a.max(initial=-1)) + 2, dtype=np.int64)
    np.cumsum(np.bincount(row_a, weights=lengths, minlength=len(row_offsets) - 1), out=row_offsets[1:])
    return pa.table(
        {
            "input_ids": list_column(ids[gather], row_offsets),
            "labels": list_column(packed_labels, row_offsets),
            "position_ids": list_column(positions, row_offsets),
        }
    )


class Concatenation:
    """The PromptCBLUE LLaMA baseline's packing (and continued pre-training's blocks): all samples one stream
    of tokens cut into max_length blocks, attending across sample boundaries; the tail carries over to the
    next chunk, and what is left at the end is one last, shorter block."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.ids = np.zeros(0, dtype=np.int32)
        self.labels = np.zeros(0, dtype=np.int32)

    def __call__(self, table: pa.Table) -> pa.Table:
        ids, _ = flat(table.column("input_ids"))
        labels, _ = flat(table.column("labels"))
        self.ids, self.labels = np.concatenate([self.ids, ids]), np.concatenate([self.labels, labels])
        full = len(self.ids) // self.max_length * self.max_length
        out = self._blocks(self.ids[:full], self.labels[:full])
        self.ids, self.labels = self.ids[full:], self.labels[full:]
        return out

    def tail(self) -> pa.Table:
        return self._blocks(self.ids, self.labels) if len(self.ids) > 1 else self._blocks(self.ids[:0], self.ids[:0])

    def _blocks(self, ids: np.ndarray, labels: np.ndarray) -> pa.Table:
        offsets = np.append(np.arange(0, len(ids), self.max_length), len(ids)) if len(ids) else np.zeros(1)
        return pa.table({"input_ids": list_column(ids, offsets), "labels": list_column(labels, offsets)})


def as_table(rows: Sequence[dict]) -> pa.Table:
    """Rows (dicts of id lists, or a prompt's JSON text) as an Arrow table with medtune's column types."""
    return pa.table({k: pa.array([r[k] for r in rows], type=pa.string() if k in TEXT else IDS) for k in rows[0]})


TEXT = ("prompt", "reference")  # a prompt row's conversation and what a reward may check it against, as JSON


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """pack_table on Python rows (tests, small data)."""
    return pack_table(as_table(examples), max_length).to_pylist()


def concat_examples(examples: Sequence[Example], block: int) -> list[Example]:
    """Concatenation on Python rows (tests, small data)."""
    concat = Concatenation(block)
    return concat(as_table(examples)).to_pylist() + concat.tail().to_pylist()


def padding_efficiency(table: pa.Table, max_length: int) -> float:
    """Real tokens over the tokens of full rows: how much of the packed rows is samples, not padding."""
    return pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() / (max_length * max(1, len(table)))
