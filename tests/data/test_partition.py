"""Partitioners: disjoint and complete, deterministic, and as heterogeneous as asked."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fednano_ray.data import partition, split_holdout

# 6 labels with unequal frequencies (like answer texts), 900 examples.
LABELS = [
    lab for lab, n in zip("abcdef", (300, 200, 150, 120, 80, 50), strict=True) for _ in range(n)
]
LABELS = [LABELS[i] for i in np.random.default_rng(123).permutation(len(LABELS))]


def _check_cover(parts: list[list[int]], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # disjoint and complete
    assert all(p == sorted(p) and all(isinstance(i, int) for i in p) for p in parts)


def _label_skew(parts: list[list[int]], labels: list[str]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    names = sorted(set(labels))
    overall = np.array([labels.count(x) for x in names], dtype=float) / len(labels)
    dists = []
    for p in parts:
        counts = Counter(labels[i] for i in p)
        mix = np.array([counts[x] for x in names], dtype=float) / len(p)
        dists.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(dists))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological"])
@pytest.mark.parametrize("num_clients", [1, 3, 10])
def test_disjoint_complete_deterministic(method: str, num_clients: int) -> None:
    kwargs = {"alpha": 0.5, "labels_per_client": 2 if num_clients > 1 else 6}
    parts = partition(LABELS, num_clients, method, seed=3, **kwargs)  # type: ignore[arg-type]
    _check_cover(parts, len(LABELS), num_clients)
    assert all(len(p) >= 1 for p in parts)
    assert parts == partition(LABELS, num_clients, method, seed=3, **kwargs)  # type: ignore[arg-type]
    if num_clients > 1:
        other = partition(LABELS, num_clients, method, seed=4, **kwargs)  # type: ignore[arg-type]
        assert other != parts


def test_iid_sizes_balanced_and_mixed() -> None:
    parts = partition(LABELS, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _label_skew(parts, LABELS) < 0.1
    starts = np.cumsum([0, *sizes[:-1]])
    contiguous = [list(range(int(s), int(s) + n)) for s, n in zip(starts, sizes, strict=True)]
    assert sorted(i for p in parts for i in p) == list(range(len(LABELS)))
    assert parts != contiguous and [sorted(p) for p in parts] != contiguous  # shuffled, not chunked


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    def skew(alpha: float) -> float:
        return float(
            np.mean(
                [
                    _label_skew(partition(LABELS, 10, "dirichlet", alpha=alpha, seed=s), LABELS)
                    for s in range(5)
                ]
            )
        )

    small, medium, large = skew(0.1), skew(1.0), skew(100.0)
    assert small > medium > large
    assert small > 0.4 and large < 0.1


def test_dirichlet_redraws_until_min_examples() -> None:
    unconstrained = []
    for seed in range(5):
        parts = partition(LABELS, 20, "dirichlet", alpha=0.3, seed=seed, min_examples=10)
        _check_cover(parts, len(LABELS), 20)
        assert min(len(p) for p in parts) >= 10
        loose = partition(LABELS, 20, "dirichlet", alpha=0.3, seed=seed, min_examples=1)
        unconstrained.append(min(len(p) for p in loose))
    assert min(unconstrained) < 10  # the constraint mattered: some first draws were rejected


def test_dirichlet_impossible_draw_is_a_clear_error() -> None:
    labels = ["x"] * 50 + ["y"] * 50
    with pytest.raises(ValueError, match="increase alpha"):
        partition(labels, 40, "dirichlet", alpha=0.001, min_examples=2, seed=0)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_pathological_exactly_k_labels_all_used(k: int) -> None:
    num_clients = 12
    parts = partition(LABELS, num_clients, "pathological", labels_per_client=k, seed=1)
    _check_cover(parts, len(LABELS), num_clients)
    held = [{LABELS[i] for i in p} for p in parts]
    assert all(len(h) == k for h in held)
    assert set().union(*held) == set(LABELS)


def test_pathological_one_label_each() -> None:
    parts = partition(LABELS, 6, "pathological", labels_per_client=1, seed=0)
    assert sorted(next(iter({LABELS[i] for i in p})) for p in parts) == list("abcdef")


def test_pathological_impossible_cases() -> None:
    with pytest.raises(ValueError, match="cannot cover all 6 labels"):
        partition(LABELS, 2, "pathological", labels_per_client=2)
    few = ["a"] * 100 + ["b"] * 2
    with pytest.raises(ValueError, match="labels_per_client"):
        partition(few, 8, "pathological", labels_per_client=1)


def test_hashable_labels_of_any_kind() -> None:
    labels = [("q", i % 3) for i in range(30)] + [None] * 6 + [7] * 6
    for method in ("iid", "dirichlet", "pathological"):
        parts = partition(labels, 4, method, seed=0)  # type: ignore[arg-type]
        _check_cover(parts, len(labels), 4)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "name"),
    [
        ((LABELS, 0, "iid"), {}, ValueError, "num_clients"),
        ((LABELS[:5], 6, "iid"), {}, ValueError, "num_clients=6 is more than the 5 examples"),
        ((LABELS, True, "iid"), {}, TypeError, "num_clients"),
        ((LABELS, 2.0, "iid"), {}, TypeError, "num_clients"),
        ((LABELS, 3, "random"), {}, ValueError, "method"),
        ((LABELS, 3, "dirichlet"), {"alpha": 0}, ValueError, "alpha"),
        ((LABELS, 3, "dirichlet"), {"alpha": -1.0}, ValueError, "alpha"),
        ((LABELS, 3, "dirichlet"), {"alpha": float("nan")}, ValueError, "alpha"),
        ((LABELS, 3, "dirichlet"), {"alpha": "0.5"}, TypeError, "alpha"),
        ((LABELS, 3, "pathological"), {"labels_per_client": 0}, ValueError, "labels_per_client"),
        ((LABELS, 3, "pathological"), {"labels_per_client": 7}, ValueError, "labels_per_client"),
        ((LABELS, 3, "iid"), {"min_examples": 0}, ValueError, "min_examples"),
        ((LABELS, 10, "iid"), {"min_examples": 91}, ValueError, "min_examples"),
        ((LABELS, 3, "iid"), {"seed": 1.5}, TypeError, "seed"),
        (([], 1, "iid"), {}, ValueError, "labels is empty"),
        (("abc", 1, "iid"), {}, TypeError, "labels"),
        (([[1], [2]], 1, "iid"), {}, TypeError, "labels\\[0\\] is not hashable"),
    ],
)
def test_invalid_arguments_name_the_parameter(
    args: tuple, kwargs: dict, error: type, name: str
) -> None:
    with pytest.raises(error, match=name):
        partition(*args, **kwargs)


def test_min_examples_enforced_for_iid() -> None:
    parts = partition(LABELS, 10, "iid", min_examples=90)
    assert min(len(p) for p in parts) == 90


def test_split_holdout() -> None:
    indices = list(range(100, 150))
    train, test = split_holdout(indices, 0.2, seed=5)
    assert len(test) == 10 and len(train) == 40
    assert sorted(train + test) == indices
    assert train == sorted(train) and test == sorted(test)  # input order kept
    assert (train, test) == split_holdout(indices, 0.2, seed=5)
    assert test != split_holdout(indices, 0.2, seed=6)[1]
    assert test != list(range(140, 150))  # random, not a tail


def test_split_holdout_edges() -> None:
    assert split_holdout([3, 1, 2], 0.0) == ([3, 1, 2], [])
    assert split_holdout([], 0.5) == ([], [])
    assert split_holdout([9], 0.5) == ([9], [])  # a single example stays for training
    train, test = split_holdout([4, 5], 0.01)
    assert len(train) == 1 and len(test) == 1  # at least one held out when fraction > 0
    train, test = split_holdout([4, 5, 6], 0.99)
    assert len(train) == 1 and len(test) == 2  # at least one kept for training


@pytest.mark.parametrize(
    ("fraction", "error"), [(1.0, ValueError), (-0.1, ValueError), ("x", TypeError)]
)
def test_split_holdout_invalid(fraction: object, error: type) -> None:
    with pytest.raises(error, match="fraction"):
        split_holdout([1, 2, 3], fraction)  # type: ignore[arg-type]


def test_split_holdout_min_test() -> None:
    """min_test raises the held-out part to at least min_test; without it nothing changes."""
    indices = list(range(40))
    assert split_holdout(indices, 0.2, seed=3, min_test=0) == split_holdout(indices, 0.2, seed=3)
    train, test = split_holdout(indices, 0.2, seed=3, min_test=15)
    assert len(test) == 15 and len(train) == 25 and sorted(train + test) == indices
    assert len(split_holdout(indices, 0.5, seed=3, min_test=15)[1]) == 20  # the fraction is larger
    train, test = split_holdout(indices, 0.2, seed=3, min_test=39)
    assert len(train) == 1  # one example left to train on
    with pytest.raises(ValueError, match="min_test=40 needs at least 41"):
        split_holdout(indices, 0.2, min_test=40)
    with pytest.raises(ValueError, match="min_test"):
        split_holdout(indices, 0.2, min_test=-1)
