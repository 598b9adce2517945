"""Synthetic run directories shaped like real ones (results.json as Coordinator.write_results writes
it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fednano_ray.config import load_config
from fednano_ray.federation import rundir
from fednano_ray.stats import client_accuracy_stats, global_test_stats

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.yaml"

ACCOUNTING = {
    "hidden_size": 128,
    "tied_embeddings": False,
    "total_params": 466880,
    "client_params": 107328,
    "client_frozen_params": 105280,
    "server_params": 361600,
    "shared_params": 0,
    "adapter_params": 2048,
    "total_bytes": 1867520,
    "client_bytes": 429312,
    "server_bytes": 1446400,
    "adapter_bytes": 8192,
    "client_storage_fraction": 0.22988348183687457,
    "client_storage_saving": 0.7701165181631254,
    "adapter_fraction": 0.004386566141192597,
    "adapter_rank": 4,
    "lora_alpha": 16.0,
    "modalities": ["vision", "text"],
    "fisher_upload": True,
    "clients_per_round": 4,
    "round_bytes_down": 32768,
    "round_bytes_up": 65536,
    "batch_size": 4,
    "num_image_tokens": 16,
    "text_tokens": 40,
    "sequence_length": 56,
    "step_bytes_up": 115808,
    "step_bytes_down": 114688,
    "parts": {
        "encoder": 47168,
        "connector": 24832,
        "embed_tokens": 33280,
        "decoder": 328320,
        "lm_head": 33280,
        "adapters": 2048,
    },
}


def tiny_config(*overrides: str, base: Path = TINY) -> dict[str, Any]:
    """A real, validated config tree (as results.json stores it)."""
    return load_config(base, list(overrides)).model_dump(mode="json")


def write_run(
    run_dir: Path,
    config: dict[str, Any],
    *,
    accs: list[float | None],
    before: float = 0.25,
    after: float | None = None,
    global_acc: float | None = 0.3,
    bytes_up: int = 49152,
    bytes_down: int = 24576,
    finished: bool = True,
    wall_time_s: float = 11.5,
    test_n: list[int] | None = None,
    global_n: int = 40,
) -> Path:
    """Write run_dir/{config.yaml,results.json}: one round per entry of ``accs`` (None: not
    evaluated).

    ``after`` is the final accuracy (default: the last evaluated one), as finish() evaluates when no
    round did. ``test_n``: each client's held-out questions (default 10 each); every client scores
    the same accuracy, so the test-size-weighted average equals it. Intervals are computed as the
    Coordinator does.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = config["federation"]
    n, strategy = fed["num_clients"], fed["strategy"]
    clients = list(range(n))
    test_n = test_n or [10] * n

    def per_client(acc: float) -> dict[str, Any]:
        out = client_accuracy_stats({str(c): {"accuracy": acc, "n": test_n[c]} for c in clients})
        return {
            **out,
            "avg_accuracy": acc,
        }  # the weighted mean of equal accuracies, without rounding error

    def global_test(acc: float | None) -> dict[str, Any]:
        return global_test_stats([] if acc is None else [{"accuracy": acc, "n": global_n}])

    rounds = []
    for rnd, acc in enumerate(accs):
        rec: dict[str, Any] = {
            "round": rnd,
            "clients": clients,
            "completed": clients,
            "failures": [],
            "loss": 5.0 - rnd,
            "client_loss": {str(c): 5.0 - rnd for c in clients},
            "placement": {str(c): "node" for c in clients},
            "bytes_down": bytes_down,
            "bytes_up": bytes_up,
            "aggregated": True,
        }
        if acc is not None:
            rec.update(
                **per_client(acc),
                **global_test(global_acc),
                global_test_by_category={"colour": 0.3, "count": 0.4},
            )
        rec["wall_time_s"] = 0.9
        rounds.append(rec)
    ev_before = per_client(before)
    summary: dict[str, Any] = {
        "accuracy_before": before,
        "global_test_accuracy_before": 0.2,
        "accuracy_before_per_client": ev_before["accuracy"],
        "accuracy_before_ci95": ev_before["avg_accuracy_ci95"],
        "global_test_accuracy_before_ci95": global_test(0.2)["global_test_accuracy_ci95"],
        "accuracy_before_per_client_ci95": ev_before["accuracy_ci95"],
        "accuracy_n_per_client": ev_before["accuracy_n"],
        "global_test_n": global_n,
        "global_test_by_category_before": {"colour": 0.2, "count": 0.3},
        "chance_accuracy": 0.29,
    }
    evaluated = [a for a in accs if a is not None]
    after = after if after is not None else (evaluated[-1] if evaluated else None)
    if finished:
        ev_after = per_client(after) if after is not None else {}
        summary.update(
            accuracy_after_ci95=ev_after.get("avg_accuracy_ci95"),
            global_test_accuracy_ci95=global_test(global_acc)["global_test_accuracy_ci95"],
            accuracy_after_per_client_ci95=ev_after.get("accuracy_ci95", {}),
        )
        summary.update(
            strategy=strategy,
            rounds=len(accs),
            accuracy_after=after,
            accuracy_after_per_client={str(c): after for c in clients} if after is not None else {},
            global_test_accuracy=global_acc,
            global_test_by_category={},
            bytes_up=bytes_up * len(accs),
            bytes_down=bytes_down * len(accs),
            failures=0,
            client_storage_fraction=ACCOUNTING["client_storage_fraction"],
            client_bytes=ACCOUNTING["client_bytes"],
            total_bytes=ACCOUNTING["total_bytes"],
            step_bytes_up=ACCOUNTING["step_bytes_up"],
            step_bytes_down=ACCOUNTING["step_bytes_down"],
            rank_rule="HetLoRA zero-padding",
            wall_time_s=wall_time_s,
        )
    results = {
        "config": config,
        "strategy": {
            "strategy": strategy,
            "proximal_mu": 0.0,
            "personalize_only": strategy == "local",
        },
        "rounds": rounds,
        "summary": summary,
        "accounting": {**ACCOUNTING, "strategy": strategy},
        "coordinator_node": "node",
    }
    rundir.config_path(run_dir).write_text(yaml.safe_dump(config, sort_keys=False))
    rundir.write_results(run_dir, results)
    return run_dir
