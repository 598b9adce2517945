"""The federated run without Ray: rounds, evaluation, personalisation, checkpoints and the summary.

:class:`Federation` owns the run's state (global adapters, each client's own adapters, banks and
optimiser moments, the round records) and reaches the clients only through a
:class:`~.transport.Transport`. The coordinator actor places the actors and hands their handles in;
tests hand in plain :class:`~fednano_ray.actors.client.ClientActor` objects and the in-process
transport.

A round is one body: sample → fit through an uplink → close. The uplink is plain (each client
returns its update, which is screened and aggregated here) or SecAgg (the clients mask their own
terms of the strategy's sum and only the sum is unmasked); both report an :class:`UplinkResult`,
and the quorum, bytes, loss and the round record are made once, in :meth:`Federation.run_round`.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fednano_ray.federation import rundir
from fednano_ray.federation.transport import CallFailed, Transport

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fednano_ray.config import Config, TierConfig
    from fednano_ray.federation.method import Method
    from fednano_ray.strategies.base import Strategy
    from fednano_ray.task import FederatedData

__all__ = [
    "Federation",
    "Placement",
    "UplinkResult",
    "adapters_fingerprint",
    "redact_clients",
    "round_seed",
]

State = dict[str, "torch.Tensor"]


def adapters_fingerprint(state: State) -> str:
    """A short sha256 of an adapter state (keys, shapes and float32 values), to tell states
    apart."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to(torch.float32).contiguous()
        h.update(f"{key}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def round_seed(*parts: int) -> int:
    """A seed for (run seed, round[, client]): sampling and each client's local batches."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _nbytes(state: State | None) -> int:
    return sum(t.numel() * t.element_size() for t in state.values()) if state else 0


def malformed_fit_result(out: Any, *, secure: bool) -> str | None:
    """Why ``out`` is not a client's fit result, or None: a hostile or broken client's reply must
    fail that client, not the run (the round reads these fields)."""
    if not isinstance(out, dict):
        return f"malformed fit result: a {type(out).__name__}, not a dict"
    need = ("masked", "metrics") if secure else ("state", "fisher", "metrics")
    missing = [k for k in need if k not in out]
    if missing:
        return f"malformed fit result: missing {missing}"
    metrics = out["metrics"]
    loss = metrics.get("loss") if isinstance(metrics, dict) else None
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
        return f"malformed fit result: metrics.loss is {loss!r}, not a finite number"
    if secure and not isinstance(out["masked"], np.ndarray):
        return f"malformed SecAgg upload: a {type(out['masked']).__name__}, not a numpy array"
    if not secure and not isinstance(out["state"], dict):
        return f"malformed fit result: state is a {type(out['state']).__name__}, not a dict"
    return None


def redact_clients(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` naming no client: DP's secret sampling publishes counts, not who took part.

    Sampled, reporting and failed clients become counts (each failure keeps its reason, with
    ``client_id`` ``"redacted"``); per-client losses and nodes go.
    """
    out = dict(record)
    out.update(
        num_sampled=len(record["clients"]),
        num_completed=len(record["completed"]),
        clients=[],
        completed=[],
        failures=[{"client_id": "redacted", "reason": f["reason"]} for f in record["failures"]],
        client_loss={},
        placement={},
        clients_redacted="trust.dp.secret_sampling: the round's clients are not published",
    )
    return out


@dataclass
class Placement:
    """Which actor serves which client (the coordinator's placement, or plain objects in tests).

    Attributes:
        actor_for: the actor that trains and scores client ``c`` (its tier's, shared in simulation).
        client_tier: each client's tier.
        top_tier: the tier of the largest rank (the global state's; centralized's pooled client's).
        top_actor: an actor of ``top_tier`` (scores the global test, trains the pooled client).
    """

    actor_for: Callable[[int], Any]
    client_tier: list[TierConfig]
    top_tier: TierConfig
    top_actor: Any


@dataclass
class UplinkResult:
    """What an uplink brings back from a round.

    Attributes:
        outs: per client that reported (and was not rejected), its fit result.
        failures: per client that did not, the reason (``rejected: ...`` for screened updates).
        merged: the aggregate the server steps towards, or None when nothing is aggregated.
        note: why the global adapters are unchanged (quorum, a failed protocol), or None.
        bytes_down, bytes_up: what went to and came from the clients.
        extras: what the round record gets besides (secure_aggregation, DP figures).
    """

    outs: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    merged: State | None = None
    note: str | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


class Federation:
    """One federated run's logic and state.

    Args:
        cfg: the validated config; ``method`` (with its trust rules) and ``strategy`` resolved from
            it.
        data: the partitioned data (clients' shards and held-out splits, the global test).
        placement: the actors.
        transport: how calls reach them.
        run_dir: the run directory (:mod:`.rundir`).
        initial_state: the adapters every client starts from (at the top tier's rank).
        accounting: the run's storage and traffic accounting (for results.json).
        runtime: what results.json says about where and how the run ran.
        coordinator_node: the node the coordinator runs on (results.json), or None.
        trainer_incarnation: which start of the LLM trainer serves now (None without one).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        method: Method,
        strategy: Strategy,
        data: FederatedData,
        placement: Placement,
        transport: Transport,
        run_dir: str | Path,
        initial_state: State,
        accounting: dict[str, Any],
        runtime: dict[str, Any] | None = None,
        coordinator_node: str | None = None,
        trainer_incarnation: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.cfg, self.method, self.strategy = cfg, method, strategy
        self.data, self.placement, self.transport = data, placement, transport
        self.run_dir = Path(run_dir)
        self.accounting, self.runtime = accounting, runtime if runtime is not None else {}
        self.coordinator_node = coordinator_node
        self.trainer_incarnation = trainer_incarnation
        self.global_state: State = initial_state
        self.initial_state: State = {k: v.clone() for k, v in initial_state.items()}
        self.client_states: dict[int, State] = {}
        # FedDPA-F: each client's bank of training-prompt summaries; with a bank, client_states[c]
        # is its local adapter, used beside the global one (fednano_ray/models/dual.py).
        self.client_banks: dict[int, torch.Tensor] = {}
        self.optimizer_states: dict[
            int, dict[str, Any]
        ] = {}  # per client, train.optimizer_state=keep
        self.rounds: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.next_round = 0
        self.progress = {"round": -1, "done": 0, "total": 0}

    # -- what a client call needs ------------------------------------------------------------------

    def _fit_kwargs(self, rnd: int, c: int, *, steps: int, batch_size: int) -> dict[str, Any]:
        t, fed = self.cfg.train, self.cfg.federation
        return {
            "steps": steps,
            "batch_size": batch_size,
            "lr": t.lr,
            "weight_decay": t.weight_decay,
            "prox_mu": self.strategy.proximal_mu,
            "seed": round_seed(fed.seed, rnd, c),
            "objective": t.objective,
            "lm_weight": t.lm_weight,
            "optimizer_state": self.optimizer_states.get(c),
            **self._fisher_kwargs(),
        }

    def _fisher_kwargs(self) -> dict[str, Any]:
        """The Fisher clients upload: train.fisher's estimator under Fisher merging; otherwise the
        free trajectory one, which no rule reads."""
        t = self.cfg.train
        if self.method.fisher_upload:
            return {
                "fisher": t.fisher,
                "fisher_examples": t.fisher_examples,
                "fisher_normalize": t.fisher_normalize,
            }
        return {
            "fisher": "trajectory",
            "fisher_examples": t.fisher_examples,
            "fisher_normalize": False,
        }

    def fisher_record(self) -> dict[str, Any]:
        """The Fisher estimator, for results.json (Fisher-merging methods only)."""
        if not self.method.fisher_upload:
            return {}
        kw = self._fisher_kwargs()
        return {
            "fisher_estimator": kw["fisher"],
            "fisher_examples": kw["fisher_examples"] if kw["fisher"] == "endpoint" else None,
            "fisher_normalization": "per-tensor mean" if kw["fisher_normalize"] else "none",
        }

    def _keep_optimizer_states(self, outs: dict[int, Any]) -> None:
        """Hold each reporting client's AdamW state for its next round (train.optimizer_state=keep).

        Kept on the clients' behalf, as a simulation must (a pool actor serves many virtual clients,
        and actors restart); checkpointed with the round, so --resume continues exactly. A deployed
        client would keep its own; none of it is aggregated or counted as communication."""
        if self.cfg.train.optimizer_state == "keep":
            for c, out in outs.items():
                if out.get("optimizer_state") is not None:
                    self.optimizer_states[c] = out["optimizer_state"]

    def _fit_target(self, c: int) -> tuple[TierConfig, Any]:
        """The tier and actor that train ``c``: its own, except the pooled client (centralized),
        which trains at the largest tier rank on the top tier's actor, the rank it is scored at."""
        if self.method.pooled:
            return self.placement.top_tier, self.placement.top_actor
        return self.placement.client_tier[c], self.placement.actor_for(c)

    def _start_state(self, c: int) -> State:
        if self.method.personal_only:
            return self.client_states.get(c, self.initial_state)
        return self.global_state

    def _rank(self, c: int) -> int:
        return self.cfg.tier_rank(self.placement.client_tier[c])

    # -- gathering ---------------------------------------------------------------------------------

    def _gather(
        self,
        calls: dict[Any, int],
        what: str,
        failures: dict[int, str],
        *,
        restart_stalled: bool = False,
        count: bool = False,
    ) -> dict[int, Any]:
        """Results of ``calls`` (pending call -> client) that finish within the deadline; the others
        become ``failures[client] = reason``. ``restart_stalled`` restarts the actors still busy at
        the deadline, so their queues clear."""
        deadline = time.monotonic() + self.cfg.federation.deadline_s
        results: dict[int, Any] = {}
        pending = list(calls)
        while pending:
            done, pending = self.transport.wait(pending, max(0.0, deadline - time.monotonic()))
            if not done:
                break
            for call in done:
                c = calls[call]
                try:
                    results[c] = self.transport.get(call, 30)
                except CallFailed as e:
                    failures[c] = f"{what}{e.reason}"
                if count:
                    self.progress["done"] += 1
        for call in pending:
            failures[calls[call]] = (
                f"{what}deadline of {self.cfg.federation.deadline_s:g} s exceeded"
            )
        if restart_stalled:
            stuck = {id(a): a for a in (self._fit_target(calls[p])[1] for p in pending)}
            for actor in stuck.values():
                self.transport.restart(actor)
        return results

    # -- a round -----------------------------------------------------------------------------------

    def sample(self, rnd: int) -> list[int]:
        """The round's clients: seeded by (federation.seed, round), or under DP with secret
        sampling drawn from OS entropy (nobody can tell from the config who took part); the pooled
        client alone."""
        fed = self.cfg.federation
        if self.method.pooled:
            return [0]
        if self.method.secret_sampling:
            drawn = secrets.SystemRandom().sample(range(fed.num_clients), fed.clients_per_round)
            return sorted(drawn)
        rng = np.random.default_rng(round_seed(fed.seed, rnd))
        return sorted(rng.choice(fed.num_clients, fed.clients_per_round, replace=False).tolist())

    def quorum_note(self, reported: int, sampled: int) -> str | None:
        need = math.ceil(self.cfg.federation.quorum * sampled)
        if reported >= need:
            return None
        return (
            f"quorum not met: {reported} of {sampled} reported, {need} needed; "
            "global adapters unchanged"
        )

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Sample, fit through the uplink, aggregate, evaluate (when due), checkpoint. Returns the
        record."""
        t0 = time.perf_counter()
        trainer_start = self.trainer_incarnation()
        sampled = self.sample(rnd)
        self.progress = {"round": rnd, "done": 0, "total": len(sampled)}
        self.strategy.begin_round(rnd)
        self.strategy.warnings = []
        uplink = self._secure_uplink if self.method.uplink == "secagg" else self._plain_uplink
        up = uplink(rnd, sampled)
        self._keep_optimizer_states(up.outs)
        losses = {str(c): out["metrics"]["loss"] for c, out in sorted(up.outs.items())}
        record: dict[str, Any] = {
            "round": rnd,
            "clients": sampled,
            "completed": sorted(up.outs),
            "failures": [
                {"client_id": str(c), "reason": r} for c, r in sorted(up.failures.items())
            ],
            "loss": float(np.mean(list(losses.values()))) if losses else None,
            "client_loss": losses,
            "placement": {str(c): out.get("node_id") for c, out in up.outs.items()},
            "bytes_down": up.bytes_down,
            "bytes_up": up.bytes_up,
            "aggregated": up.note is None,
            **up.extras,
        }
        if up.note is None and up.merged is not None:
            import torch

            from fednano_ray.strategies.aggregate import server_step

            stepped = server_step(self.global_state, up.merged, self.cfg.federation.server_lr)
            bad = [k for k, v in stepped.items() if not bool(torch.isfinite(v).all())]
            if bad:  # never let a non-finite state become the global one (or a checkpoint)
                up.note = (
                    f"the aggregate is not finite ({len(bad)} tensors, e.g. {bad[0]!r}); round "
                    "rejected, global adapters unchanged"
                )
                record["aggregated"] = False
            else:
                self.global_state = stepped
        if up.note is not None:
            record["note"] = up.note
        if self.strategy.warnings:
            record["warnings"] = list(self.strategy.warnings)
        last = rnd == self.cfg.federation.rounds - 1
        if last or (rnd + 1) % self.cfg.federation.evaluate_every == 0:
            record.update(self.evaluate())
        # Ray restarted the LLM trainer during the round (clients' in-flight split steps were
        # re-sent).
        record["trainer_restarted"] = self.trainer_incarnation() != trainer_start
        record["wall_time_s"] = round(time.perf_counter() - t0, 2)
        if self.method.secret_sampling:
            record = redact_clients(record)
        rundir.RoundRecord.model_validate(
            record
        )  # a malformed record fails here, not in a later report
        self.rounds.append(record)
        self.next_round = rnd + 1
        self.checkpoint(rnd)
        return record

    def _plain_uplink(self, rnd: int, sampled: list[int]) -> UplinkResult:
        """Each client returns its state (and Fisher); invalid ones are rejected; the rest
        aggregated."""
        from fednano_ray.strategies.aggregate import truncate_to_rank
        from fednano_ray.strategies.base import ClientFailure, ClientUpdate
        from fednano_ray.trust.validate import REJECTED

        fed = self.cfg.federation
        global_ref = self.transport.put(self.global_state)
        up = UplinkResult()
        calls: dict[Any, int] = {}
        shard_size: dict[int, int] = {}
        for c in sampled:
            tier, actor = self._fit_target(c)
            start = (
                global_ref
                if not self.method.personal_only
                else self.transport.put(self._start_state(c))
            )
            idx, steps = self.data.client_train[c], tier.local_steps
            if (
                self.method.pooled
            ):  # one "client" holding every client's training data (upper bound)
                idx = sorted(i for shard in self.data.client_train for i in shard)
                steps = tier.local_steps * fed.clients_per_round
            up.bytes_down += _nbytes(
                truncate_to_rank(self._start_state(c), self.cfg.tier_rank(tier))
            )
            kw = self._fit_kwargs(rnd, c, steps=steps, batch_size=tier.batch_size)
            shard_size[c] = len(idx)
            calls[self.transport.submit(actor, "fit", c, idx, start, **kw)] = c
        outs = self._gather(calls, "", up.failures, restart_stalled=True, count=True)
        # A result that is not a fit's result fails its client, never the round.
        for c in list(outs):
            reason = malformed_fit_result(outs[c], secure=False)
            if reason is not None:
                up.failures[c] = REJECTED + reason
                del outs[c]
        # In client order, not arrival order: float sums then add up the same way in every run.
        # The weight is the coordinator's own shard size: a client's claim is never read.
        updates = [
            ClientUpdate(str(c), o["state"], shard_size[c], o["fisher"], o["metrics"])
            for c, o in sorted(outs.items())
        ]
        # Invalid updates (bad keys/shapes/dtypes, NaN/Inf, norm above trust.max_update_norm) become
        # failures "rejected: <reason>": never aggregated, not counted towards the quorum.
        updates, rejected = self.method.screen(
            updates, lambda u: self._start_state(int(u.client_id))
        )
        up.failures.update({int(f.client_id): f.reason for f in rejected})
        kept = {int(u.client_id) for u in updates}
        up.outs = {c: o for c, o in outs.items() if c in kept}
        up.bytes_up = sum(
            _nbytes(u.state) + (_nbytes(u.fisher) if self.method.fisher_upload else 0)
            for u in updates
        )
        up.note = self.quorum_note(len(updates), len(sampled))
        if up.note is not None:
            return up
        if self.method.personal_only:
            for u in updates:
                self.client_states[int(u.client_id)] = u.state
            return up
        failures = [ClientFailure(str(c), r) for c, r in up.failures.items()]
        # Updates arrive at each client's own rank: the strategy pads (HetLoRA).
        up.merged, up.extras = self.method.aggregate(
            self.strategy, rnd, self.global_state, updates, failures, self.rounds
        )
        return up

    def _secure_uplink(self, rnd: int, sampled: list[int]) -> UplinkResult:
        """``trust.secure_aggregation``: the clients run SecAgg's client side.

        AdvertiseKeys and ShareKeys go through here (public keys and AES-GCM-encrypted Shamir
        shares this side cannot read); each client trains, builds its own term of the strategy's
        sum plan, quantises and masks it, and uploads only the masked ``uint64`` vector; the
        surviving clients are asked for the shares that remove the masks (recovering clients that
        dropped after sharing keys) and the sum becomes the new global state through the plan's
        ``finish``. No client's state, Fisher or example count is ever seen here.
        """
        from fednano_ray.strategies.aggregate import truncate_to_rank
        from fednano_ray.trust.secagg import (
            DEFAULT_FRAC_BITS,
            SecAggError,
            SecAggServer,
            default_threshold,
        )
        from fednano_ray.trust.secagg_plan import protocol_info, sum_template
        from fednano_ray.trust.validate import REJECTED

        frac_bits = DEFAULT_FRAC_BITS
        session = b"fednano round %d" % rnd
        index = {c: i + 1 for i, c in enumerate(sampled)}
        client_of = {i: c for c, i in index.items()}
        threshold = default_threshold(len(sampled))
        server = SecAggServer(threshold, session)
        template = sum_template(self.strategy, self.global_state, len(sampled))
        actor = self.placement.actor_for
        up = UplinkResult()
        silent: list[int] = []
        dropped: set[int] = set()
        unmask_failures: dict[int, str] = {}
        global_ref = self.transport.put(self.global_state)

        def reject(bad: dict[int, str]) -> None:  # malformed protocol messages fail their senders
            up.failures.update({client_of[u]: REJECTED + reason for u, reason in bad.items()})

        try:
            advertised = self._gather(
                {
                    self.transport.submit(
                        actor(c), "secagg_advertise", rnd, c, index[c], session
                    ): c
                    for c in sampled
                },
                "secagg advertise keys: ",
                up.failures,
            )
            keys, bad = server.screen_keys({index[c]: keys for c, keys in advertised.items()})
            reject(bad)
            public = server.collect_keys(keys)
            sent = self._gather(
                {
                    self.transport.submit(
                        actor(c), "secagg_share_keys", rnd, c, public, threshold
                    ): c
                    for c in sorted(client_of[u] for u in public)
                },
                "secagg share keys: ",
                up.failures,
            )
            shares, bad = server.screen_shares(
                {index[c]: shares for c, shares in sent.items()}, public
            )
            reject(bad)
            sent = {client_of[u]: v for u, v in shares.items()}
            inbox = server.route_shares(shares)
            calls: dict[Any, int] = {}
            for c in sorted(sent):
                tier = self.placement.client_tier[c]
                up.bytes_down += _nbytes(
                    truncate_to_rank(self.global_state, self.cfg.tier_rank(tier))
                )
                secagg = {
                    "round": rnd,
                    "shares": inbox[index[c]],
                    "strategy": self.strategy,
                    "rank": template.rank,
                    "keys": template.keys,
                    "num_clients": len(public),
                    "frac_bits": frac_bits,
                }
                kw = self._fit_kwargs(rnd, c, steps=tier.local_steps, batch_size=tier.batch_size)
                calls[
                    self.transport.submit(
                        actor(c),
                        "fit",
                        c,
                        self.data.client_train[c],
                        global_ref,
                        secagg=secagg,
                        **kw,
                    )
                ] = c
            up.outs = self._gather(calls, "", up.failures, restart_stalled=True, count=True)
            for c in list(up.outs):
                reason = malformed_fit_result(up.outs[c], secure=True)
                if reason is not None:
                    up.failures[c] = REJECTED + reason
                    del up.outs[c]
            masked, bad = server.screen_masked(
                {index[c]: out["masked"] for c, out in up.outs.items()}, template.length
            )
            reject(bad)
            up.outs = {c: o for c, o in up.outs.items() if index[c] in masked}
            up.bytes_up = sum(int(out["masked"].nbytes) for out in up.outs.values())
            note = self.quorum_note(len(up.outs), len(sampled))
            if note is not None:
                raise SecAggError(note)
            survivors, dropped_idx = server.collect_masked(masked)
            dropped = {client_of[u] for u in dropped_idx}
            responses = self._gather(
                {
                    self.transport.submit(
                        actor(client_of[u]),
                        "secagg_unmask",
                        rnd,
                        client_of[u],
                        sorted(survivors),
                        sorted(dropped_idx),
                    ): client_of[u]
                    for u in sorted(survivors)
                },
                "secagg unmask: ",
                unmask_failures,
            )
            answers, bad = server.screen_responses(
                {index[c]: r for c, r in responses.items()}, survivors, dropped_idx
            )
            unmask_failures.update({client_of[u]: REJECTED + r for u, r in bad.items()})
            silent = sorted(unmask_failures)
            total = server.unmask(answers)
            up.merged = template.finish_ring(total, frac_bits)
        except (SecAggError, ValueError) as e:  # never the run: the round keeps the adapters
            up.note = (
                str(e)
                if str(e).startswith("quorum")
                else f"secure aggregation failed: {e}; global adapters unchanged"
            )
            up.merged = None
        up.extras["secure_aggregation"] = {
            "masked_by": "clients",
            **protocol_info(
                clients=len(sampled),
                threshold=threshold,
                summed=[str(c) for c in up.outs] if up.note is None else [],
                dropped_before_upload=[str(c) for c in sorted(dropped)],
                dropped_before_unmask=[str(c) for c in silent],
                vector_length=template.length,
                frac_bits=frac_bits,
                num_masked=len(up.outs),
            ),
            # why each client of dropped_before_unmask did not answer (its input still counts)
            "unmask_failures": {str(c): r for c, r in sorted(unmask_failures.items())},
        }
        if up.note is None:
            up.extras.update(self.method.dp_extras(len(sampled), self.rounds))
        return up

    # -- evaluation --------------------------------------------------------------------------------

    def _eval_model(self, c: int) -> tuple[State, dict[str, Any] | None]:
        """What client ``c`` is evaluated with: ``(adapters, None)``, or under FedDPA-F, once it has
        its local adapter and bank, ``(global adapters, dual)`` for ``ClientActor.evaluate``."""
        if c in self.client_banks:
            dual = {
                "local": self.client_states[c],
                "bank": self.client_banks[c],
                "top_k": self.method.options["top_k"],
            }
            return self.global_state, dual
        return self.client_model(c), None

    def client_model(self, c: int) -> State:
        """The adapters client ``c`` is evaluated (and served) with: its own, where it has them
        (``local``, or after personalisation), else the global ones (``local``: the initial
        ones)."""
        if c in self.client_states:
            return self.client_states[c]
        return self.initial_state if self.method.personal_only else self.global_state

    def _get_eval(
        self, submit, what: str, failures: list[dict[str, str]], deadline: float, call=None
    ):
        """Result of an evaluation call (``call``, already submitted, or ``submit()``), retried
        through an actor restart until ``deadline`` (time.monotonic); None (and a recorded failure)
        if it cannot run."""
        reason = f"evaluation deadline of {self.cfg.federation.deadline_s:g} s exceeded"
        for attempt in range(3):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return self.transport.get(call if call is not None else submit(), left)
            except CallFailed as e:
                if e.timeout:
                    # e.g. an actor whose node is gone: its restart waits for resources that left
                    # with it
                    break
                reason = e.reason[:200]
                call = None
                time.sleep(min(1.0 + attempt, max(0.0, deadline - time.monotonic())))
        failures.append({"what": what, "reason": reason})
        return None

    def evaluate(self, initial: bool = False, personal: bool = False) -> dict[str, Any]:
        """Per-client accuracy on each client's held-out split, and global test accuracy.

        ``personal``: every client's own adapters score the global test too (then averaged), as
        under ``local``: what personalisation costs in generality."""
        from fednano_ray.stats import client_accuracy_stats, global_test_stats
        from fednano_ray.strategies.aggregate import truncate_to_rank

        cfg = self.cfg
        bs = cfg.train.eval_batch_size
        n = cfg.federation.num_clients
        failures: list[dict[str, str]] = []
        # One deadline for the whole phase, as for the fit: k unreachable clients cost one deadline.
        deadline = time.monotonic() + cfg.federation.deadline_s

        def scorer(
            actor: Any, state: State, split: str, idx: list[int], dual: dict[str, Any] | None
        ):
            """Submits (and, through an actor restart, re-submits) one evaluation call."""
            return lambda: self.transport.submit(
                actor, "evaluate", state, split, idx, bs, dual=dual
            )

        submits = {}
        for c in range(n):  # submit everything first: the actors evaluate in parallel
            state, dual = (self.initial_state, None) if initial else self._eval_model(c)
            fn = scorer(
                self.placement.actor_for(c),
                truncate_to_rank(state, self._rank(c)),
                "train",
                self.data.client_test[c],
                dual,
            )
            submits[c] = (fn, fn())
        # The global test split is scored with the pretrained adapters (initial), the global
        # adapters, or, for methods without a global model, every client's own adapters (then
        # averaged), each by an actor of that client's own tier: a rank-r client's state does not
        # fit a larger rank. A state that cannot be scored is an eval failure;
        # global_test_states_scored counts the rest.
        states: list[tuple[int | None, State, dict[str, Any] | None, Any]]
        if initial:
            states = [(None, self.initial_state, None, self.placement.top_actor)]
        elif self.method.personal_only or personal:
            states = [(c, *self._eval_model(c), self.placement.actor_for(c)) for c in range(n)]
        else:
            states = [(None, self.global_state, None, self.placement.top_actor)]
        everything = list(range(len(self.data.test)))
        test_subs = []
        for who, s, dual, actor in states:  # submit all, then collect: the actors score in parallel
            fn = scorer(actor, s, "test", everything, dual)
            what = "global test" if who is None else f"global test, client {who}'s adapters"
            test_subs.append((fn, fn(), what, who))
        per_client = {}
        for c, (fn, call) in submits.items():
            res = self._get_eval(fn, f"client {c}", failures, deadline, call=call)
            if res is not None and res["n"] > 0:
                per_client[str(c)] = res
        scored = [
            (c, self._get_eval(fn, what, failures, deadline, call=call))
            for fn, call, what, c in test_subs
        ]
        tests = [t for _, t in scored if t is not None]
        # Per-client accuracy with its test size n and 95% Wilson interval; avg_accuracy is weighted
        # by test size (pooled correct / pooled n), with the pooled interval (fednano_ray/stats.py).
        out: dict[str, Any] = {
            **client_accuracy_stats(per_client),
            **global_test_stats(tests),
            "global_test_by_category": {
                k.split("/", 1)[1]: v for k, v in tests[0].items() if k.startswith("accuracy/")
            }
            if len(tests) == 1
            else {},
            # Per question "1"/"0", for paired before/after comparisons (stats.paired_difference).
            "correct": {c: r.get("correct", "") for c, r in per_client.items()},
            "global_test_correct": [t.get("correct", "") for t in tests],
            # Which adapters the global test scored (an audit trail: compare with a checkpoint's).
            "global_test_adapters": adapters_fingerprint(states[0][1])
            if len(states) == 1
            else None,
        }
        out["global_test_states_scored"] = len(
            tests
        )  # of len(states): 1, or num_clients under `local`
        if any("dual_weight_mean" in r for r in per_client.values()):  # FedDPA-F's dual adapters
            out["dual_weight_mean"] = {
                c: r["dual_weight_mean"] for c, r in per_client.items() if "dual_weight_mean" in r
            }
            out["global_test_dual_weight_mean"] = {
                str(c): t["dual_weight_mean"]
                for c, t in scored
                if t is not None and "dual_weight_mean" in t
            }
        if failures:
            out["eval_failures"] = failures
        return out

    # -- checkpoints and results -------------------------------------------------------------------

    def checkpoint(self, rnd: int) -> None:
        """Write round ``rnd``'s checkpoint (what --resume needs to continue exactly) and
        results.json."""
        rundir.write_checkpoint(
            self.run_dir,
            rundir.Checkpoint(
                round=rnd,
                global_state=self.global_state,
                client_states=self.client_states,
                client_banks=self.client_banks,
                optimizer_states=self.optimizer_states,
                strategy_state=self.strategy.state_dict(),
                rounds=self.rounds,
                summary=self.summary,
            ),
        )
        self.write_results()

    def restore(self) -> bool:
        """Continue from the newest complete checkpoint whose files check out against state.json's
        sha256 (:func:`.rundir.read_checkpoint`); False if there is none.

        A newer checkpoint that is corrupt (a file truncated, modified, unreadable) is passed over
        with a warning: the run continues from the round after the one restored, and rewrites the
        rounds it passed over.

        Raises:
            ValueError: every complete checkpoint is corrupt, naming each one's bad file.
        """
        import logging

        log = logging.getLogger(__name__)
        folder, ckpt, skipped = rundir.newest_loadable_checkpoint(
            self.run_dir, rundir.read_checkpoint
        )
        for e in skipped:
            log.warning("--resume: %s; trying the checkpoint before it", e)
        if folder is None or ckpt is None:
            if skipped:
                raise ValueError(
                    f"--resume: no checkpoint of {self.run_dir} checks out: "
                    + "; ".join(str(e) for e in skipped)
                )
            return False
        if skipped:
            log.warning(
                "--resume: continuing from %s (the newest checkpoint that checks out) at "
                "round %d; rounds %s are run again",
                folder.name,
                ckpt.round + 1,
                ", ".join(e.checkpoint for e in reversed(skipped)),
            )
        self.global_state, self.client_states = ckpt.global_state, ckpt.client_states
        self.client_banks, self.optimizer_states = ckpt.client_banks, ckpt.optimizer_states
        if ckpt.strategy_state:  # e.g. fedavgm's server momentum
            self.strategy.load_state_dict(ckpt.strategy_state)
        self.rounds, self.summary, self.next_round = ckpt.rounds, ckpt.summary, ckpt.round + 1
        return True

    def results(self) -> dict[str, Any]:
        return {
            "config": self.cfg.model_dump(mode="json"),
            "strategy": {
                **self.strategy.describe(),
                "adapter_factors": self.cfg.adapter.factors,
                **self.fisher_record(),
            },
            "rounds": self.rounds,
            "summary": self.summary,
            "accounting": self.accounting,
            "coordinator_node": self.coordinator_node,
            # precision, hardware (coordinator's and the LLM trainer's), reproducibility
            "runtime": self.runtime,
        }

    def write_results(self) -> dict[str, Any]:
        results = self.results()
        # What a forced --resume changed of the config (app.train records it before the run
        # starts): every rewrite of results.json keeps it.
        if not hasattr(self, "_config_overrides"):
            self._config_overrides = rundir.config_overrides(self.run_dir)
        if self._config_overrides:
            results["config_overrides"] = self._config_overrides
        rundir.write_results(self.run_dir, results)
        return results

    # -- the run -----------------------------------------------------------------------------------

    def begin(self) -> None:
        """Evaluate the pretrained model (round 0 = B zero) once, unless resumed past it."""
        if "accuracy_before" in self.summary:
            return
        ev = self.evaluate(initial=True)
        self.summary.update(
            accuracy_before=ev["avg_accuracy"],
            global_test_accuracy_before=ev["global_test_accuracy"],
            accuracy_before_per_client=ev["accuracy"],
            # 95% Wilson intervals; per-client test sizes (held-out questions) weight the average.
            accuracy_before_ci95=ev["avg_accuracy_ci95"],
            global_test_accuracy_before_ci95=ev["global_test_accuracy_ci95"],
            accuracy_before_per_client_ci95=ev["accuracy_ci95"],
            accuracy_n_per_client=ev["accuracy_n"],
            global_test_n=ev["global_test_n"],
            global_test_by_category_before=ev["global_test_by_category"],
            correct_before=ev["correct"],
            global_test_correct_before=ev["global_test_correct"][0]
            if ev["global_test_correct"]
            else "",
            global_test_n_by_category=dict(
                sorted(
                    Counter(e.category for e in self.data.test if e.category is not None).items()
                )
            ),
            # Expected accuracy of guessing uniformly among each question's choices.
            chance_accuracy=float(np.mean([1 / len(e.choices) for e in self.data.test])),
        )
        self.write_results()

    def _gains(self, ev: dict[str, Any], name: str) -> dict[str, Any]:
        """Paired accuracy gains of the evaluation ``ev`` over the pretrained model's, question by
        question (``accuracy_gain_<name>`` on the clients' held-out data, pooled;
        ``global_test_gain_<name>``), each ``[mean, [lo, hi], n]`` with a 95% interval, or None."""
        from fednano_ray.stats import paired_difference

        before, after = self.summary.get("correct_before") or {}, ev.get("correct") or {}
        common = sorted(c for c in after if c in before and len(before[c]) == len(after[c]))
        held = paired_difference([before[c] for c in common], [after[c] for c in common])
        g_before, g_after = (
            self.summary.get("global_test_correct_before") or "",
            ev.get("global_test_correct") or [],
        )
        g_after = [a for a in g_after if a and len(a) == len(g_before)]
        glob = paired_difference([g_before] * len(g_after), g_after)
        return {
            f"accuracy_gain_{name}": list(held) if held else None,
            f"global_test_gain_{name}": list(glob) if glob else None,
        }

    def personalize(self) -> dict[str, Any]:
        """``federation.personalize_steps``: each client fine-tunes a private copy of the global
        adapters.

        Every client (sampled or not) trains ``personalize_steps`` local steps on its own training
        shard from the final global state, with fresh AdamW moments and its tier's batch size; its
        result becomes its own adapters (``client_states``, checkpointed under ``clients/``, which
        ``fednano-ray serve`` loads). It is scored on its held-out split and, to show what it costs
        in generality, on the global test. The summary gets ``accuracy_personalized`` (per client,
        the weighted average, 95% intervals) beside the global adapters' ``accuracy_after``. A
        client whose fine-tune fails keeps the global adapters (a recorded failure). Idempotent
        under --resume: a finished personalisation is not repeated.

        Under a dual-adapter method (FedDPA-F) this is the local phase: each client's result is a
        local adapter trained beside the frozen global one (``ClientActor.fit_dual``) plus its bank
        of training summaries (``client_banks``, checkpointed beside it); the client is then scored
        with its dual adapter and a per-question weight, and the summary's ``feddpa`` record holds
        the weighting and each client's mean weight on its held-out questions and on the global
        test.
        """
        from fednano_ray.models.dual import REPRESENTATION

        fed = self.cfg.federation
        if (
            not fed.personalize_steps
            or self.method.personal_only
            or "accuracy_personalized" in self.summary
        ):
            return {}
        t0 = time.perf_counter()
        dual = self.method.dual_adapter
        global_ref = self.transport.put(self.global_state)
        calls: dict[Any, int] = {}
        for c in range(fed.num_clients):
            tier = self.placement.client_tier[c]
            kw = self._fit_kwargs(
                fed.rounds, c, steps=fed.personalize_steps, batch_size=tier.batch_size
            )
            actor = self.placement.actor_for(c)
            if dual:  # a local adapter beside the frozen global one, and the bank
                call = self.transport.submit(
                    actor,
                    "fit_dual",
                    c,
                    self.data.client_train[c],
                    global_ref,
                    steps=kw["steps"],
                    batch_size=kw["batch_size"],
                    lr=kw["lr"],
                    weight_decay=kw["weight_decay"],
                    seed=kw["seed"],
                    objective=kw["objective"],
                    lm_weight=kw["lm_weight"],
                    train_weight=self.method.options["train_weight"],
                    bank_size=self.method.bank_size,
                )
            else:
                kw.update(
                    optimizer_state=None, prox_mu=0.0, fisher="trajectory", fisher_normalize=False
                )
                call = self.transport.submit(
                    actor, "fit", c, self.data.client_train[c], global_ref, **kw
                )
            calls[call] = c
        reasons: dict[int, str] = {}
        # (the pooled client's fit actor is the top tier's, not the client's own: nothing to restart
        # by client)
        outs = self._gather(
            calls, "personalisation: ", reasons, restart_stalled=not self.method.pooled
        )
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
        self.checkpoint(
            self.next_round - 1
        )  # the last round's checkpoint now holds clients/ (and results.json)
        return record

    def finish(self, wall_time_s: float) -> dict[str, Any]:
        """The run's summary (accuracies, gains, bytes, storage) in results.json; returns the
        results."""
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
            accuracy_n_per_client={
                **self.summary.get("accuracy_n_per_client", {}),
                **last.get("accuracy_n", {}),
            },
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
            adapter_kind=acct[
                "adapter_kind"
            ],  # nano_adapter, or llm_lora (fedavg-lora: full-model clients)
            rank_rule=getattr(self.strategy, "rank_rule", None),
            wall_time_s=round(wall_time_s, 1),
        )
        self.summary.update(
            self.method.trust_summary(self.rounds)
        )  # dp_epsilon (final), rejected_updates
        return self.write_results()
