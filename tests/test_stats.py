"""Statistics users can trust: Wilson intervals, test-size-weighted averages, data.min_holdout, the
table.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _fake_runs import tiny_config, write_run

from fednano_ray.cli import summary_table
from fednano_ray.config import ConfigError, load_config
from fednano_ray.federation import rundir
from fednano_ray.stats import (
    client_accuracy_stats,
    global_test_stats,
    pooled_accuracy,
    weighted_accuracy,
    wilson_interval,
)

# -- Wilson score interval -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("correct", "n", "lo", "hi"),
    [
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (1, 1, 0.2065, 1.0),
        (81, 263, 0.2553, 0.3662),  # large n: close to the Wald interval
    ],
)
def test_wilson_known_values(correct, n, lo, hi):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_edges_and_properties():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no questions: no information
    assert (
        wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    )  # exact at the ends
    assert wilson_interval(3.0000000000000004, 10) == pytest.approx(
        wilson_interval(3, 10)
    )  # acc * n floats
    for n in (1, 2, 3, 7, 30, 1000):
        for c in range(0, n + 1, max(1, n // 7)):
            lo, hi = wilson_interval(c, n)
            assert 0.0 <= lo <= c / n <= hi <= 1.0
    # More questions, a narrower interval; a higher z, a wider one.
    widths = [hi - lo for lo, hi in (wilson_interval(n // 2, n) for n in (4, 10, 40, 400))]
    assert widths == sorted(widths, reverse=True)
    lo95, hi95 = wilson_interval(5, 10)
    lo99, hi99 = wilson_interval(5, 10, z=2.576)
    assert lo99 < lo95 and hi99 > hi95


# -- test-size-weighted averages -------------------------------------------------------------------


def test_average_is_weighted_by_test_size():
    """2 questions at 100% and 98 at 50% average to 0.51 (pooled), not 0.75 (unweighted)."""
    accs, ns = {"0": 1.0, "1": 0.5}, {"0": 2, "1": 98}
    assert weighted_accuracy(accs, ns) == pytest.approx(0.51)
    acc, n, ci = pooled_accuracy(accs, ns)
    assert acc == pytest.approx(0.51) and n == 100
    assert ci == pytest.approx(wilson_interval(51, 100))
    assert weighted_accuracy({}, {}) is None and pooled_accuracy({}, {}) == (None, 0, None)


def test_client_accuracy_stats_is_the_evaluation_record():
    per_client = {
        "0": {"accuracy": 1.0, "n": 2.0},
        "1": {"accuracy": 0.5, "n": 98.0, "accuracy/colour": 0.5},
    }
    out = client_accuracy_stats(per_client)
    assert out["accuracy"] == {"0": 1.0, "1": 0.5}
    assert out["accuracy_n"] == {"0": 2, "1": 98}
    assert out["avg_accuracy"] == pytest.approx(0.51) and out["avg_accuracy_n"] == 100
    assert out["accuracy_ci95"]["0"] == pytest.approx(list(wilson_interval(2, 2)))
    assert out["avg_accuracy_ci95"] == pytest.approx(list(wilson_interval(51, 100)))
    json.dumps(out)  # results.json-ready: lists, ints, floats
    empty = client_accuracy_stats({})
    assert empty["avg_accuracy"] is None and empty["avg_accuracy_ci95"] is None


def test_global_test_stats():
    one = global_test_stats([{"accuracy": 0.3, "n": 200.0}])
    assert one["global_test_accuracy"] == pytest.approx(0.3) and one["global_test_n"] == 200
    assert one["global_test_accuracy_ci95"] == pytest.approx(list(wilson_interval(60, 200)))
    # Personalised strategies: the mean over the clients' models on the same questions.
    many = global_test_stats([{"accuracy": 0.2, "n": 100.0}, {"accuracy": 0.4, "n": 100.0}])
    assert many["global_test_accuracy"] == pytest.approx(0.3) and many["global_test_n"] == 100
    assert global_test_stats([]) == {
        "global_test_accuracy": None,
        "global_test_n": 0,
        "global_test_accuracy_ci95": None,
    }


# -- data.min_holdout ------------------------------------------------------------------------------


def _cfg(*overrides: str):
    tree = {
        "model": {"kind": "tiny"},
        "data": {
            "synth": {"num_train": 160, "num_test": 10, "image_size": 16},
            "holdout_fraction": 0.2,
        },
        "federation": {"num_clients": 6, "clients_per_round": 6, "seed": 0},
        "tiers": [{"name": "all", "clients": 6}],
    }
    return load_config(tree, list(overrides))


def test_min_holdout_gives_every_client_enough_questions():
    from fednano_ray.task import prepare_data

    plain = prepare_data(_cfg())
    assert min(len(t) for t in plain.client_test) < 8  # 20% of a small dirichlet shard
    data = prepare_data(_cfg("data.min_holdout=8"))
    assert all(len(t) >= 8 for t in data.client_test)
    assert all(len(t) >= 1 for t in data.client_train)
    for tr, te in zip(data.client_train, data.client_test, strict=True):
        assert not set(tr) & set(te)
        # The larger of 20% of the shard and min_holdout.
        assert len(te) == max(round(0.2 * (len(tr) + len(te))), 8)
    pooled = sorted(i for part in data.client_train + data.client_test for i in part)
    assert pooled == list(range(len(data.train)))


def test_min_holdout_impossible_is_a_clear_config_error():
    with pytest.raises(ConfigError) as e:
        _cfg("data.min_holdout=30")  # 6 clients * 31 > 160 examples
    msg = str(e.value)
    assert "data.min_holdout=30" in msg and "31 examples per client" in msg
    assert "data.synth.num_train" in msg and "federation.num_clients" in msg
    with pytest.raises(ConfigError, match="data.max_train_examples"):
        _cfg("data.min_holdout=10", "data.max_train_examples=60")


def test_min_holdout_unreachable_partition_names_the_keys():
    """Enough examples overall, but a skewed split cannot give every client min_holdout + 1."""
    from fednano_ray.task import prepare_data

    # 7 * 21 = 147 <= 160 examples, but with alpha 0.01 each of the 6 categories goes (almost) whole
    # to one client.
    cfg = _cfg(
        "data.min_holdout=20",
        "data.alpha=0.01",
        "federation.num_clients=7",
        "federation.clients_per_round=7",
        "tiers.0.clients=7",
    )
    with pytest.raises(ConfigError) as e:
        prepare_data(cfg)
    msg = str(e.value)
    assert "data.min_holdout=20" in msg and "data.alpha" in msg and "data.synth.num_train" in msg


# -- the printed table -----------------------------------------------------------------------------


def _first(line: str) -> str:
    return (line.split() or [""])[0]


def _results(tmp_path, num_clients: int, test_n: list[int]) -> dict:
    half = num_clients // 2
    cfg = tiny_config(
        f"federation.num_clients={num_clients}",
        f"federation.clients_per_round={min(num_clients, 8)}",
        f"tiers.0.clients={half}",
        f"tiers.1.clients={num_clients - half}",
    )
    run = write_run(
        tmp_path / f"run{num_clients}",
        cfg,
        accs=[0.3, 0.386],
        global_acc=0.3,
        test_n=test_n,
        global_n=200,
    )
    return rundir.read_results(run)


def test_table_shows_n_and_intervals(tmp_path):
    res = _results(tmp_path, 8, [56, 30, 30, 41, 30, 30, 30, 34])
    s = res["summary"]
    # Client 0 (56 questions) scores 1.0, the others 0.386: the average row is the weighted one.
    ev = client_accuracy_stats(
        {
            c: {"accuracy": 1.0 if c == "0" else 0.386, "n": n}
            for c, n in s["accuracy_n_per_client"].items()
        }
    )
    s.update(
        accuracy_after_per_client=ev["accuracy"],
        accuracy_after_per_client_ci95=ev["accuracy_ci95"],
        accuracy_after=ev["avg_accuracy"],
        accuracy_after_ci95=ev["avg_accuracy_ci95"],
    )
    weighted = (56 * 1.0 + 225 * 0.386) / 281
    assert ev["avg_accuracy"] == pytest.approx(weighted)
    table = summary_table(res)
    lines = table.splitlines()
    assert lines[0].split() == ["client", "|", "n", "|", "before", "|", "after"]
    row0 = next(ln for ln in lines if _first(ln) == "0")
    lo, hi = wilson_interval(56, 56)
    assert row0.split("|")[1].strip() == "56"
    assert row0.split("|")[3].strip() == f"1.000 [{lo:.2f}, {hi:.2f}]"
    row3 = next(ln for ln in lines if _first(ln) == "3")
    lo, hi = wilson_interval(0.386 * 41, 41)
    assert row3.split("|")[3].strip() == f"0.386 [{lo:.2f}, {hi:.2f}]"
    avg = next(ln for ln in lines if _first(ln) == "average")
    lo, hi = s["accuracy_after_ci95"]
    assert avg.split("|")[1].strip() == "281"
    assert f"{weighted:.3f} [{lo:.2f}, {hi:.2f}]" in avg and "weighted by test size" in avg
    assert "95% Wilson interval" in table
    glo, ghi = s["global_test_accuracy_ci95"]
    assert f"-> 0.300 [{glo:.2f}, {ghi:.2f}]  (n=200)" in next(
        ln for ln in lines if "global test accuracy" in ln
    )
    assert (
        len({tuple(i for i, ch in enumerate(ln) if ch == "|") for ln in lines if "|" in ln}) == 1
    )  # columns line up
    assert max(len(ln) for ln in lines) <= 100


def test_table_stays_short_at_100_clients(tmp_path):
    res = _results(tmp_path, 100, [5 + c % 7 for c in range(100)])
    table = summary_table(res)
    lines = table.splitlines()
    client_rows = [ln for ln in lines if _first(ln).isdigit()]
    assert len(client_rows) == 10  # the first ten, then a spread
    assert any("90 more clients" in ln and "median" in ln for ln in lines)
    avg = next(ln for ln in lines if _first(ln) == "average")
    assert avg.split("|")[1].strip() == str(sum(5 + c % 7 for c in range(100)))
    assert len(lines) < 30 and max(len(ln) for ln in lines) <= 100


def test_table_reads_older_results_without_intervals(tmp_path):
    """A results.json written before intervals: accuracies alone, nothing claims to be weighted."""
    res = _results(tmp_path, 4, [10, 10, 10, 10])
    s = res["summary"]
    for k in [k for k in s if k.endswith(("_ci95", "_n", "_n_per_client"))]:
        del s[k]
    lines = summary_table(res).splitlines()
    rows = [ln for ln in lines if _first(ln).isdigit() or _first(ln) == "average"]
    assert len(rows) == 5
    assert all("0.386" in ln and "[" not in ln and "weighted" not in ln for ln in rows)


def test_table_shows_personalised_accuracy_and_categories(tmp_path):
    """With personalisation the table gets a third accuracy column (per client and on average) and
    a line for the personal adapters on the global test; the global test is broken down by
    category."""
    res = _results(tmp_path, 4, [30, 30, 30, 30])
    s = res["summary"]
    ev = client_accuracy_stats({c: {"accuracy": 0.5, "n": 30} for c in s["accuracy_n_per_client"]})
    s.update(
        accuracy_personalized_per_client=ev["accuracy"],
        accuracy_personalized_per_client_ci95=ev["accuracy_ci95"],
        accuracy_personalized=ev["avg_accuracy"],
        accuracy_personalized_ci95=ev["avg_accuracy_ci95"],
        global_test_accuracy_personalized=0.25,
        global_test_accuracy_personalized_ci95=[0.2, 0.3],
        global_test_by_category_before={"colour": 0.25, "count": 0.5},
        global_test_by_category={"colour": 0.75, "count": 0.5},
        global_test_n_by_category={"colour": 20, "count": 40},
    )
    lines = summary_table(res).splitlines()
    assert [c.strip() for c in lines[0].split("|")] == [
        "client",
        "n",
        "before",
        "after (global)",
        "personalised",
    ]
    lo, hi = wilson_interval(15, 30)
    assert (
        next(ln for ln in lines if _first(ln) == "0").split("|")[4].strip()
        == f"0.500 [{lo:.2f}, {hi:.2f}]"
    )
    assert "0.500" in next(ln for ln in lines if _first(ln) == "average").split("|")[4]
    assert "0.250 [0.20, 0.30]" in next(ln for ln in lines if "with personal adapters" in ln)
    colour = next(ln for ln in lines if _first(ln) == "colour")
    lo, hi = wilson_interval(15, 20)
    assert "n=20" in colour and colour.split("->")[1].strip() == f"0.750 [{lo:.2f}, {hi:.2f}]"
    assert len({tuple(i for i, ch in enumerate(ln) if ch == "|") for ln in lines if "|" in ln}) == 1
    assert max(len(ln) for ln in lines) <= 100


def test_paired_difference_counts_each_question_once():
    """Gains are per question: 2 of 10 flipped to right, 1 to wrong -> +0.1, with the paired normal
    interval; identical answers give exactly 0 with a zero-width interval; mismatched lengths
    raise."""
    from fednano_ray.stats import paired_difference

    # Execute
    mean, (lo, hi), n = paired_difference(["0000011111"], ["1100001111"])
    same = paired_difference(["0101", "11"], ["0101", "11"])

    # Assert
    d = [1, 1, 0, 0, 0, -1, 0, 0, 0, 0]
    sd = float(np.std(d, ddof=1))
    assert (mean, n) == (pytest.approx(0.1), 10)
    assert (lo, hi) == (
        pytest.approx(0.1 - 1.96 * sd / np.sqrt(10)),
        pytest.approx(0.1 + 1.96 * sd / np.sqrt(10)),
    )
    assert same == (0.0, [0.0, 0.0], 6)
    assert paired_difference([], []) is None
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(["01"], ["011"])
