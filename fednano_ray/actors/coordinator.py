"""Coordinator: places the run's actors and carries its calls over Ray.

The run's logic, rounds, evaluation, personalisation, checkpoints and the summary, is
:class:`~fednano_ray.federation.rounds.Federation`, which has no Ray in it. This actor sets the run
up (data, the frozen encoder's features once, accounting), starts the LLM trainer and the client
actors (one per client in deployment, a pool per tier in simulation), and hands their handles to the
federation with :class:`RayTransport`: object-store references, ``ray.wait`` deadlines, restarts.
A plain class: ``app.py`` wraps it (and the client and trainer actors) with ``ray.remote``.

Under ``fedavg-lora`` every client actor holds the whole MLLM: no LLM trainer is started, and
evaluation (which always runs on the client actors) scores the LoRA-adapted LLM.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fednano_ray.config import Config
from fednano_ray.federation import rundir
from fednano_ray.federation.rounds import Federation, Placement, adapters_fingerprint, round_seed
from fednano_ray.federation.setup import prepare_run
from fednano_ray.federation.transport import CallFailed

# Re-sends of a split step whose trainer died under it (each restart reloads the frozen LLM).
TRAINER_TASK_RETRIES = 3

__all__ = ["REPRODUCIBILITY", "Coordinator", "RayTransport", "adapters_fingerprint"]

#: What results.json says about repeating a run (DESIGN.md: same config and seed, same accuracies).
REPRODUCIBILITY = (
    "Same config, seed, machine type, precision and thread counts give bit-identical adapters and "
    "accuracies: sampling and local batches are seeded, updates are aggregated in client order, "
    "evaluation batches are per client, and the LLM trainer merges a split step only with others "
    "of the same padded length (train.pad_to_multiple), which leaves every client's result "
    "unchanged by what it was batched with. Another CPU or GPU, another thread count, or fp32 vs "
    "bf16 rounds differently, so accuracies can then differ slightly."
)

_seed = round_seed  # the name the tests have used for (seed, round, client) seeds


class RayTransport:
    """:class:`~fednano_ray.federation.transport.Transport` over Ray actor handles."""

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def submit(self, actor: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(actor, method).remote(*args, **kwargs)

    def wait(self, pending: Sequence[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        import ray

        return ray.wait(list(pending), num_returns=1, timeout=timeout)

    def get(self, call: Any, timeout: float) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(call, timeout=timeout)
        except GetTimeoutError as e:
            raise CallFailed(
                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", timeout=True
            ) from e
        except (RayActorError, RayTaskError) as e:
            raise CallFailed(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e

    def restart(self, actor: Any) -> None:
        import ray

        ray.kill(
            actor, no_restart=False
        )  # SIGKILL; Ray restarts it (max_restarts=-1), its queue cleared


class Coordinator:
    """Sets up one run, owns its actors and serves the driver's calls (``app.train``).

    Args:
        cfg: the validated config.
        run_dir: where config.yaml, results.json and checkpoints go.
        resume: continue from the newest checkpoint in ``run_dir``.
        actor_classes: ``{"client": ray.remote(ClientActor), "trainer": ray.remote(LLMTrainer)}``.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        resume: bool = False,
        actor_classes: dict[str, Any],
    ) -> None:
        import ray

        from fednano_ray.precision import hardware_info

        t0 = time.perf_counter()
        self.cfg = cfg
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        fed = cfg.federation
        method = cfg.method()  # what the method needs of the run (fednano_ray/federation/method.py)
        # Setup (connector alignment on first use, feature encoding) runs before any other actor
        # exists, so it uses the whole node (Ray pins a num_cpus=0 actor to one torch thread).
        prepared = prepare_run(cfg)
        data = prepared.data
        data_ref = ray.put(prepared.client_data)
        t = cfg.train
        # The frozen LLM prefers the coordinator's (head) node, as cluster.yaml provisions it.
        # fedavg-lora clients train their own LLM copies: no shared trainer.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        head = NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=True
        )
        self.trainer = (
            None
            if not method.needs_trainer
            else actor_classes["trainer"]
            .options(
                num_cpus=t.trainer_num_cpus,
                num_gpus=t.trainer_num_gpus,
                max_restarts=-1,
                # A call in flight when the trainer dies is re-sent, but not forever: a request
                # that kills it each time fails its own client (RayActorError) after these.
                max_task_retries=TRAINER_TASK_RETRIES,
                scheduling_strategy=head,
            )
            .remote(
                cfg.model,
                max_batch_size=t.max_batch_size,
                batch_wait_ms=t.batch_wait_ms,
                pad_to_multiple=t.pad_to_multiple,
                num_threads=t.trainer_threads or os.cpu_count() or 1,
            )
        )

        # Client actors: one per client (deployment) or a pool per tier (simulation).
        self.client_tier = cfg.client_tiers()
        self.pools: dict[str, list[Any]] = {}
        for tier in cfg.tiers:
            n = tier.clients if fed.mode == "deployment" else tier.pool_size
            self.pools[tier.name] = [
                actor_classes["client"]
                .options(
                    num_cpus=tier.num_cpus,
                    num_gpus=tier.num_gpus,
                    resources=dict(tier.resources),
                    max_restarts=-1,
                    max_task_retries=0,
                )
                .remote(
                    cfg.model,
                    cfg.adapter,
                    rank=cfg.tier_rank(tier),
                    server=self.trainer,
                    data=data_ref,
                    num_threads=max(1, int(tier.num_cpus)),
                    seed=fed.seed,
                    llm_lora=method.client.holds_llm,
                )
                for _ in range(min(n, tier.clients))
            ]
        top = max(
            cfg.tiers, key=cfg.tier_rank
        )  # the largest rank: the global state's, and the pooled client's
        top_actor = self.pools[top.name][0]
        rundir.write_config(run_dir, cfg)
        self.federation = Federation(
            cfg,
            method=method,
            strategy=method.build_strategy(),
            data=data,
            placement=Placement(self._actor_for, self.client_tier, top, top_actor),
            transport=RayTransport(),
            run_dir=run_dir,
            initial_state=ray.get(top_actor.initial_state.remote()),
            accounting=prepared.accounting,
            runtime={
                # as resolved on the coordinator's node
                "precision": cfg.model.runtime_precision().as_dict(),
                "hardware": hardware_info(),
                "reproducibility": REPRODUCIBILITY,
            },
            coordinator_node=ray.get_runtime_context().get_node_id(),
            trainer_incarnation=self._trainer_incarnation,
        )
        if resume:
            self.federation.restore()
        self.setup_s = time.perf_counter() - t0

    def _actor_for(self, client_id: int):
        """Client ``client_id``'s actor: its own (deployment) or one of its tier's pool, round
        robin."""
        pool = self.pools[self.client_tier[client_id].name]
        tier_index = sum(
            1
            for c in range(client_id)
            if self.client_tier[c].name == self.client_tier[client_id].name
        )
        return pool[tier_index % len(pool)]

    def _trainer_incarnation(self) -> str | None:
        """Which start of the LLM trainer actor serves now (None if it does not answer in time, or
        if the run has none)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        if self.trainer is None:
            return None
        try:
            return ray.get(
                self.trainer.incarnation.remote(), timeout=self.cfg.federation.deadline_s
            )
        except (RayActorError, RayTaskError, GetTimeoutError):
            return None

    # -- the driver's calls (app.train) ------------------------------------------------------------

    def begin(self) -> dict[str, Any]:
        """Record the LLM trainer's runtime and evaluate the pretrained model once (unless resumed
        past it)."""
        import ray

        runtime = self.federation.runtime
        if (
            self.trainer is not None and "llm_trainer" not in runtime
        ):  # it may sit on another node (a GPU)
            runtime["llm_trainer"] = ray.get(
                self.trainer.runtime.remote(), timeout=self.cfg.federation.deadline_s
            )
        self.federation.begin()
        return {"next_round": self.federation.next_round, "setup_s": self.setup_s}

    def run_round(self, rnd: int) -> dict[str, Any]:
        return self.federation.run_round(rnd)

    def personalize(self) -> dict[str, Any]:
        return self.federation.personalize()

    def finish(self, wall_time_s: float) -> dict[str, Any]:
        return self.federation.finish(wall_time_s)

    def write_results(self) -> dict[str, Any]:
        return self.federation.write_results()

    def get_progress(self) -> dict[str, int]:
        return dict(self.federation.progress)

    def ping(self) -> bool:
        return True

    def trainer_stats(self) -> dict[str, float]:
        """The LLM trainer's batching counters (empty when the run has no trainer: fedavg-lora)."""
        import ray

        return {} if self.trainer is None else ray.get(self.trainer.get_stats.remote())
