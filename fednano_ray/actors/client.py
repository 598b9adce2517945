"""ClientActor: a NanoEdge plus private data shards, running local split steps.

One actor serves one client (deployment mode) or many virtual clients of one tier in turn
(simulation mode): the edge and the frozen-feature arrays stay loaded between rounds, and each
call brings the adapters to start from, so no per-client model is ever rebuilt.

Under ``fedavg-lora`` (``llm_lora=True``) the actor holds the whole MLLM instead, with PEFT LoRA in
its own copy of the LLM, and trains and evaluates in-process: no split step reaches the shared
``LLMTrainer``, and every score it reports is that of the LoRA-adapted LLM.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from fednano_ray.models.adapter import adapter_state, load_adapter_state
from fednano_ray.models.dual import DualEdge, DynamicWeight, subsample
from fednano_ray.models.prompt import collate
from fednano_ray.training import LocalServer, evaluate, local_fit


class RemoteServer:
    """The :class:`~fednano_ray.training.Server` protocol over a Ray handle to ``LLMTrainer``."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def loss_and_grad(self, z, attention_mask, labels):
        return self._step(self.handle.loss_and_grad, z, attention_mask, labels)

    def choice_loss_and_grad(self, *args):
        return self._step(self.handle.choice_loss_and_grad, *args)

    def _step(self, method, *args):
        import ray

        # If the trainer dies with this call in flight, Ray restarts it (its __init__ reloads the
        # frozen LLM) and re-sends the call, up to TRAINER_TASK_RETRIES times; get() just waits.
        return ray.get(method.remote(*args))

    def score_packed(self, *args):
        import ray

        return ray.get(self.handle.score_packed.remote(*args))


class ClientError(RuntimeError):
    """A client could not finish its work; the coordinator records it as a failure."""


class ClientActor:
    """Holds one tier's NanoEdge (rank ``rank``) and the feature arrays of the data it may be asked
    about.

    Args:
        model_cfg: ``ModelConfig``; the LLM body is dropped right after the split (kept under
            ``llm_lora``).
        adapter_cfg: ``AdapterConfig``.
        rank: adapter rank of this tier.
        server: the ``LLMTrainer`` handle (or any object with the Server protocol); unused (None)
            under ``llm_lora``.
        data: ``{"train": (features, questions), "test": (...)}`` (from the object store).
        num_threads: torch threads for this actor.
        llm_lora: ``fedavg-lora``: keep the whole MLLM and train rank-``rank`` PEFT LoRA inside its
            LLM (``adapter_cfg.lora_target_modules``) instead of NanoAdapters.
    """

    def __init__(
        self,
        model_cfg,
        adapter_cfg,
        *,
        rank: int,
        server,
        data: dict[str, Any],
        num_threads: int = 1,
        seed: int = 0,
        llm_lora: bool = False,
    ) -> None:
        from fednano_ray.models.build import build_mllm

        torch.set_num_threads(max(1, num_threads))
        mllm = build_mllm.__wrapped__(
            model_cfg
        )  # uncached: this process's own copy, LoRA goes in in place
        self._llm = None
        if llm_lora:
            self.edge, self._llm, self.params = mllm.with_llm_lora(
                adapter_cfg,
                r=rank,
                autocast_bf16=model_cfg.runtime_precision().autocast_bf16,
                seed=seed,
            )
            self.server = LocalServer(self._llm)
        else:
            self.edge, _ = mllm.split(adapter_cfg, r=rank, seed=seed)
            self.params = dict(self.edge.adapters.named_parameters())
            mllm.parts.decoder = None  # the client keeps no LLM layers (NanoEdge only)
            self.server = (
                RemoteServer(server) if hasattr(server.loss_and_grad, "remote") else server
            )
        self._initial = adapter_state(self.params)
        self.encode_row = mllm.encode_row
        self.pad_id = mllm.pad_id
        self.rank = rank
        self.data = data
        self._train_questions: dict[int, Any] = {}
        # SecAgg (trust.secure_aggregation): this actor's protocol state per (round, client id);
        # the keys and self-mask seed never leave the actor except as encrypted Shamir shares.
        self._secagg: dict[tuple[int, int], Any] = {}
        self._dual: DualEdge | None = None  # FedDPA-F's dual edge, built on first use

    def _question(self, i: int):
        """Train example i as (choice rows, answer, category) (cached: tokenizing is cheap but not
        free)."""
        if i not in self._train_questions:
            q, choices, answer, cat = self.data["train"][1][i]
            self._train_questions[i] = ([self.encode_row(q, c) for c in choices], answer, cat)
        return self._train_questions[i]

    def fit(
        self,
        client_id: int,
        indices: list[int],
        start_state: dict[str, torch.Tensor],
        *,
        steps: int,
        batch_size: int,
        lr: float,
        weight_decay: float = 0.0,
        prox_mu: float = 0.0,
        seed: int = 0,
        secagg: dict[str, Any] | None = None,
        objective: str = "lm",
        lm_weight: float = 0.0,
        optimizer_state: dict | None = None,
        fisher: str = "trajectory",
        fisher_examples: int = 16,
        fisher_normalize: bool = False,
    ) -> dict[str, Any]:
        """Local training of one client from ``start_state``; returns its update as plain data.

        ``optimizer_state`` is this client's AdamW state from its previous round (None: fresh); the
        result's ``optimizer_state`` is the one to pass next time. ``fisher``, ``fisher_examples``
        and ``fisher_normalize`` choose the uploaded Fisher
        (:func:`~fednano_ray.training.local_fit`). It is the client's own state, kept for it by the
        coordinator in simulation (a deployed client keeps it on its device): never aggregated,
        never counted as communication.

        With ``secagg`` (secure aggregation; after :meth:`secagg_advertise` and
        :meth:`secagg_share_keys` for this round and client) it returns no state, Fisher or
        example count: only ``masked``, the ``uint64`` SecAgg input ``y_u`` of its own sum-plan
        term (quantised and masked here). ``secagg`` holds ``round``, ``shares`` (the routed
        ciphertexts for this client), ``strategy``, ``rank``, ``keys``, ``num_clients`` and
        ``frac_bits`` (see :func:`~fednano_ray.trust.secagg_plan.client_masked_input`).
        """
        if secagg is not None:
            session = self._secagg_session(secagg["round"], client_id)  # fail before training
        if not indices:
            raise ClientError(f"client {client_id} has no training examples")
        t0 = time.perf_counter()
        load_adapter_state(self.params, start_state)
        feats = self.data["train"][0][indices]
        questions = [self._question(i) for i in indices]
        if self._llm is not None:
            # for PEFT's LoRA dropout (the decoders here have no active dropout of their own)
            self._llm.train()
        try:
            state, fisher, metrics, opt_state = local_fit(
                self.edge,
                self.server,
                feats,
                questions,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                pad_id=self.pad_id,
                weight_decay=weight_decay,
                prox_mu=prox_mu,
                seed=seed,
                params=self.params,
                objective=objective,
                lm_weight=lm_weight,
                optimizer_state=optimizer_state,
                fisher=fisher,
                fisher_examples=fisher_examples,
                fisher_normalize=fisher_normalize,
            )
        finally:
            if self._llm is not None:
                self._llm.eval()
        metrics["fit_s"] = time.perf_counter() - t0
        if secagg is not None:
            from fednano_ray.strategies.base import ClientUpdate
            from fednano_ray.trust.secagg_plan import client_masked_input

            update = ClientUpdate(str(client_id), state, len(indices), fisher, metrics)
            masked = client_masked_input(
                session,
                secagg["strategy"],
                start_state,
                update,
                shares=secagg["shares"],
                rank=secagg["rank"],
                keys=secagg["keys"],
                num_clients=secagg["num_clients"],
                frac_bits=secagg["frac_bits"],
            )
            return {
                "client_id": client_id,
                "masked": masked,
                "metrics": metrics,
                "rank": self.rank,
                "node_id": self.node_id(),
                "optimizer_state": opt_state,
            }
        return {
            "client_id": client_id,
            "state": state,
            "fisher": fisher,
            "num_examples": len(indices),
            "metrics": metrics,
            "rank": self.rank,
            "node_id": self.node_id(),
            "optimizer_state": opt_state,
        }

    # -- secure aggregation (SecAgg, Bonawitz et al. 2017): this client's side ---------------------

    def _secagg_session(self, rnd: int, client_id: int):
        try:
            return self._secagg[(rnd, client_id)]
        except KeyError:
            raise ClientError(
                f"client {client_id}: no SecAgg state for round {rnd} (the actor restarted since "
                "it advertised its keys)"
            ) from None

    def secagg_advertise(
        self, rnd: int, client_id: int, index: int, session: bytes
    ) -> tuple[bytes, bytes]:
        """Round 0: make this client's key pairs for round ``rnd``; returns the public keys.

        Args:
            rnd: The round.
            client_id: The (virtual) client this actor acts for.
            index: The client's protocol index, 1..n (its Shamir x-coordinate).
            session: Bytes binding the keys and messages to the run and round.
        """
        from fednano_ray.trust.secagg import SecAggClient

        for key in [k for k in self._secagg if k[0] < rnd]:  # sessions of rounds that are over
            del self._secagg[key]
        client = SecAggClient(index, session)
        self._secagg[(rnd, client_id)] = client
        return client.advertise_keys()

    def secagg_share_keys(
        self, rnd: int, client_id: int, public_keys: dict[int, tuple[bytes, bytes]], threshold: int
    ) -> dict[int, bytes]:
        """Round 1: encrypted Shamir shares of this client's secrets, one per peer of ``U1``."""
        return self._secagg_session(rnd, client_id).share_keys(public_keys, threshold)

    def secagg_unmask(
        self, rnd: int, client_id: int, survivors: list[int], dropped: list[int]
    ) -> dict[str, dict[int, int]]:
        """Round 3: this client's shares of the survivors' self-mask seeds and the dropped
        clients' mask keys; the round's protocol state is then discarded."""
        response = self._secagg_session(rnd, client_id).unmask(survivors, dropped)
        del self._secagg[(rnd, client_id)]
        return response

    def evaluate(
        self,
        state: dict[str, torch.Tensor],
        split: str,
        indices: list[int],
        batch_size: int = 32,
        dual: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """Accuracy of the adapters ``state`` on examples ``indices`` of ``split`` ("train" pool or
        "test").

        Under ``llm_lora`` ``state`` is the LLM's LoRA, scored by this actor's own LoRA-adapted LLM.
        With ``dual`` (FedDPA-F: ``{"local": state, "bank": (N, D), "top_k": k}``) ``state`` is the
        global adapter and the client's dual adapter is scored with its dynamic weight; the result
        then has ``dual_weight_mean``, the mean weight of the local adapter over the questions."""
        edge = self.edge
        if dual is None:
            load_adapter_state(self.params, state)
        else:
            edge = self._dual_edge(DynamicWeight(dual["bank"], top_k=dual["top_k"]))
            edge.load_states(state, dual["local"])
            edge.weight_log = []
        feats, qs = self.data[split]
        questions = [
            ([self.encode_row(q, c) for c in choices], answer, cat)
            for q, choices, answer, cat in (qs[i] for i in indices)
        ]
        out = evaluate(
            edge,
            self.server,
            np.asarray(feats[indices]),
            questions,
            pad_id=self.pad_id,
            batch_size=batch_size,
        )
        if dual is not None:
            log, edge.weight_log = edge.weight_log, None
            out["dual_weight_mean"] = float(torch.cat(log).mean()) if log else float("nan")
        return out

    # -- FedDPA-F: the dual adapter (fednano_ray/models/dual.py) ----------------------------------

    def _dual_edge(self, weighting: float | DynamicWeight) -> DualEdge:
        """This actor's dual edge (built once: the tier's rank and form), set to ``weighting``."""
        if self._dual is None:
            if self._llm is not None:
                raise ClientError(
                    "FedDPA-F's dual adapter needs NanoAdapters; this actor trains LoRA in its LLM"
                )
            self._dual = DualEdge.around(self.edge)
        self._dual.weighting = weighting
        return self._dual

    def fit_dual(
        self,
        client_id: int,
        indices: list[int],
        global_state: dict[str, torch.Tensor],
        *,
        steps: int,
        batch_size: int,
        lr: float,
        train_weight: float,
        bank_size: int,
        weight_decay: float = 0.0,
        seed: int = 0,
        objective: str = "lm",
        lm_weight: float = 0.0,
    ) -> dict[str, Any]:
        """FedDPA-F's local phase: train a local adapter (a copy of ``global_state``) beside the
        frozen global one at the constant weight ``train_weight``, and summarise the client's
        training prompts into a bank of at most ``bank_size`` rows (a ``seed``-ed subsample).

        Returns:
            ``state`` (the local adapter, at this tier's rank), ``bank`` (N, D), ``metrics``,
            ``num_examples``, ``rank``, ``node_id``.
        """
        if not indices:
            raise ClientError(f"client {client_id} has no training examples")
        t0 = time.perf_counter()
        dual = self._dual_edge(float(train_weight))
        dual.load_states(global_state, global_state)  # the local adapter starts as the global one
        feats = self.data["train"][0][indices]
        questions = [self._question(i) for i in indices]
        state, _, metrics, _ = local_fit(
            dual,
            self.server,
            feats,
            questions,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            pad_id=self.pad_id,
            weight_decay=weight_decay,
            seed=seed,
            params=dict(dual.local_edge.adapters.named_parameters()),
            objective=objective,
            lm_weight=lm_weight,
        )
        keep = [indices[i] for i in subsample(len(indices), bank_size, seed)]
        metrics["fit_s"] = time.perf_counter() - t0
        return {
            "client_id": client_id,
            "state": state,
            "bank": self.prompt_summaries("train", keep),
            "num_examples": len(indices),
            "metrics": metrics,
            "rank": self.rank,
            "node_id": self.node_id(),
        }

    def prompt_summaries(
        self, split: str, indices: list[int], batch_size: int = 64
    ) -> torch.Tensor:
        """Frozen summaries (:meth:`DualEdge.representation`) of the prompts of examples
        ``indices`` of ``split``, (n, D)."""
        dual = self._dual_edge(0.0)
        feats, qs = self.data[split]
        out = []
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = collate([self.encode_row(qs[i][0], None) for i in chunk], self.pad_id)
            f = torch.from_numpy(np.ascontiguousarray(feats[chunk])).float()
            prompt = batch["attention_mask"].bool()  # the rows are prompts alone
            out.append(dual.representation(batch["input_ids"], batch["image_mask"], prompt, f))
        return torch.cat(out)

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The adapters as initialised (B = 0: exactly the pretrained model)."""
        return self._initial

    def node_id(self) -> str | None:
        """The Ray node this actor runs on (None outside Ray)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
