"""``fednano-ray report``: grouping over seeds, mean ± std in the Markdown table, PNG plots,
errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _fake_runs import ROOT, tiny_config, write_run

from fednano_ray.cli import main
from fednano_ray.federation import rundir
from fednano_ray.report import ReportError, build_report, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    """The first Markdown table: header cells and body rows."""
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    split = lambda ln: [c.strip() for c in ln.strip().strip("|").split(" | ")]
    header = split(rows[0])
    body = [split(r) for r in rows[1:] if len(split(r)) == len(header)]
    body = body[
        : next((i for i, r in enumerate(body) if r[0].startswith("`")), len(body))
    ]  # stop at the runs list
    return header, body


def _pm(values: list[float]) -> str:
    """mean ± sample std in percent, computed independently of the report code."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """fednano over two seeds, fedavg over one, local with no evaluation round and no global test
    accuracy.
    """
    return [
        write_run(
            tmp_path / "fednano-s0",
            tiny_config("federation.strategy=fednano"),
            accs=[0.30, 0.40],
            global_acc=0.32,
            wall_time_s=11.0,
        ),
        write_run(
            tmp_path / "fednano-s1",
            tiny_config("federation.strategy=fednano", "federation.seed=1", "data.synth.seed=1"),
            accs=[0.35, 0.30],
            global_acc=0.36,
            wall_time_s=13.0,
        ),
        write_run(
            tmp_path / "fedavg-s0",
            tiny_config("federation.strategy=fedavg"),
            accs=[0.28, 0.50],
            global_acc=0.31,
        ),
        write_run(
            tmp_path / "local-s0",
            tiny_config("federation.strategy=local"),
            accs=[None, None],
            after=0.45,
            global_acc=None,
        ),
    ]


def test_table_mean_std_over_seeds(runs, tmp_path):
    md_path = build_report(runs, tmp_path / "out")
    assert md_path == tmp_path / "out" / rundir.REPORT
    header, body = _table(md_path.read_text())
    # Seeds are not settings: three rows, and no column for federation.seed / data.synth.seed.
    assert header[:4] == ["strategy", "Dirichlet α", "clients", "n"]
    assert [r[0] for r in body] == [
        "local",
        "fedavg",
        "fednano",
    ]  # strategy order within one setting
    col = {h: i for i, h in enumerate(header)}
    row = {r[0]: r for r in body}
    acc, glob = col["avg client acc. after (%)"], col["global test acc. (%)"]

    assert row["fednano"][col["n"]] == "2"
    assert row["fednano"][acc] == _pm([0.40, 0.30]) == "35.0 ± 7.1"
    assert row["fednano"][glob] == _pm([0.32, 0.36]) == "34.0 ± 2.8"
    assert row["fednano"][col["wall time (s)"]] == "12"  # mean of 11 and 13 s
    assert row["fedavg"][acc] == "50.0" and row["fedavg"][glob] == "31.0"  # one seed: no ± part
    assert row["local"][acc] == "45.0"  # no evaluation round: the final summary's accuracy
    assert row["local"][glob] == "n/a"

    for r in body:
        assert r[col["Dirichlet α"]] == "0.5" and r[col["clients"]] == "4"
        assert r[col["client storage (% of full MLLM)"]] == "419.2 KiB (23.0%)"  # 429312 B, 22.99 %
        assert r[col["adapter bytes / round (up+down)"]] == "72.0 KiB"  # 49152 + 24576 B per round
        assert r[col["activations / split step (up+down)"]] == "225.1 KiB"  # 115808 + 114688 B


def test_plots_are_png_and_linked(runs, tmp_path):
    out = tmp_path / "out"
    md = build_report(runs, out).read_text()
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
        assert f"]({name})" in md


def test_ablation_keys_get_columns_but_client_counts_do_not(tmp_path):
    runs = [
        write_run(
            tmp_path / "het", tiny_config(), accs=[0.3, 0.4]
        ),  # tiny.yaml tiers: ranks 2 and 4
        write_run(tmp_path / "hom", tiny_config("tiers.0.adapter_rank=4"), accs=[0.3, 0.5]),
        write_run(
            tmp_path / "six",
            tiny_config(
                "federation.num_clients=6", "federation.clients_per_round=6", "tiers.1.clients=4"
            ),
            accs=[0.3, 0.45],
        ),
    ]
    header, body = _table(build_report(runs, tmp_path / "out").read_text())
    assert "ranks" in header
    assert not any("clients_per_round" in h or h.startswith("tiers.") for h in header)
    col = {h: i for i, h in enumerate(header)}
    assert sorted((r[col["clients"]], r[col["ranks"]]) for r in body) == [
        ("4", "2/4"),
        ("4", "4"),
        ("6", "2/4"),
    ]


def test_unfinished_runs_are_left_out(runs, tmp_path):
    half = write_run(tmp_path / "half", tiny_config(), accs=[0.3], finished=False)
    warnings = []
    md = build_report([*runs, half], tmp_path / "out", warn=warnings.append).read_text()
    assert any(str(half) in w for w in warnings)
    assert f"Left out (not finished): `{half}`" in md
    with pytest.raises(ReportError, match="none of the runs has finished"):
        build_report([half], tmp_path / "out2")


def test_a_report_folder_among_the_run_dirs_is_skipped(runs, tmp_path):
    """`fednano-ray grid` writes RUNS_DIR/report, so `fednano-ray report RUNS_DIR/*/` passes it
    too.
    """
    first = build_report(runs, tmp_path / "report").parent
    warnings = []
    md = build_report([*runs, first], tmp_path / "again", warn=warnings.append).read_text()
    assert warnings == [f"{first}: a report folder, not a run directory; skipped"]
    assert md == (first / rundir.REPORT).read_text()


def test_missing_or_invalid_results_name_the_path(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError) as e:
        load_run(empty)
    assert str(rundir.results_path(empty)) in str(e.value) and "not found" in str(e.value)
    with pytest.raises(ReportError, match="no such run directory"):
        build_report([tmp_path / "nope"], tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    rundir.results_path(bad).write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON") as e:
        load_run(bad)
    assert str(rundir.results_path(bad)) in str(e.value)
    rundir.results_path(bad).write_text(json.dumps({"rounds": []}))
    with pytest.raises(ReportError, match="not a fednano-ray results file"):
        load_run(bad)
    # The CLI prints one line naming the file and exits 2.
    assert main(["report", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert f"error: {rundir.results_path(empty)}: not found" in capsys.readouterr().err


def test_cli_report(runs, tmp_path, capsys):
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "cli")]) == 0
    assert f"report: {tmp_path / 'cli' / rundir.REPORT}" in capsys.readouterr().out


def test_report_on_a_real_run(tiny_run, tmp_path):
    """The CLI reports a run `fednano-ray train` really wrote (the tiny config on Ray)."""
    run, _ = tiny_run
    out = tmp_path / "real"
    proc = subprocess.run(
        [sys.executable, "-m", "fednano_ray", "report", str(run), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    real = rundir.read_results(run)["summary"]
    # The Coordinator's averages are weighted by test size, and every accuracy has its 95% interval.
    ns, after = real["accuracy_n_per_client"], real["accuracy_after_per_client"]
    assert set(ns) == set(after) and all(n >= 1 for n in ns.values())
    weighted = sum(after[c] * ns[c] for c in after) / sum(ns[c] for c in after)
    assert real["accuracy_after"] == pytest.approx(weighted)
    for key in (
        "accuracy_before",
        "accuracy_after",
        "global_test_accuracy_before",
        "global_test_accuracy",
    ):
        lo, hi = real[f"{key}_ci95"]
        assert 0 <= lo <= real[key] <= hi <= 1, key
    assert set(real["accuracy_after_per_client_ci95"]) == set(after) and real["global_test_n"] == 40
    header, body = _table((out / rundir.REPORT).read_text())
    assert len(body) == 1 and body[0][header.index("n")] == "1"
    assert (
        body[0][header.index("avg client acc. after (%)")] == f"{100 * real['accuracy_after']:.1f}"
    )
    assert (out / "accuracy_vs_round.png").read_bytes().startswith(PNG_MAGIC)


def test_paired_section_pools_seeds_and_pairs_settings_by_seed():
    """The paired section: each setting's after − before over all its runs' held-out answers, and
    two settings compared only on the seeds they share (same questions), with the paired
    interval."""
    from fednano_ray.report import Group, Run, paired_section
    from fednano_ray.stats import paired_difference

    # Prepare: two settings x two seeds; setting B is one question better than A on each seed
    def run(strategy, seed, after):
        results = {
            "summary": {
                "correct_before": {"0": "0000", "1": "00"},
                "global_test_correct_before": "010",
            },
            "rounds": [{"correct": after, "global_test_correct": ["011"]}],
        }
        return Run(
            Path(f"/r/{strategy}{seed}"),
            results,
            {"federation.strategy": strategy, "federation.seed": seed},
        )

    a = Group(
        {"strategy": "fedavg", "alpha": 0.5, "clients": 8},
        [run("fedavg", s, {"0": "1000", "1": "00"}) for s in (0, 1)],
    )
    b = Group(
        {"strategy": "fednano", "alpha": 0.5, "clients": 8},
        [run("fednano", s, {"0": "1100", "1": "00"}) for s in (0, 1, 2)],
    )

    # Execute
    md = paired_section([a, b], ["strategy", "alpha", "clients"])

    # Assert
    mean, (lo, hi), n = paired_difference(["000000"] * 2, ["100000"] * 2)
    row_a = next(ln for ln in md if ln.startswith("| fedavg"))
    assert f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (n={n})" in row_a and n == 12
    assert "+33.3" in row_a  # the global test: 1 of 3 questions gained, on each run
    versus = next(
        ln for ln in md if ln.startswith("| fedavg") and ln.count("|") == 5 and "fednano" in ln
    )
    mean, (lo, hi), n = paired_difference(["110000"] * 2, ["100000"] * 2)  # A - B: fedavg one worse
    assert versus.split("|")[3].strip() == "2"  # seeds 0 and 1 only: seed 2 has no fedavg run
    assert f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (n={n})" in versus
