"""Accuracy statistics users can trust: test-size weighting and 95% Wilson score intervals.

Pure functions (no Ray, no torch). Per-client held-out sets can hold only a handful of questions, so

* every average of per-client accuracies is weighted by the client's test size ``n`` (the number of
  held-out questions), which equals the pooled accuracy: all correct answers over all questions;
* every accuracy is reported with a 95% Wilson score interval for a binomial proportion, which stays
  inside [0, 1] and behaves at 0% and 100% and for small ``n`` (unlike the normal "Wald" interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "Z95",
    "client_accuracy_stats",
    "global_test_stats",
    "paired_difference",
    "pooled_accuracy",
    "weighted_accuracy",
    "wilson_interval",
]

Z95 = 1.96  # two-sided 95% quantile of the standard normal (1.95996...), as usually quoted
K = TypeVar("K")


def wilson_interval(correct: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n``.

    Args:
        correct: Number of successes (a float is accepted, e.g. ``accuracy * n``); clipped to
            ``[0, n]``.
        n: Number of trials. ``n <= 0`` carries no information: the interval is ``(0.0, 1.0)``.
        z: Normal quantile; the default gives a two-sided 95% interval.

    Returns:
        ``(lo, hi)`` with ``0 <= lo <= correct/n <= hi <= 1``; ``lo`` is exactly 0 when nothing is
        correct and ``hi`` exactly 1 when everything is.
    """
    if not n or n <= 0 or not math.isfinite(float(n)):
        return (0.0, 1.0)
    n = float(n)
    c = min(max(float(correct), 0.0), n)
    if not math.isfinite(c):
        return (0.0, 1.0)
    p = c / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(max(p * (1.0 - p) / n + z2 / (4.0 * n * n), 0.0)) / denom
    lo = 0.0 if c <= 0 else max(0.0, center - half)
    hi = 1.0 if c >= n else min(1.0, center + half)
    return (min(lo, p), max(hi, p))


def weighted_accuracy(accuracy: Mapping[K, float], n: Mapping[K, int | float]) -> float | None:
    """Mean of per-client accuracies weighted by test size: pooled correct / pooled ``n``.

    Clients without a test size (or with ``n <= 0``) are left out; None when no client remains.
    """
    total = sum(float(n[k]) for k in accuracy if n.get(k) and n[k] > 0)
    if total <= 0:
        return None
    return sum(float(accuracy[k]) * float(n[k]) for k in accuracy if n.get(k) and n[k] > 0) / total


def pooled_accuracy(
    accuracy: Mapping[K, float], n: Mapping[K, int | float], z: float = Z95
) -> tuple[float | None, int, tuple[float, float] | None]:
    """Test-size-weighted accuracy over clients, the pooled number of questions, and its Wilson
    interval.

    The interval is the Wilson interval of all held-out questions pooled (``sum(acc_i * n_i)``
    correct of ``sum(n_i)``). It treats every question as an independent trial and so ignores the
    variance *between* clients (clients differ in data and model): it describes how precisely the
    pooled accuracy of these clients' held-out sets is measured, not how a new client would score.

    Returns:
        ``(accuracy, n, (lo, hi))``, or ``(None, 0, None)`` when no client has a test size.
    """
    acc = weighted_accuracy(accuracy, n)
    if acc is None:
        return None, 0, None
    total = sum(float(n[k]) for k in accuracy if n.get(k) and n[k] > 0)
    return acc, round(total), wilson_interval(acc * total, total, z)


def client_accuracy_stats(
    per_client: Mapping[str, Mapping[str, float]], z: float = Z95
) -> dict[str, Any]:
    """The per-client accuracy fields of an evaluation record in results.json.

    Args:
        per_client: client id -> its evaluation result (``accuracy`` and ``n``, the number of
            held-out questions scored), as ``ClientActor.evaluate`` returns it.

    Returns:
        ``accuracy`` {client: acc}, ``accuracy_n`` {client: n},
        ``accuracy_ci95`` {client: [lo, hi]},
        ``avg_accuracy`` (weighted by test size: pooled correct / pooled n; None without clients),
        ``avg_accuracy_n`` (pooled n) and ``avg_accuracy_ci95`` (pooled Wilson interval, see
        :func:`pooled_accuracy`; None without clients).
    """
    accs = {c: float(m["accuracy"]) for c, m in per_client.items()}
    ns = {c: round(float(m["n"])) for c, m in per_client.items()}
    avg, total, ci = pooled_accuracy(accs, ns, z)
    return {
        "accuracy": accs,
        "accuracy_n": ns,
        "accuracy_ci95": {c: list(wilson_interval(accs[c] * ns[c], ns[c], z)) for c in accs},
        "avg_accuracy": avg,
        "avg_accuracy_n": total,
        "avg_accuracy_ci95": list(ci) if ci is not None else None,
    }


def global_test_stats(tests: Sequence[Mapping[str, float]], z: float = Z95) -> dict[str, Any]:
    """The global-test accuracy fields of an evaluation record in results.json.

    Args:
        tests: one result (``accuracy``, ``n``) per set of adapters scored on the same global test
            questions: one for a global model; one per client model for personalised strategies.

    Returns:
        ``global_test_accuracy`` (the mean over ``tests``), ``global_test_n`` (questions) and
        ``global_test_accuracy_ci95``: the Wilson interval of that accuracy on ``n`` questions (for
        a mean over several client models this is approximate: the models answer the same
        questions).
        None values when nothing was scored.
    """
    tests = [t for t in tests if t.get("n") and float(t["n"]) > 0]
    if not tests:
        return {"global_test_accuracy": None, "global_test_n": 0, "global_test_accuracy_ci95": None}
    acc = sum(float(t["accuracy"]) for t in tests) / len(tests)
    n = round(float(tests[0]["n"]))
    return {
        "global_test_accuracy": acc,
        "global_test_n": n,
        "global_test_accuracy_ci95": list(wilson_interval(acc * n, n, z)),
    }


def paired_difference(
    before: Sequence[str], after: Sequence[str], z: float = Z95
) -> tuple[float, list[float], int] | None:
    """Accuracy gain ``after - before`` on the same questions, with a paired 95% interval.

    Args:
        before, after: per set of questions (a client's held-out split, or the global test), one
            string of "1"/"0" per question in the same order (``evaluate``'s ``correct``); pooled.

    Returns:
        (mean difference, [lo, hi], number of questions) or None without questions. The interval
        is the normal one of the mean of the per-question differences d in {-1, 0, 1}: pairing
        removes the variance the two models share on the same questions, so it is much narrower
        than the two separate intervals suggest.

    Raises:
        ValueError: if a pair of strings differs in length (not the same questions).
    """
    d: list[int] = []
    for b, a in zip(before, after, strict=True):
        if len(a) != len(b):
            raise ValueError(
                f"paired accuracies need the same questions: {len(b)} before, {len(a)} after"
            )
        d.extend(int(x) - int(y) for x, y in zip(a, b, strict=True))
    n = len(d)
    if n == 0:
        return None
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return mean, [mean - half, mean + half], n
