"""FIFO memory banks (paper Eq. 7) against a Python deque model; masked nearest-neighbour search."""

from __future__ import annotations

from collections import deque

import jax
import numpy as np
import pytest

from lsfa_jax.adaptation.banks import bank_push, init_bank, nearest_in_buffer, nearest_rows

push = jax.jit(bank_push)


def deque_contents(bank, k):
    """Rows of buffer k, oldest first, read from the ring buffer's ptr/count."""
    feats, ptr, count = (np.asarray(a) for a in bank)
    M = feats.shape[1]
    start = (ptr[k] - count[k]) % M
    return [tuple(feats[k, (start + i) % M]) for i in range(count[k])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_push_matches_deque_model(seed):
    rng = np.random.default_rng(seed)
    K, M, C = 3, 7, 2
    bank = init_bank(K, M, C)
    model = [deque(maxlen=M) for _ in range(K)]
    counter = 0
    for _ in range(6):
        R = int(rng.integers(1, 12))  # sometimes more than M rows of one class in one push
        rows = (counter + np.arange(R * C).reshape(R, C)).astype(np.float32)
        counter += R * C
        valid = rng.random(R) < 0.75
        ids = rng.integers(0, K, R)
        for r in range(R):
            if valid[r]:
                model[ids[r]].append(tuple(rows[r]))
        bank = push(bank, rows, valid, ids)
        for k in range(K):
            assert deque_contents(bank, k) == list(model[k])
            assert int(bank.count[k]) == len(model[k])


def test_wraparound_overwrites_oldest_first_and_count_saturates():
    bank = init_bank(1, 4, 1)
    bank = push(bank, np.arange(3, dtype=np.float32)[:, None], np.ones(3, bool), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(bank.features)[0, :, 0], [0, 1, 2, 0])
    assert (int(bank.ptr[0]), int(bank.count[0])) == (3, 3)
    rows = np.array([[10], [11], [12]], np.float32)
    bank = push(bank, rows, np.ones(3, bool), np.zeros(3))
    # 10 fills slot 3, then 11 and 12 overwrite the two oldest (0 and 1).
    np.testing.assert_array_equal(np.asarray(bank.features)[0, :, 0], [11, 12, 2, 10])
    assert (int(bank.ptr[0]), int(bank.count[0])) == (2, 4)


def test_invalid_rows_and_other_classes_untouched():
    bank = init_bank(2, 5, 2)
    rows = np.array([[1, 1], [2, 2], [3, 3]], np.float32)
    bank = push(bank, rows, np.array([True, False, True]), np.array([1, 1, 1]))
    feats = np.asarray(bank.features)
    np.testing.assert_array_equal(feats[1, :2], [[1, 1], [3, 3]])
    assert np.all(feats[0] == 0) and np.all(feats[1, 2:] == 0)
    np.testing.assert_array_equal(np.asarray(bank.count), [0, 2])
    np.testing.assert_array_equal(np.asarray(bank.ptr), [0, 2])


def test_push_does_not_modify_inputs_and_stops_gradient():
    bank = init_bank(1, 3, 2)
    rows = np.ones((2, 2), np.float32)
    before = rows.copy()
    grad = jax.grad(lambda r: bank_push(bank, r, np.ones(2, bool), np.zeros(2)).features.sum())(
        rows
    )
    np.testing.assert_array_equal(rows, before)
    assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("chunk", [1, 4, 6, 64])
def test_nearest_in_buffer_brute_force_over_filled_slots(chunk):
    rng = np.random.default_rng(3)
    M, C, N, count = 13, 3, 20, 9
    feats = rng.normal(size=(M, C)).astype(np.float32)
    x = rng.normal(size=(N, C)).astype(np.float32)
    x[0] = feats[11]  # identical to an unfilled slot: must not be found
    idx, d2 = nearest_in_buffer(feats, np.int32(count), x, chunk)
    brute = ((x[:, None] - feats[None, :count]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(idx), brute.argmin(1))
    np.testing.assert_allclose(np.asarray(d2), brute.min(1), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(idx) < count)


def test_nearest_rows_per_class_and_empty_buffer():
    rng = np.random.default_rng(4)
    bank = init_bank(3, 6, 2)
    rows = rng.normal(size=(8, 2)).astype(np.float32)
    ids = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    bank = push(bank, rows, np.ones(8, bool), ids)
    x = rng.normal(size=(3, 5, 2)).astype(np.float32)
    nearest, has_any = nearest_rows(bank, x, np.array([1, 0, 2]), chunk_size=4)
    np.testing.assert_array_equal(np.asarray(has_any), [True, True, False])
    for b, k in enumerate([1, 0]):
        cand = rows[ids == k]
        want = cand[((x[b][:, None] - cand[None]) ** 2).sum(-1).argmin(1)]
        np.testing.assert_array_equal(np.asarray(nearest[b]), want)
