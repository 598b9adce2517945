"""Split a dataset's examples across federated clients (DESIGN.md §4).

Three partitioners, all deterministic per seed and all returning disjoint index lists that together
cover every example:

* ``iid`` — a shuffled, near-equal split (client sizes differ by at most one).
* ``dirichlet`` — for every label, proportions across clients are drawn from Dirichlet(alpha); small
  alpha gives each client few dominant labels, large alpha approaches iid. Draws are repeated until
  every client has at least ``min_examples`` examples.
* ``pathological`` — every client holds examples of exactly ``labels_per_client`` labels; label
  sets are dealt round-robin over a seeded label order, so every label is used and each label's
  holders split its examples near-equally.

The labels are whatever the caller partitions by (the answer text or the question category).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

__all__ = ["METHODS", "partition", "split_holdout"]

METHODS = ("iid", "dirichlet", "pathological")
_DIRICHLET_TRIES = 1000  # redraws before giving up on min_examples


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _encode(labels: Sequence[Hashable]) -> tuple[np.ndarray, int]:
    """Label codes 0..L-1 in order of first appearance, and L."""
    codes: dict[Hashable, int] = {}
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        try:
            out[i] = codes.setdefault(label, len(codes))
        except TypeError:
            raise TypeError(f"labels[{i}] is not hashable: {label!r}") from None
    return out, len(codes)


def _finish(parts: list[np.ndarray]) -> list[list[int]]:
    return [sorted(int(i) for i in p) for p in parts]


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), num_clients)


def _dirichlet(
    codes: np.ndarray,
    num_labels: int,
    num_clients: int,
    alpha: float,
    min_examples: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    by_label = [np.flatnonzero(codes == lab) for lab in range(num_labels)]
    for _ in range(_DIRICHLET_TRIES):
        counts = np.empty((num_labels, num_clients), dtype=np.int64)
        for lab, idx in enumerate(by_label):
            props = rng.dirichlet(np.full(num_clients, alpha))
            bounds = np.floor(np.cumsum(props) * len(idx)).astype(np.int64)
            bounds[-1] = len(idx)  # the last client takes the rounding remainder
            counts[lab] = np.diff(bounds, prepend=0)
        if counts.sum(axis=0).min() >= min_examples:
            owner = np.empty(len(codes), dtype=np.int64)
            for lab, idx in enumerate(by_label):
                owner[rng.permutation(idx)] = np.repeat(np.arange(num_clients), counts[lab])
            order = np.argsort(owner, kind="stable")
            return np.split(order, np.cumsum(np.bincount(owner, minlength=num_clients))[:-1])
    raise ValueError(
        f"dirichlet partition: no draw in {_DIRICHLET_TRIES} tries gave every one of the "
        f"{num_clients} clients at least min_examples={min_examples} of the {len(codes)} examples "
        f"with alpha={alpha}; increase alpha, use fewer clients, lower min_examples, "
        f"or use method='iid'"
    )


def _pathological(
    codes: np.ndarray,
    num_labels: int,
    num_clients: int,
    k: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    if num_clients * k < num_labels:
        raise ValueError(
            f"pathological partition: num_clients * labels_per_client = {num_clients} * {k} = "
            f"{num_clients * k} label slots cannot cover all {num_labels} labels "
            f"(every example must go to a client); raise num_clients or labels_per_client"
        )
    order = rng.permutation(num_labels)
    holders: list[list[int]] = [[] for _ in range(num_labels)]
    for client in range(num_clients):
        for j in range(k):
            holders[int(order[(client * k + j) % num_labels])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for lab in range(num_labels):
        idx = rng.permutation(np.flatnonzero(codes == lab))
        if len(idx) < len(holders[lab]):
            raise ValueError(
                f"pathological partition: a label has {len(idx)} example(s) but "
                f"{len(holders[lab])} clients must share it, so some client would not get exactly "
                f"labels_per_client={k} labels; use fewer clients or a smaller labels_per_client"
            )
        for client, chunk in zip(holders[lab], np.array_split(idx, len(holders[lab])), strict=True):
            parts[client].append(chunk)
    return [np.concatenate(p) for p in parts]


def partition(
    labels: Sequence[Hashable],
    num_clients: int,
    method: Literal["iid", "dirichlet", "pathological"],
    *,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    seed: int = 0,
    min_examples: int = 1,
) -> list[list[int]]:
    """Split example indices ``0..len(labels)-1`` across ``num_clients`` clients.

    Args:
        labels: One hashable label per example (e.g. the answer text or the category).
        num_clients: Number of clients (at least 1, at most ``len(labels)``).
        method: ``"iid"``, ``"dirichlet"`` or ``"pathological"``.
        alpha: Dirichlet concentration (``dirichlet`` only); must be > 0. Small = heterogeneous.
        labels_per_client: Distinct labels per client (``pathological`` only); between 1 and the
            number of distinct labels.
        seed: Random seed; the same arguments always give the same partition.
        min_examples: Every client must get at least this many examples (at least 1).

    Returns:
        ``num_clients`` sorted lists of indices, pairwise disjoint, together covering every index.

    Raises:
        TypeError: If an argument has the wrong type (the message names the parameter).
        ValueError: On invalid values (the message names the parameter), or when the requested
            split is impossible or, for ``dirichlet``, not found within a bounded number of draws.
    """
    if isinstance(labels, str | bytes):
        raise TypeError("labels must be a sequence of per-example labels, not a string")
    try:
        n = len(labels)
    except TypeError:
        raise TypeError(f"labels must be a sequence, got {type(labels).__name__}") from None
    if n == 0:
        raise ValueError("labels is empty: there is nothing to partition")
    num_clients = _check_int("num_clients", num_clients, 1)
    min_examples = _check_int("min_examples", min_examples, 1)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if num_clients > n:
        raise ValueError(
            f"num_clients={num_clients} is more than the {n} examples; "
            "every client needs at least one"
        )
    if num_clients * min_examples > n:
        raise ValueError(
            f"num_clients * min_examples = {num_clients} * {min_examples} = "
            f"{num_clients * min_examples} exceeds the {n} examples; "
            "lower min_examples or num_clients"
        )
    codes, num_labels = _encode(labels)
    rng = np.random.default_rng(int(seed) % (1 << 64))

    if method == "iid":
        parts = _iid(n, num_clients, rng)
    elif method == "dirichlet":
        if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.floating | np.integer):
            raise TypeError(f"alpha must be a number, got {alpha!r}")
        if not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        parts = _dirichlet(codes, num_labels, num_clients, float(alpha), min_examples, rng)
    else:
        k = _check_int("labels_per_client", labels_per_client, 1)
        if k > num_labels:
            raise ValueError(
                f"labels_per_client={k} exceeds the number of distinct labels ({num_labels})"
            )
        parts = _pathological(codes, num_labels, num_clients, k, rng)

    sizes = [len(p) for p in parts]
    if min(sizes) < min_examples:
        raise ValueError(
            f"{method} partition: the smallest client got {min(sizes)} example(s), fewer than "
            f"min_examples={min_examples}; use fewer clients or lower min_examples"
        )
    return _finish(parts)


def split_holdout(
    indices: Sequence[int], fraction: float, seed: int = 0, min_test: int = 0
) -> tuple[list[int], list[int]]:
    """Split one client's indices into a training part and a held-out test part.

    Args:
        indices: The client's example indices.
        fraction: Share held out for testing, in ``[0, 1)``. When it is > 0 and there are at least
            two indices, the held-out part gets at least one and the training part keeps at least
            one.
        seed: Random seed (use a different one per client, e.g. ``seed + client_id``).
        min_test: Fewest examples held out: ``max(round(fraction * n), min_test)`` are (``0`` = no
            minimum beyond the one above). The training part still keeps at least one, so this needs
            ``len(indices) >= min_test + 1``.

    Returns:
        ``(train_idx, test_idx)``, disjoint, together equal to ``indices``, each in the input order.

    Raises:
        TypeError: If ``fraction`` is not a number or ``seed`` or ``min_test`` is not an integer.
        ValueError: If ``fraction`` is not in ``[0, 1)``, ``min_test`` is negative, or there are
            fewer than ``min_test + 1`` indices.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.floating):
        raise TypeError(f"fraction must be a number in [0, 1), got {fraction!r}")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    min_test = _check_int("min_test", min_test, 0)
    items = [int(i) for i in indices]
    n = len(items)
    if min_test > 0 and n < min_test + 1:
        raise ValueError(
            f"min_test={min_test} needs at least {min_test + 1} indices "
            f"({min_test} held out + 1 to train), got {n}"
        )
    n_test = max(round(n * fraction), min_test)
    if fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    rng = np.random.default_rng(int(seed) % (1 << 64))
    test_pos = set(rng.permutation(n)[:n_test].tolist())
    train = [x for p, x in enumerate(items) if p not in test_pos]
    test = [x for p, x in enumerate(items) if p in test_pos]
    return train, test
