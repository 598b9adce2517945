"""Assemble the Ray app (the only place ``ray.remote`` is applied) and drive a training run."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from fednano_ray.config import Config, ConfigError
from fednano_ray.federation import rundir


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Fail before any actor starts when a tier can never be placed on this cluster.

    Raises:
        ConfigError: naming the tier key, what it asks for and what the cluster has.
    """
    trainer = not cfg.clients_hold_llm()  # fedavg-lora starts no LLM trainer
    need_cpu = cfg.train.trainer_num_cpus if trainer else 0.0
    for i, t in enumerate(cfg.tiers):
        actors = t.clients if cfg.federation.mode == "deployment" else min(t.pool_size, t.clients)
        need_cpu += t.num_cpus * actors
        if t.num_gpus > available.get("GPU", 0.0):
            raise ConfigError(
                f"tiers[{i}].num_gpus = {t.num_gpus:g} ({t.name}) but the cluster has "
                f"{available.get('GPU', 0.0):g} GPUs: "
                "lower it, or run on a cluster with GPUs (--address)"
            )
        for res, amount in t.resources.items():
            if amount > available.get(res, 0.0):
                raise ConfigError(
                    f"tiers[{i}].resources.{res} = {amount:g} ({t.name}) but the cluster offers "
                    f"{available.get(res, 0.0):g}: "
                    f"start nodes with --resources='{{\"{res}\": N}}' "
                    "(see cluster.yaml) or remove it"
                )
    if trainer and cfg.train.trainer_num_gpus > available.get("GPU", 0.0):
        raise ConfigError(
            f"train.trainer_num_gpus = {cfg.train.trainer_num_gpus:g} but the cluster has no GPU"
        )
    if need_cpu > available.get("CPU", 0.0) + 1e-9:
        raise ConfigError(
            f"the trainer and client actors need {need_cpu:g} CPUs but the cluster has "
            f"{available.get('CPU', 0.0):g}: "
            "lower tiers[*].num_cpus or tiers[*].pool_size (fractions such as 0.5 are fine) or "
            "train.trainer_num_cpus"
        )


def actor_classes() -> dict[str, Any]:
    import ray

    from fednano_ray.actors.client import ClientActor
    from fednano_ray.actors.coordinator import Coordinator
    from fednano_ray.actors.llm_trainer import LLMTrainer

    return {
        "client": ray.remote(ClientActor),
        "trainer": ray.remote(LLMTrainer),
        "coordinator": ray.remote(Coordinator),
    }


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Start a private local Ray instance (``address`` None), or join the cluster at ``address``.

    ``address=None`` means ``"local"``: a new instance even when ``ray start`` already runs one on
    this machine (plain ``ray.init()`` would join that one and then refuse ``num_cpus``). Only entry
    points call this.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", include_dashboard=False, log_to_driver=True, **kwargs)
    else:
        ray.init(address=address, **kwargs)


def head_node_id() -> str:
    """The Ray head node's id (it advertises ``node:__internal_head__``); the driver's node if none
    does."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    client_class: type | None = None,
    progress: bool = True,
    stop_after_round: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federated training run on the connected Ray cluster; returns results.json.

    Args:
        client_class: the client actor's class (default
            :class:`~fednano_ray.actors.client.ClientActor`; a subclass keeps its constructor and
            methods, e.g. tests/_chaos.py's fault injectors).
        stop_after_round: end after this round without finishing (simulates a killed run).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    if not resume and rundir.results_path(run_dir).exists():
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume to continue it "
            "or choose another --run-dir"
        )
    check_resources(cfg, ray.cluster_resources())
    classes = actor_classes()
    if client_class is not None:
        classes["client"] = ray.remote(client_class)
    t0 = time.perf_counter()
    # The coordinator owns the run: pin it to the head node, never to a client node that may be
    # removed mid-run (tests/actors/test_federation.py removes one). It needs no CPU, so it always
    # fits.
    on_head = NodeAffinitySchedulingStrategy(node_id=head_node_id(), soft=False)
    coord = (
        classes["coordinator"]
        .options(max_concurrency=4, num_cpus=0, scheduling_strategy=on_head)
        .remote(
            cfg,
            str(run_dir),
            resume=resume,
            actor_classes={k: classes[k] for k in ("client", "trainer")},
        )
    )
    info = ray.get(coord.begin.remote())
    fed = cfg.federation
    bar = tqdm(
        total=fed.rounds,
        initial=info["next_round"],
        desc="rounds",
        unit="round",
        disable=not progress,
        file=sys.stderr,
    )
    for rnd in range(info["next_round"], fed.rounds):
        ref = coord.run_round.remote(rnd)
        while True:
            ready, _ = ray.wait([ref], timeout=1.0)
            if ready:
                break
            p = ray.get(coord.get_progress.remote())
            if p["round"] == rnd:
                bar.set_postfix_str(f"round {rnd}: {p['done']}/{p['total']} clients")
        rec = ray.get(ref)
        post = {
            "loss": f"{rec['loss']:.3f}" if rec["loss"] is not None else "-",
            "failed": len(rec["failures"]),
        }
        if (
            rec.get("avg_accuracy") is not None
        ):  # None when no client could be scored (eval failures)
            post["acc"] = f"{rec['avg_accuracy']:.3f}"
        bar.set_postfix(post)
        bar.update(1)
        if stop_after_round is not None and rnd >= stop_after_round:
            bar.close()
            results = ray.get(coord.write_results.remote())
            ray.kill(coord)  # as if the run were killed here: only the checkpoints remain
            return results
    bar.close()
    if fed.personalize_steps:
        if progress and cfg.method().dual_adapter:
            print(
                f"{fed.strategy} local phase: every client trains a local adapter for "
                f"{fed.personalize_steps} steps beside the frozen global one",
                file=sys.stderr,
            )
        elif progress:
            print(
                "personalising: every client fine-tunes the global adapters for "
                f"{fed.personalize_steps} steps",
                file=sys.stderr,
            )
        ray.get(coord.personalize.remote())
    results = ray.get(coord.finish.remote(time.perf_counter() - t0))
    results["trainer_stats"] = ray.get(coord.trainer_stats.remote())
    ray.kill(coord)
    return results
