"""Coordinator: runs the federated rounds.

Each round it samples clients, sends the global NanoAdapters as one object-store reference,
collects updates with a deadline (``ray.wait``) and a quorum, hands failures to the strategy as
data, aggregates, evaluates and checkpoints, so ``--resume`` continues a killed run exactly.
A plain class: ``app.py`` wraps it (and the client and trainer actors) with ``ray.remote``.

Under ``fedavg-lora`` the "adapters" are the PEFT LoRA weights inside the LLM and every client
actor holds the whole MLLM: no LLM trainer is started, and evaluation (which always runs on the
client actors) scores the LoRA-adapted LLM.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fednano_ray.config import Config
from fednano_ray.federation import rundir
from fednano_ray.models.dual import REPRESENTATION
from fednano_ray.stats import client_accuracy_stats, global_test_stats, paired_difference
from fednano_ray.strategies.aggregate import server_step, truncate_to_rank
from fednano_ray.strategies.base import ClientFailure, ClientUpdate
from fednano_ray.trust.round import TrustPolicy

#: What results.json says about repeating a run (DESIGN.md: same config and seed, same accuracies).
REPRODUCIBILITY = (
    "Same config, seed, machine type, precision and thread counts give bit-identical adapters and accuracies: "
    "sampling and local batches are seeded, updates are aggregated in client order, evaluation batches are "
    "per client, and the LLM trainer merges a split step only with others of the same padded length "
    "(train.pad_to_multiple), which leaves every client's result unchanged by what it was batched with. "
    "Another CPU or GPU, another thread count, or fp32 vs bf16 rounds differently, so accuracies can then "
    "differ slightly."
)


def adapters_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short sha256 of an adapter state (keys, shapes and float32 values), to tell states apart."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to(torch.float32).contiguous()
        h.update(f"{key}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _nbytes(state: dict[str, torch.Tensor] | None) -> int:
    return sum(t.numel() * t.element_size() for t in state.values()) if state else 0


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class Coordinator:
    """Owns the global adapters, the client actors and the LLM trainer of one run.

    Args:
        cfg: the validated config.
        run_dir: where config.yaml, results.json and checkpoints go.
        resume: continue from the newest checkpoint in ``run_dir``.
        actor_classes: ``{"client": ray.remote(ClientActor), "trainer": ray.remote(LLMTrainer)}``.
        chaos: test hook ``{(round, client_id): "die" | "stall" | "nan" | "scale" | "kill_trainer"}``
            injecting real faults (a crash, a hang, a NaN update, a 1000x-scaled update, the LLM
            trainer killed with split steps in flight: see ``ClientActor.fit``).
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        resume: bool = False,
        actor_classes: dict[str, Any],
        chaos: dict[tuple[int, int], str] | None = None,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from fednano_ray.accounting import account
        from fednano_ray.features import cached_features, feature_key
        from fednano_ray.models.build import build_mllm
        from fednano_ray.models.pretrained import cache_dir
        from fednano_ray.task import prepare_data

        t0 = time.perf_counter()
        # Ray pins a num_cpus=0 actor to one torch thread; setup (connector alignment on first use,
        # feature encoding) runs before any other actor exists, so it may use the whole node.
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.chaos = chaos or {}
        fed = cfg.federation
        self.trust = TrustPolicy(cfg)  # cfg.trust: validation, robust/DP aggregation, secure aggregation
        self.method = cfg.method()  # what the method needs of the run (fednano_ray/federation/method.py)
        self.strategy = self.method.build_strategy()
        self.data = prepare_data(cfg)

        # Frozen encoder features, once per dataset (cached on disk for real models).
        mllm = build_mllm.__wrapped__(cfg.model)
        key = feature_key(cfg.model, mllm)
        cache = None if cfg.model.kind == "tiny" else cache_dir() / "features"
        train_f = cached_features(mllm, key, self.data.train, cache)
        test_f = cached_features(mllm, key, self.data.test, cache)
        max_rank = max(cfg.tier_rank(t) for t in cfg.tiers)
        self.accounting = account(
            mllm.parts, adapter_rank=max_rank, lora_alpha=cfg.adapter.lora_alpha, modalities=cfg.adapter.modalities,
            num_image_tokens=mllm.num_image_tokens, text_tokens=40, batch_size=cfg.tiers[0].batch_size,
            clients_per_round=fed.clients_per_round, strategy=fed.strategy,
            lora_target_modules=cfg.adapter.lora_target_modules,  # fedavg-lora: fails here if they fit no layer
            scaling=cfg.adapter.scaling,  # one scaling for every tier (adapter_rank here is the largest tier's)
            form=cfg.adapter.kind,
            bank_size=cfg.client_bank_size(),
        )
        del mllm
        gc.collect()
        torch.set_num_threads(threads)

        qs = lambda exs: [(e.question, list(e.choices), e.answer, e.category) for e in exs]
        self._data_ref = data_ref = ray.put({"train": (train_f, qs(self.data.train)), "test": (test_f, qs(self.data.test))})
        t = cfg.train
        # The frozen LLM prefers the coordinator's (head) node, as cluster.yaml provisions it.
        # fedavg-lora clients train their own LLM copies: no shared trainer.
        head = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        self.trainer = None if not self.method.needs_trainer else actor_classes["trainer"].options(
            num_cpus=t.trainer_num_cpus, num_gpus=t.trainer_num_gpus, max_restarts=-1, max_task_retries=-1,
            scheduling_strategy=head,
        ).remote(cfg.model, max_batch_size=t.max_batch_size, batch_wait_ms=t.batch_wait_ms,
                 pad_to_multiple=t.pad_to_multiple,
                 num_threads=t.trainer_threads or os.cpu_count() or 1)

        # Client actors: one per client (deployment) or a pool per tier (simulation).
        self.client_tier = cfg.client_tiers()
        self.pools: dict[str, list[Any]] = {}
        for tier in cfg.tiers:
            n = tier.clients if fed.mode == "deployment" else tier.pool_size
            self.pools[tier.name] = [
                actor_classes["client"].options(
                    num_cpus=tier.num_cpus, num_gpus=tier.num_gpus, resources=dict(tier.resources),
                    max_restarts=-1, max_task_retries=0,
                ).remote(cfg.model, cfg.adapter, rank=cfg.tier_rank(tier), server=self.trainer, data=data_ref,
                         num_threads=max(1, int(tier.num_cpus)), seed=fed.seed, llm_lora=self.method.client.holds_llm)
                for _ in range(min(n, tier.clients))
            ]
        top = max(cfg.tiers, key=cfg.tier_rank)
        self.top_tier = top  # the largest rank: the global state's, and centralized's pooled client's
        self.top_actor = self.pools[top.name][0]
        self.global_state: dict[str, torch.Tensor] = ray.get(self.top_actor.initial_state.remote())
        self.initial_state = {k: v.clone() for k, v in self.global_state.items()}
        self.client_states: dict[int, dict[str, torch.Tensor]] = {}
        # FedDPA-F: each client's bank of training-prompt summaries; with a bank, client_states[c]
        # is its local adapter, used beside the global one (fednano_ray/models/dual.py).
        self.client_banks: dict[int, torch.Tensor] = {}
        self.optimizer_states: dict[int, dict[str, Any]] = {}  # per client, train.optimizer_state=keep
        self.rounds: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.next_round = 0
        self.progress = {"round": -1, "done": 0, "total": 0}
        rundir.write_config(self.run_dir, cfg)
        if resume:
            self._restore()
        from fednano_ray.precision import hardware_info

        self.runtime: dict[str, Any] = {
            "precision": cfg.model.runtime_precision().as_dict(),  # as resolved on the coordinator's node
            "hardware": hardware_info(),
            "reproducibility": REPRODUCIBILITY,
        }
        self.setup_s = time.perf_counter() - t0

    # -- plumbing ---------------------------------------------------------------------------------

    def _fit_kwargs(self, rnd: int, c: int, *, steps: int, batch_size: int) -> dict[str, Any]:
        """What a client's ``fit`` call needs besides its data and start state."""
        t, fed = self.cfg.train, self.cfg.federation
        return {
            "steps": steps, "batch_size": batch_size, "lr": t.lr, "weight_decay": t.weight_decay,
            "prox_mu": self.strategy.proximal_mu, "seed": _seed(fed.seed, rnd, c), "chaos": self.chaos.get((rnd, c)),
            "objective": t.objective, "lm_weight": t.lm_weight, "optimizer_state": self.optimizer_states.get(c),
            **self._fisher_kwargs(),
        }

    def _fisher_record(self) -> dict[str, Any]:
        """The Fisher estimator, for results.json (Fisher-merging strategies only)."""
        if not self.method.fisher_upload:
            return {}
        kw = self._fisher_kwargs()
        return {
            "fisher_estimator": kw["fisher"],
            "fisher_examples": kw["fisher_examples"] if kw["fisher"] == "endpoint" else None,
            "fisher_normalization": "per-tensor mean" if kw["fisher_normalize"] else "none",
        }

    def _fisher_kwargs(self) -> dict[str, Any]:
        """The Fisher clients upload: train.fisher's estimator under Fisher merging; otherwise the free
        trajectory one, which no rule reads."""
        t = self.cfg.train
        if self.method.fisher_upload:
            return {"fisher": t.fisher, "fisher_examples": t.fisher_examples, "fisher_normalize": t.fisher_normalize}
        return {"fisher": "trajectory", "fisher_examples": t.fisher_examples, "fisher_normalize": False}

    def _keep_optimizer_states(self, outs: dict[int, Any]) -> None:
        """Hold each reporting client's AdamW state for its next round (train.optimizer_state=keep).

        The coordinator keeps them on the clients' behalf, as a simulation must (a pool actor serves
        many virtual clients, and actors restart); they are checkpointed with the round, so --resume
        continues exactly. A deployed client would keep its own; none of it is aggregated or counted
        as communication."""
        if self.cfg.train.optimizer_state == "keep":
            for c, out in outs.items():
                if out.get("optimizer_state") is not None:
                    self.optimizer_states[c] = out["optimizer_state"]

    def _fit_tier_and_actor(self, client_id: int):
        """The tier and actor that train ``client_id`` in a round: its own, except that
        ``centralized``'s pooled client trains at the largest tier rank (the top tier's actor), the
        rank its result is scored at."""
        if self.method.pooled:
            return self.top_tier, self.top_actor
        return self.client_tier[client_id], self._actor_for(client_id)

    def _actor_for(self, client_id: int):
        pool = self.pools[self.client_tier[client_id].name]
        tier_index = sum(1 for c in range(client_id) if self.client_tier[c].name == self.client_tier[client_id].name)
        return pool[tier_index % len(pool)]

    def _start_state(self, client_id: int) -> dict[str, torch.Tensor]:
        if self.method.personal_only:
            return self.client_states.get(client_id, self.initial_state)
        return self.global_state

    def get_progress(self) -> dict[str, int]:
        return dict(self.progress)

    def ping(self) -> bool:
        return True

    # -- a round ----------------------------------------------------------------------------------

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Sample, fit with deadline and quorum, aggregate, evaluate, checkpoint. Returns the round record."""
        import ray

        cfg, fed = self.cfg, self.cfg.federation
        t0 = time.perf_counter()
        trainer_start = self._trainer_incarnation()
        rng = np.random.default_rng(_seed(fed.seed, rnd))
        centralized = self.method.pooled
        if centralized:  # one pooled "client" holding every client's training data (upper bound)
            sampled = [0]
        else:
            sampled = sorted(rng.choice(fed.num_clients, fed.clients_per_round, replace=False).tolist())
        global_ref = ray.put(self.global_state)
        if self._secure_by_clients():
            record = self._secure_round(rnd, sampled, global_ref)
            return self._end_round(rnd, record, t0, trainer_start)
        refs: dict[Any, int] = {}
        bytes_down = 0
        for c in sampled:
            tier, actor = self._fit_tier_and_actor(c)
            start = global_ref if not self.method.personal_only else ray.put(self._start_state(c))
            idx = self.data.client_train[c]
            steps = tier.local_steps
            if centralized:
                idx = sorted(i for shard in self.data.client_train for i in shard)
                steps = tier.local_steps * fed.clients_per_round
            bytes_down += _nbytes(truncate_to_rank(self._start_state(c), cfg.tier_rank(tier)))
            ref = actor.fit.remote(c, idx, start, **self._fit_kwargs(rnd, c, steps=steps, batch_size=tier.batch_size))
            refs[ref] = c
        self.progress = {"round": rnd, "done": 0, "total": len(refs)}
        # Past the deadline: recorded as failures, and the actors restarted so their queues clear.
        reasons: dict[int, str] = {}
        outs = self._gather(refs, "", reasons, kill_stalled=True)
        self._keep_optimizer_states(outs)
        # In client order, not arrival order: float sums then add up the same way in every run.
        updates = [
            ClientUpdate(str(c), o["state"], o["num_examples"], o["fisher"], o["metrics"]) for c, o in sorted(outs.items())
        ]
        placement: dict[str, str | None] = {str(c): o.get("node_id") for c, o in outs.items()}
        failures = [ClientFailure(str(c), reason) for c, reason in reasons.items()]

        # Invalid updates (bad keys/shapes/dtypes, NaN/Inf, norm above trust.max_update_norm) become
        # failures "rejected: <reason>": never aggregated, not counted towards the quorum.
        updates, rejected = self.trust.screen(updates, lambda u: self._start_state(int(u.client_id)))
        failures.extend(rejected)
        quorum = math.ceil(fed.quorum * len(sampled))
        record: dict[str, Any] = {
            "round": rnd,
            "clients": sampled,
            "completed": sorted(int(u.client_id) for u in updates),
            "failures": [{"client_id": f.client_id, "reason": f.reason} for f in failures],
            "loss": float(np.mean([u.metrics["loss"] for u in updates])) if updates else None,
            "client_loss": {str(u.client_id): u.metrics["loss"] for u in updates},
            "placement": placement,
            "bytes_down": bytes_down,
            "bytes_up": sum(_nbytes(u.state) + (_nbytes(u.fisher) if self.method.fisher_upload else 0) for u in updates),
        }
        if len(updates) < quorum:
            record["aggregated"] = False
            record["note"] = f"quorum not met: {len(updates)} of {len(sampled)} reported, {quorum} needed; global adapters unchanged"
        else:
            record["aggregated"] = True
            if self.method.personal_only:
                for u in updates:
                    self.client_states[int(u.client_id)] = u.state
            else:  # updates arrive at each client's own rank: the strategy pads (HetLoRA)
                merged, extras = self.trust.aggregate(
                    self.strategy, rnd, self.global_state, updates, failures, self.rounds
                )
                self.global_state = server_step(self.global_state, merged, self.cfg.federation.server_lr)
                record.update(extras)  # secure_aggregation, dp_epsilon, ... when configured
            if self.strategy.warnings:
                record["warnings"] = list(self.strategy.warnings)
        return self._end_round(rnd, record, t0, trainer_start)

    def _end_round(self, rnd: int, record: dict[str, Any], t0: float, trainer_start: str | None) -> dict[str, Any]:
        """Evaluate (when due), time, record and checkpoint the round."""
        last = rnd == self.cfg.federation.rounds - 1
        if last or (rnd + 1) % self.cfg.federation.evaluate_every == 0:
            record.update(self.evaluate())
        # Ray restarted the LLM trainer during the round (clients' in-flight split steps were re-sent).
        record["trainer_restarted"] = self._trainer_incarnation() != trainer_start
        record["wall_time_s"] = round(time.perf_counter() - t0, 2)
        self.rounds.append(record)
        self.next_round = rnd + 1
        self._checkpoint(rnd)
        return record

    # -- a round under secure aggregation ---------------------------------------------------------

    def _secure_by_clients(self) -> bool:
        return self.method.uplink == "secagg"

    def _gather(
        self, refs: dict[Any, int], what: str, failures: dict[int, str], *, kill_stalled: bool = False
    ) -> dict[int, Any]:
        """Results of the calls ``refs`` (ref -> client id) that finish within the deadline; the
        others become ``failures[client] = reason``. With ``kill_stalled`` the actors still busy
        at the deadline are restarted (as after the fit phase of a plain round)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        fed = self.cfg.federation
        results: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + fed.deadline_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                break
            for ref in done:
                c = refs[ref]
                try:
                    results[c] = ray.get(ref, timeout=30)
                except (RayActorError, RayTaskError, GetTimeoutError) as e:
                    failures[c] = f"{what}{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                if what == "":
                    self.progress["done"] += 1
        for ref in pending:
            failures[refs[ref]] = f"{what}deadline of {fed.deadline_s:g} s exceeded"
        if kill_stalled:
            for actor in {id(a): a for a in (self._fit_tier_and_actor(refs[r])[1] for r in pending)}.values():
                ray.kill(actor, no_restart=False)
        return results

    def _secure_round(self, rnd: int, sampled: list[int], global_ref) -> dict[str, Any]:
        """A round under ``trust.secure_aggregation``: the client actors run SecAgg's client side.

        AdvertiseKeys and ShareKeys go through the coordinator (it relays public keys and
        AES-GCM-encrypted Shamir shares it cannot read); each client trains, builds its own term of
        the strategy's sum plan, quantises and masks it, and uploads only the masked ``uint64``
        vector; the coordinator asks the surviving clients for the shares that remove the masks
        (recovering clients that dropped after sharing keys, and summing those that drop after
        uploading) and turns the sum into the new global state with the plan's ``finish``. The
        coordinator never holds a client's state, Fisher or example count.
        """

        from fednano_ray.trust.secagg import (
            DEFAULT_FRAC_BITS,
            SecAggError,
            SecAggServer,
            default_threshold,
            protocol_info,
            sum_template,
        )

        cfg, fed = self.cfg, self.cfg.federation
        frac_bits = DEFAULT_FRAC_BITS
        session = b"fednano round %d" % rnd
        index = {c: i + 1 for i, c in enumerate(sampled)}
        client_of = {i: c for c, i in index.items()}
        threshold = default_threshold(len(sampled))
        server = SecAggServer(threshold, session)
        self.strategy.begin_round(rnd)
        self.strategy.warnings = []
        template = sum_template(self.strategy, self.global_state, len(sampled))
        failures: dict[int, str] = {}
        fitted: dict[int, dict[str, Any]] = {}
        silent: list[int] = []
        dropped: set[int] = set()
        record: dict[str, Any] = {"round": rnd, "clients": sampled}
        note = None
        self.progress = {"round": rnd, "done": 0, "total": len(sampled)}
        bytes_down = 0
        try:
            advertised = self._gather(
                {self._actor_for(c).secagg_advertise.remote(rnd, c, index[c], session): c for c in sampled},
                "secagg advertise keys: ", failures,
            )
            public = server.collect_keys({index[c]: keys for c, keys in advertised.items()})
            sent = self._gather(
                {self._actor_for(c).secagg_share_keys.remote(rnd, c, public, threshold): c for c in advertised},
                "secagg share keys: ", failures,
            )
            inbox = server.route_shares({index[c]: shares for c, shares in sent.items()})
            refs: dict[Any, int] = {}
            for c in sorted(sent):
                tier = self.client_tier[c]
                bytes_down += _nbytes(truncate_to_rank(self.global_state, cfg.tier_rank(tier)))
                secagg = {
                    "round": rnd, "shares": inbox[index[c]], "strategy": self.strategy, "rank": template.rank,
                    "keys": template.keys, "num_clients": len(public), "frac_bits": frac_bits,
                }
                ref = self._actor_for(c).fit.remote(
                    c, self.data.client_train[c], global_ref, secagg=secagg,
                    **self._fit_kwargs(rnd, c, steps=tier.local_steps, batch_size=tier.batch_size),
                )
                refs[ref] = c
            fitted = self._gather(refs, "", failures, kill_stalled=True)
            self._keep_optimizer_states(fitted)
            quorum = math.ceil(fed.quorum * len(sampled))
            if len(fitted) < quorum:
                raise SecAggError(
                    f"quorum not met: {len(fitted)} of {len(sampled)} reported, {quorum} needed; global adapters unchanged"
                )
            survivors, dropped_idx = server.collect_masked({index[c]: out["masked"] for c, out in fitted.items()})
            dropped = {client_of[u] for u in dropped_idx}
            unmask_failures: dict[int, str] = {}
            responses = self._gather(
                {
                    self._actor_for(client_of[u]).secagg_unmask.remote(
                        rnd, client_of[u], sorted(survivors), sorted(dropped_idx)
                    ): client_of[u]
                    for u in sorted(survivors)
                },
                "secagg unmask: ", unmask_failures,
            )
            silent = sorted(unmask_failures)
            total = server.unmask({index[c]: r for c, r in responses.items()})
            merged = template.finish_ring(total, frac_bits)
            self.global_state = server_step(self.global_state, merged, self.cfg.federation.server_lr)
        except SecAggError as e:
            note = str(e) if str(e).startswith("quorum") else f"secure aggregation failed: {e}; global adapters unchanged"
        losses = {str(c): out["metrics"]["loss"] for c, out in sorted(fitted.items())}
        record.update(
            completed=sorted(fitted),
            failures=[{"client_id": str(c), "reason": r} for c, r in sorted(failures.items())],
            loss=float(np.mean(list(losses.values()))) if losses else None,
            client_loss=losses,
            placement={str(c): out.get("node_id") for c, out in fitted.items()},
            bytes_down=bytes_down,
            bytes_up=sum(int(out["masked"].nbytes) for out in fitted.values()),
            aggregated=note is None,
        )
        if note is not None:
            record["note"] = note
        record["secure_aggregation"] = {
            "masked_by": "clients",
            **protocol_info(
                clients=len(sampled),
                threshold=threshold,
                summed=[str(c) for c in fitted] if note is None else [],
                dropped_before_upload=[str(c) for c in sorted(dropped)],
                dropped_before_unmask=[str(c) for c in silent],
                vector_length=template.length,
                frac_bits=frac_bits,
                num_masked=len(fitted),
            ),
        }
        if note is None:
            record.update(self.trust.dp_extras(len(sampled), self.rounds))
        if self.strategy.warnings:
            record["warnings"] = list(self.strategy.warnings)
        return record

    # -- evaluation -------------------------------------------------------------------------------

    def _eval_model(self, c: int) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """What client ``c`` is evaluated with: ``(adapters, None)``, or under FedDPA-F, once it has
        its local adapter and bank, ``(global adapters, dual)`` for ``ClientActor.evaluate``."""
        if c in self.client_banks:
            dual = {
                "local": self.client_states[c], "bank": self.client_banks[c],
                "top_k": self.method.options["top_k"],
            }
            return self.global_state, dual
        return self._client_model(c), None

    def _client_model(self, c: int) -> dict[str, torch.Tensor]:
        """The adapters client ``c`` is evaluated (and served) with: its own, where it has them
        (``local``, or after personalisation), else the global ones (``local``: the initial ones)."""
        if c in self.client_states:
            return self.client_states[c]
        return self.initial_state if self.method.personal_only else self.global_state

    def _get_eval(self, submit, what: str, failures: list[dict[str, str]], deadline: float, ref=None):
        """Result of an evaluation call (``ref``, already submitted, or ``submit()``), retried through an
        actor restart until ``deadline`` (time.monotonic); None (and a recorded failure) if it cannot run."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        reason = f"evaluation deadline of {self.cfg.federation.deadline_s:g} s exceeded"
        for attempt in range(3):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return ray.get(ref if ref is not None else submit(), timeout=left)
            except GetTimeoutError:
                break  # e.g. an actor whose node is gone: its restart waits for resources that left with it
            except (RayActorError, RayTaskError) as e:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                ref = None
                time.sleep(min(1.0 + attempt, max(0.0, deadline - time.monotonic())))
        failures.append({"what": what, "reason": reason})
        return None

    def evaluate(self, initial: bool = False, personal: bool = False) -> dict[str, Any]:
        """Per-client accuracy on each client's held-out split, and global test accuracy.

        ``personal``: every client's own adapters score the global test too (then averaged), as under
        ``local``: what personalisation costs in generality."""
        cfg = self.cfg
        bs = cfg.train.eval_batch_size
        n = cfg.federation.num_clients
        failures: list[dict[str, str]] = []
        # One deadline for the whole phase, as for the fit (_gather): k unreachable clients (a lost
        # node) cost the round one deadline, not k of them.
        deadline = time.monotonic() + cfg.federation.deadline_s
        submits = {}
        for c in range(n):  # submit everything first: the actors evaluate in parallel
            state, dual = (self.initial_state, None) if initial else self._eval_model(c)
            state = truncate_to_rank(state, cfg.tier_rank(self.client_tier[c]))
            idx = self.data.client_test[c]
            fn = lambda c=c, state=state, idx=idx, dual=dual: self._actor_for(c).evaluate.remote(
                state, "train", idx, bs, dual=dual)
            submits[c] = (fn, fn())
        # The global test split is scored with the pretrained adapters (initial), the global adapters,
        # or, for strategies without a global model, every client's own adapters (then averaged), each
        # by an actor of that client's own tier: a rank-r client's state does not fit a larger rank.
        # A state that cannot be scored is an eval failure; global_test_states_scored counts the rest.
        # FedDPA-F: a client's model is its dual adapter (global + local, weighted per question)
        if initial:
            states = [(None, self.initial_state, None, self.top_actor)]
        elif self.method.personal_only or personal:
            states = [(c, *self._eval_model(c), self._actor_for(c)) for c in range(n)]
        else:
            states = [(None, self.global_state, None, self.top_actor)]
        everything = list(range(len(self.data.test)))
        test_subs = []
        for c, s, dual, actor in states:  # submit all, then collect: the actors score in parallel
            fn = lambda s=s, actor=actor, dual=dual: actor.evaluate.remote(
                s, "test", everything, bs, dual=dual)
            what = "global test" if c is None else f"global test, client {c}'s adapters"
            test_subs.append((fn, fn(), what, c))
        per_client = {}
        for c, (fn, ref) in submits.items():
            res = self._get_eval(fn, f"client {c}", failures, deadline, ref=ref)
            if res is not None and res["n"] > 0:
                per_client[str(c)] = res
        scored = [
            (c, self._get_eval(fn, what, failures, deadline, ref=ref))
            for fn, ref, what, c in test_subs
        ]
        tests = [t for _, t in scored if t is not None]
        # Per-client accuracy with its test size n and 95% Wilson interval; avg_accuracy is weighted by
        # test size (pooled correct / pooled n), with the pooled interval (fednano_ray/stats.py).
        out: dict[str, Any] = {
            **client_accuracy_stats(per_client),
            **global_test_stats(tests),
            "global_test_by_category": {k.split("/", 1)[1]: v for k, v in tests[0].items() if k.startswith("accuracy/")}
            if len(tests) == 1 else {},
            # Per question "1"/"0", for paired before/after comparisons (stats.paired_difference).
            "correct": {c: r.get("correct", "") for c, r in per_client.items()},
            "global_test_correct": [t.get("correct", "") for t in tests],
            # Which adapters the global test scored (an audit trail: compare with a checkpoint's).
            "global_test_adapters": adapters_fingerprint(states[0][1]) if len(states) == 1 else None,
        }
        out["global_test_states_scored"] = len(tests)  # of len(states): 1, or num_clients under `local`
        if any("dual_weight_mean" in r for r in per_client.values()):  # FedDPA-F's dual adapters
            out["dual_weight_mean"] = {
                c: r["dual_weight_mean"] for c, r in per_client.items() if "dual_weight_mean" in r
            }
            out["global_test_dual_weight_mean"] = {
                str(c): t["dual_weight_mean"]
                for c, t in scored if t is not None and "dual_weight_mean" in t
            }
        if failures:
            out["eval_failures"] = failures
        return out

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self, rnd: int) -> None:
        # The clients' own adapters, FedDPA-F banks, AdamW moments and the strategy's own state
        # (e.g. fedavgm's server momentum) too: resume continues exactly.
        rundir.write_checkpoint(self.run_dir, rundir.Checkpoint(
            round=rnd, global_state=self.global_state, client_states=self.client_states,
            client_banks=self.client_banks, optimizer_states=self.optimizer_states,
            strategy_state=self.strategy.state_dict(), rounds=self.rounds, summary=self.summary,
        ))
        self.write_results()

    def _restore(self) -> None:
        folder = rundir.latest_checkpoint(self.run_dir)
        if folder is None:
            return
        ckpt = rundir.read_checkpoint(folder)
        self.global_state = ckpt.global_state
        self.client_states = ckpt.client_states
        self.client_banks = ckpt.client_banks
        self.optimizer_states = ckpt.optimizer_states
        if ckpt.strategy_state:
            self.strategy.load_state_dict(ckpt.strategy_state)
        self.rounds = ckpt.rounds
        self.summary = ckpt.summary
        self.next_round = ckpt.round + 1

    def write_results(self) -> dict[str, Any]:
        import ray

        results = {
            "config": self.cfg.model_dump(mode="json"),
            "strategy": {**self.strategy.describe(), "adapter_factors": self.cfg.adapter.factors, **self._fisher_record()},
            "rounds": self.rounds,
            "summary": self.summary,
            "accounting": self.accounting,
            "coordinator_node": ray.get_runtime_context().get_node_id(),
            "runtime": self.runtime,  # precision, hardware (coordinator's and the LLM trainer's), reproducibility
        }
        rundir.write_results(self.run_dir, results)
        return results

    # -- whole run ---------------------------------------------------------------------------------

    def begin(self) -> dict[str, Any]:
        """Evaluate the pretrained model (round 0 = B zero) once, unless resumed past it."""
        import ray

        if self.trainer is not None and "llm_trainer" not in self.runtime:  # it may sit on another node (a GPU)
            self.runtime["llm_trainer"] = ray.get(self.trainer.runtime.remote(), timeout=self.cfg.federation.deadline_s)
        if "accuracy_before" not in self.summary:
            ev = self.evaluate(initial=True)
            self.summary.update(
                accuracy_before=ev["avg_accuracy"], global_test_accuracy_before=ev["global_test_accuracy"],
                accuracy_before_per_client=ev["accuracy"],
                # 95% Wilson intervals; per-client test sizes (held-out questions) weight the average.
                accuracy_before_ci95=ev["avg_accuracy_ci95"],
                global_test_accuracy_before_ci95=ev["global_test_accuracy_ci95"],
                accuracy_before_per_client_ci95=ev["accuracy_ci95"],
                accuracy_n_per_client=ev["accuracy_n"],
                global_test_n=ev["global_test_n"],
                global_test_by_category_before=ev["global_test_by_category"],
                correct_before=ev["correct"],
                global_test_correct_before=ev["global_test_correct"][0] if ev["global_test_correct"] else "",
                global_test_n_by_category=dict(sorted(Counter(
                    e.category for e in self.data.test if e.category is not None).items())),
                # Expected accuracy of guessing uniformly among each question's choices.
                chance_accuracy=float(np.mean([1 / len(e.choices) for e in self.data.test])),
            )
            self.write_results()
        return {"next_round": self.next_round, "setup_s": self.setup_s}

    def _gains(self, ev: dict[str, Any], name: str) -> dict[str, Any]:
        """Paired accuracy gains of the evaluation ``ev`` over the pretrained model's, question by
        question (``accuracy_gain_<name>`` on the clients' held-out data, pooled;
        ``global_test_gain_<name>``), each ``[mean, [lo, hi], n]`` with a 95% interval, or None."""
        before, after = self.summary.get("correct_before") or {}, ev.get("correct") or {}
        common = sorted(c for c in after if c in before and len(before[c]) == len(after[c]))
        held = paired_difference([before[c] for c in common], [after[c] for c in common])
        g_before, g_after = self.summary.get("global_test_correct_before") or "", ev.get("global_test_correct") or []
        g_after = [a for a in g_after if a and len(a) == len(g_before)]
        glob = paired_difference([g_before] * len(g_after), g_after)
        return {f"accuracy_gain_{name}": list(held) if held else None, f"global_test_gain_{name}": list(glob) if glob else None}

    def personalize(self) -> dict[str, Any]:
        """``federation.personalize_steps``: each client fine-tunes a private copy of the global adapters.

        Every client (sampled or not) trains ``personalize_steps`` local steps on its own training
        shard from the final global state, with fresh AdamW moments and its tier's batch size; its
        result becomes its own adapters (``client_states``, checkpointed under ``clients/``, which
        ``fednano-ray serve`` loads). It is scored on its held-out split and, to show what it costs in
        generality, on the global test. The summary gets ``accuracy_personalized`` (per client, the
        weighted average, 95% intervals) beside the global adapters' ``accuracy_after``. A client
        whose fine-tune fails keeps the global adapters (a recorded failure). Idempotent under
        --resume: a finished personalisation is not repeated.

        Under FedDPA-F (``method.dual_adapter``) this is the local phase: each client's result
        is a local adapter trained beside the frozen global one (``ClientActor.fit_dual``) plus
        its bank of training summaries (``client_banks``, checkpointed beside it); the client is
        then scored with its dual adapter and a per-question weight, and the summary's ``feddpa``
        record holds the weighting and each client's mean weight on its held-out questions and on
        the global test.
        """
        import ray

        fed = self.cfg.federation
        if not fed.personalize_steps or self.method.personal_only or "accuracy_personalized" in self.summary:
            return {}
        t0 = time.perf_counter()
        dual = self.method.dual_adapter
        global_ref = ray.put(self.global_state)
        refs: dict[Any, int] = {}
        for c in range(fed.num_clients):
            tier = self.client_tier[c]
            kw = self._fit_kwargs(fed.rounds, c, steps=fed.personalize_steps, batch_size=tier.batch_size)
            actor = self._actor_for(c)
            if dual:  # FedDPA-F: a local adapter beside the frozen global one, and the bank
                ref = actor.fit_dual.remote(
                    c, self.data.client_train[c], global_ref, steps=kw["steps"],
                    batch_size=kw["batch_size"], lr=kw["lr"], weight_decay=kw["weight_decay"],
                    seed=kw["seed"], objective=kw["objective"], lm_weight=kw["lm_weight"],
                    train_weight=self.method.options["train_weight"], bank_size=self.method.bank_size,
                )
            else:
                kw.update(optimizer_state=None, chaos=None, prox_mu=0.0, fisher="trajectory",
                          fisher_normalize=False)
                ref = actor.fit.remote(c, self.data.client_train[c], global_ref, **kw)
            refs[ref] = c
        reasons: dict[int, str] = {}
        # (centralized's fit actor is the top tier's, not the client's own: nothing to restart by client)
        outs = self._gather(refs, "personalisation: ", reasons, kill_stalled=not self.method.pooled)
        for c, out in sorted(outs.items()):
            self.client_states[c] = out["state"]
            if dual:
                self.client_banks[c] = out["bank"]
        ev = self.evaluate(personal=True)
        record = {
            "personalize_steps": fed.personalize_steps,
            "personalized_clients": sorted(outs),
            "failures": [{"client_id": str(c), "reason": r} for c, r in sorted(reasons.items())],
            "wall_time_s": round(time.perf_counter() - t0, 2),
        }
        self.summary.update(
            accuracy_personalized=ev["avg_accuracy"],
            accuracy_personalized_ci95=ev["avg_accuracy_ci95"],
            accuracy_personalized_per_client=ev["accuracy"],
            accuracy_personalized_per_client_ci95=ev["accuracy_ci95"],
            **self._gains(ev, "personalized"),
            # each client's personalised adapters on the global test, averaged over clients
            global_test_accuracy_personalized=ev["global_test_accuracy"],
            global_test_accuracy_personalized_ci95=ev["global_test_accuracy_ci95"],
            personalization=record,
        )
        if dual:
            self.summary["feddpa"] = {
                "weighting": "dynamic: per question, the mean of the top-k cosine similarities of "
                "its frozen summary to the client's bank, clipped to [0, 1]; constant during local "
                "training",
                "representation": REPRESENTATION,
                **{k: self.method.options[k] for k in ("train_weight", "top_k", "bank_size")},
                "bank_rows_per_client": {
                    str(c): int(b.shape[0]) for c, b in sorted(self.client_banks.items())
                },
                # the local adapter's mean weight on the client's held-out data, on the global test
                "mean_weight_per_client": ev.get("dual_weight_mean", {}),
                "global_test_mean_weight_per_client": ev.get("global_test_dual_weight_mean", {}),
            }
        if ev.get("eval_failures"):
            record["eval_failures"] = ev["eval_failures"]
        self._checkpoint(self.next_round - 1)  # the last round's checkpoint now holds clients/ (and results.json)
        return record

    def finish(self, wall_time_s: float) -> dict[str, Any]:
        evals = [r for r in self.rounds if "avg_accuracy" in r]
        last = evals[-1] if evals else self.evaluate()
        acct = self.accounting
        self.summary.update(
            strategy=self.cfg.federation.strategy,
            rounds=len(self.rounds),
            accuracy_after=last["avg_accuracy"],
            accuracy_after_per_client=last["accuracy"],
            global_test_accuracy=last["global_test_accuracy"],
            # .get: rounds recorded before intervals existed (a resumed older run) have none.
            accuracy_after_ci95=last.get("avg_accuracy_ci95"),
            global_test_accuracy_ci95=last.get("global_test_accuracy_ci95"),
            accuracy_after_per_client_ci95=last.get("accuracy_ci95", {}),
            accuracy_n_per_client={**self.summary.get("accuracy_n_per_client", {}), **last.get("accuracy_n", {})},
            global_test_n=last.get("global_test_n") or self.summary.get("global_test_n"),
            global_test_by_category=last.get("global_test_by_category", {}),
            **self._gains(last, "after"),
            bytes_up=sum(r["bytes_up"] for r in self.rounds),
            bytes_down=sum(r["bytes_down"] for r in self.rounds),
            failures=sum(len(r["failures"]) for r in self.rounds),
            client_storage_fraction=acct["client_storage_fraction"],
            client_bytes=acct["client_bytes"],
            total_bytes=acct["total_bytes"],
            step_bytes_up=acct["step_bytes_up"],
            step_bytes_down=acct["step_bytes_down"],
            adapter_kind=acct["adapter_kind"],  # nano_adapter, or llm_lora (fedavg-lora: full-model clients)
            rank_rule=getattr(self.strategy, "rank_rule", None),
            wall_time_s=round(wall_time_s, 1),
        )
        self.summary.update(self.trust.summary(self.rounds))  # dp_epsilon (final), rejected_updates
        return self.write_results()

    def _trainer_incarnation(self) -> str | None:
        """Which start of the LLM trainer actor serves now (None if it does not answer in time, or
        if the run has none)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        if self.trainer is None:
            return None
        try:
            return ray.get(self.trainer.incarnation.remote(), timeout=self.cfg.federation.deadline_s)
        except (RayActorError, RayTaskError, GetTimeoutError):
            return None

    def trainer_stats(self) -> dict[str, float]:
        """The LLM trainer's batching counters (empty when the run has no trainer: fedavg-lora)."""
        import ray

        return {} if self.trainer is None else ray.get(self.trainer.get_stats.remote())
