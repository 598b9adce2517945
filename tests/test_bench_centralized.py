"""`fednano-ray bench centralized`, the probe behind the README's centralised figures, runs end to
end on the tiny model and prints one JSON line per evaluation, per-question outcomes included."""

import json
import subprocess
import sys


def test_bench_centralized_prints_scores_and_per_question_outcomes():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fednano_ray",
            "bench",
            "centralized",
            "--config",
            "examples/tiny.yaml",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--batch-size",
            "4",
            "--set",
            "adapter.kind=slots",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in lines] == [0, 1, 2]
    for r in lines:
        assert 0 <= r["accuracy"] <= 1 and len(r["correct"]) == r["n"] == 40
        assert r["accuracy"] == round(r["correct"].count("1") / 40, 3)
    assert "train_loss" in lines[-1] and "train_loss" not in lines[0]
