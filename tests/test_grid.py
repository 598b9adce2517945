"""``fednano-ray grid``: expansion, deterministic names, up-front validation, resumable bookkeeping.

The training itself is replaced by a fake runner that writes a finished results.json (no Ray).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from _fake_runs import ROOT, TINY, write_run

from fednano_ray.cli import main
from fednano_ray.config import load_config
from fednano_ray.federation import rundir
from fednano_ray.grid import GridError, cell_name, check_cells, expand, load_grid, run_grid

PAPER = ROOT / "examples" / "paper" / "grid.yaml"


def _spec(tmp_path: Path, groups: dict, **top) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {"base": str(TINY), "seeds": [0, 1], "groups": groups, **top}, sort_keys=False
        )
    )
    return path


STRATEGY_ALPHA = {
    "main": {
        "axes": {
            "strategy": {"key": "federation.strategy", "values": ["fedavg", "fednano"]},
            "alpha": {"key": "data.alpha", "values": [0.1, 0.5]},
        }
    },
    # fednano at alpha 0.5 is tiny.yaml's own setting: the same cells as two of main's.
    "again": {"set": ["federation.strategy=fednano", "data.alpha=0.5"]},
}


class FakeRunner:
    """Stands in for `fednano-ray train`: validates the overrides and writes a finished run."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[tuple[str, bool]] = []
        self.fail = fail

    def __call__(self, base, overrides, run_dir, resume):
        self.calls.append((run_dir.name, resume))
        if run_dir.name in self.fail:
            return False, "exit status 1: boom"
        cfg = load_config(base, overrides).model_dump(mode="json")
        write_run(run_dir, cfg, accs=[0.3, 0.4 + 0.01 * cfg["federation"]["seed"]])
        return True, ""


def test_expansion_counts_and_deterministic_names(tmp_path):
    spec = load_grid(_spec(tmp_path, STRATEGY_ALPHA))
    cells = expand(spec)
    assert len(cells) == 2 * 2 * 2  # strategies x alphas x seeds; group `again` adds no new cell
    names = [c.name for c in cells]
    assert len(set(names)) == len(names)
    assert names == [c.name for c in expand(load_grid(spec.path))]  # same spec, same names
    shared = [c for c in cells if c.groups == ["main", "again"]]
    assert len(shared) == 2 and {c.seed for c in shared} == {0, 1}
    assert all(c.name.startswith(("fedavg_", "fednano_")) for c in cells)
    assert expand(spec, only=["again"])[0].name in names

    base = load_config(TINY).model_dump(mode="json")
    name = cell_name(["data.alpha=0.1", "federation.seed=1"], base, ["federation.seed"])
    # Restating base values or reordering does not change the name; the value and the seed do.
    assert (
        cell_name(
            ["federation.seed=1", "federation.rounds=2", "data.alpha=0.1"],
            base,
            ["federation.seed"],
        )
        == name
    )
    assert cell_name(["data.alpha=0.2", "federation.seed=1"], base, ["federation.seed"]) != name
    assert cell_name(["data.alpha=0.1", "federation.seed=2"], base, ["federation.seed"]) != name
    assert name.startswith("fednano_a0.1_s1-")


def test_paper_grid_expands_and_validates(tmp_path):
    spec = load_grid(PAPER)
    cells = expand(spec)
    main_cells = [c for c in cells if "main" in c.groups]
    assert len(main_cells) == 6 * 3 * 2 * 3  # strategies x alphas x client counts x seeds
    # Ablations at the reference setting share its cells: rank 2/32, homogeneous (= rank 8) and
    # local steps 2/32 are new; vision-only and text-only are new; the rest are main's cells.
    assert len(cells) == 108 + 3 * (2 + 1 + 2 + 2)
    assert sorted(cells[0].groups) == ["main"]
    check_cells(cells, spec, tmp_path / "runs")
    assert {c.status for c in cells} == {"new"}  # every strategy exists, fedavg-lora included
    assert len([c for c in cells if c.name.startswith("fedavg-lora_")]) == 3 * 2 * 3


def test_dry_run_catches_a_bad_key_before_running(tmp_path, capsys):
    groups = {**STRATEGY_ALPHA, "typo": {"set": ["federation.roundz=3"]}}
    runner = FakeRunner()
    with pytest.raises(GridError) as e:
        run_grid(load_grid(_spec(tmp_path, groups)), runs_dir=tmp_path / "runs", runner=runner)
    assert "federation.roundz: unknown key" in str(e.value) and "nothing was run" in str(e.value)
    assert runner.calls == [] and not (tmp_path / "runs").exists()
    # The CLI's dry run: one error, exit 2.
    assert (
        main(["grid", str(tmp_path / "grid.yaml"), "--dry-run", "--runs-dir", str(tmp_path / "r")])
        == 2
    )
    assert "roundz" in capsys.readouterr().err
    # --only can leave the bad group out.
    assert (
        main(
            [
                "grid",
                str(tmp_path / "grid.yaml"),
                "--dry-run",
                "--only",
                "main",
                "--runs-dir",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    # A bad value is caught as well as a bad key.
    bad_value = _spec(
        tmp_path, {"g": {"axes": {"alpha": {"key": "data.alpha", "values": [0.5, -1]}}}}
    )
    with pytest.raises(GridError, match="data.alpha"):
        run_grid(load_grid(bad_value), runs_dir=tmp_path / "runs", runner=runner, dry_run=True)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"groups": {"g": {"set": ["noequals"]}}}, "expected key=value"),
        ({"groups": {"g": {"axis": {}}}}, "unknown key"),
        ({"groups": {"g": {}}, "seedz": [1]}, "unknown key"),
        ({"groups": {"g": {"axes": {"a": {"key": "data.alpha"}}}}}, "list of `values`"),
    ],
)
def test_bad_specs(tmp_path, bad, match):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": str(TINY), **bad}))
    with pytest.raises(GridError, match=match):
        load_grid(path)


def test_run_skips_finished_resumes_partial_and_survives_unknown_strategy(tmp_path):
    groups = {
        "main": {
            "axes": {
                "strategy": {
                    "key": "federation.strategy",
                    "values": ["fedavg", "fednano", "scaffold"],  # scaffold: not implemented
                }
            }
        }
    }
    spec = load_grid(_spec(tmp_path, groups))
    runs = tmp_path / "runs"
    cells = {c.name.split("_")[0] + f"-{c.seed}": c.name for c in expand(spec)}
    assert len(cells) == 6
    # fedavg seed 0 finished earlier; fednano seed 0 was cut off after a checkpoint.
    write_run(
        runs / cells["fedavg-0"],
        load_config(TINY, ["federation.strategy=fedavg"]).model_dump(mode="json"),
        accs=[0.3, 0.4],
    )
    write_run(
        runs / cells["fednano-0"],
        load_config(TINY).model_dump(mode="json"),
        accs=[0.3],
        finished=False,
    )

    runner, lines = FakeRunner(), []
    rc = run_grid(spec, runs_dir=runs, runner=runner, out=lines.append)
    text = "\n".join(lines)
    assert rc == 1  # the scaffold cells failed, and were reported
    assert sorted(runner.calls) == sorted(
        [(cells["fedavg-1"], False), (cells["fednano-0"], True), (cells["fednano-1"], False)]
    )
    assert f"{cells['fedavg-0']}: finished before, skipped" in text
    assert f"{cells['scaffold-0']}: FAILED, config error" in text and "federation.strategy" in text
    assert "4 of 6 cells finished, 2 failed" in text
    md = (runs / "report" / rundir.REPORT).read_text()
    assert "| fedavg | 0.5 | 4 | 2 |" in md and "| fednano | 0.5 | 4 | 2 |" in md

    # Rerun: nothing left to train; the report is written again.
    runner2, lines2 = FakeRunner(), []
    assert run_grid(spec, runs_dir=runs, runner=runner2, out=lines2.append) == 1
    assert runner2.calls == []
    assert sum("finished before, skipped" in ln for ln in lines2) == 4


def test_failed_cell_does_not_stop_the_grid(tmp_path):
    spec = load_grid(_spec(tmp_path, STRATEGY_ALPHA, seeds=[0]))
    names = [c.name for c in expand(spec)]
    runner, lines = FakeRunner(fail={names[0]}), []
    assert run_grid(spec, runs_dir=tmp_path / "runs", runner=runner, out=lines.append) == 1
    assert [n for n, _ in runner.calls] == names
    assert any(f"{names[0]}: FAILED" in ln and "boom" in ln for ln in lines)
    assert rundir.read_results(tmp_path / "runs" / names[1])["summary"]["accuracy_after"] == 0.4


def test_dry_run_lists_cells_and_runs_nothing(tmp_path):
    runner, lines = FakeRunner(), []
    spec = load_grid(_spec(tmp_path, STRATEGY_ALPHA))
    assert (
        run_grid(spec, runs_dir=tmp_path / "runs", runner=runner, dry_run=True, out=lines.append)
        == 0
    )
    assert runner.calls == [] and sum(" new " in ln for ln in lines) == 8


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in (ROOT / "examples" / "paper").glob("*.yaml") if p.name != "base.yaml"),
)
def test_every_shipped_grid_spec_expands_and_validates(tmp_path, name):
    """Each grid spec under examples/paper (RESULTS cites their commands) expands into valid
    cells.
    """
    spec = load_grid(ROOT / "examples" / "paper" / name)
    cells = expand(spec)
    assert cells and len({c.name for c in cells}) == len(cells)
    check_cells(cells, spec, tmp_path / "runs")
    assert {c.status for c in cells} == {"new"}
