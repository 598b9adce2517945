"""The trivial client of ``flower_overhead.py``, and the Flower side of that benchmark.

``TrivialClient`` (torch and fednano_ray only) is the work one client does per round: load the
global adapters into the tiny model's NanoEdge, run ONE local split step on its shard with the
frozen LLM half in-process, return its adapters. ``flower_overhead.py`` times it alone (the compute
that both frameworks must spend) in our venv; this file's ``main`` runs it as a Flower ``ClientApp``
under ``flwr.simulation.run_simulation`` (Ray backend) in the Flower venv and prints one JSON line.
Not a benchmark of its own (the leading underscore hides it from ``fednano-ray bench``).

Run by flower_overhead.py as::

    FLWR_VENV/bin/python benchmarks/_flower_side.py --config-json '{...}' --rounds R --concurrency K
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

CONFIG_ENV = (
    "FNR_FLOWER_BENCH_CONFIG"  # the resolved fednano-ray config (JSON), for the Ray workers
)


class TrivialClient:
    """One process's trivial clients: the tiny NanoEdge, the frozen LLM half and the clients'
    shards.

    Built once per process (the ClientActor likewise keeps its edge and data between rounds).
    Every client has the same tier (one rank), so FedAvg sees arrays of one shape.
    """

    def __init__(self, cfg) -> None:
        import torch

        from fednano_ray.features import cached_features
        from fednano_ray.models.adapter import adapter_state
        from fednano_ray.models.build import build_mllm
        from fednano_ray.task import prepare_data
        from fednano_ray.training import LocalServer

        torch.set_num_threads(
            1
        )  # as a ClientActor with num_cpus=1 and a trainer with trainer_threads=1
        self.cfg = cfg
        tier = cfg.tiers[0]
        mllm = build_mllm.__wrapped__(cfg.model)  # uncached: split() adds adapters to these parts
        data = prepare_data(cfg)
        self.features = cached_features(mllm, "", data.train, None)
        self.questions = [(e.question, list(e.choices), e.answer) for e in data.train]
        self.shards = data.client_train
        self.edge, server_llm = mllm.split(
            cfg.adapter,
            r=cfg.tier_rank(tier),
            autocast_bf16=cfg.model.runtime_precision().autocast_bf16,
            seed=cfg.federation.seed,
        )
        self.server = LocalServer(server_llm)
        self.encode_row = mllm.encode_row
        self.pad_id = mllm.pad_id
        self.initial = adapter_state(self.edge.adapters)
        self._rows: dict[int, Any] = {}

    def _row(self, i: int):
        if i not in self._rows:
            q, choices, answer = self.questions[i]
            self._rows[i] = ([self.encode_row(q, c) for c in choices], answer, None)
        return self._rows[i]

    def fit(self, client_id: int, state: dict, seed: int = 0) -> tuple[dict, int, float]:
        """One client-round of work: (new adapter state, examples in the shard, loss)."""
        from fednano_ray.models.adapter import load_adapter_state
        from fednano_ray.training import local_fit

        tier = self.cfg.tiers[0]
        load_adapter_state(self.edge.adapters, state)
        idx = self.shards[client_id]
        new, _fisher, metrics, _ = local_fit(
            self.edge,
            self.server,
            self.features[idx],
            [self._row(i) for i in idx],
            steps=tier.local_steps,
            batch_size=tier.batch_size,
            lr=self.cfg.train.lr,
            pad_id=self.pad_id,
            weight_decay=self.cfg.train.weight_decay,
            seed=seed,
            objective=self.cfg.train.objective,
            lm_weight=self.cfg.train.lm_weight,
        )
        return new, len(idx), float(metrics["loss"])


def load_cfg(cfg_json: str):
    from fednano_ray.config import load_config

    return load_config(json.loads(cfg_json))


# -- Flower (imported only in the Flower venv) -----------------------------------------------------

_CLIENT: TrivialClient | None = None


def _client() -> TrivialClient:
    global _CLIENT
    if _CLIENT is None:  # once per Ray actor process; this module is imported by name there
        _CLIENT = TrivialClient(load_cfg(os.environ[CONFIG_ENV]))
    return _CLIENT


def _make_apps(rounds: int, num_clients: int, initial: dict, round_times: dict[int, list[float]]):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        client = _client()
        cid = int(context.node_config["partition-id"])
        state = msg.content["arrays"].to_torch_state_dict()
        rnd = int(msg.content["config"]["server-round"])
        new, n, loss = client.fit(cid, state, seed=rnd * 100_003 + cid)
        return Message(
            content=RecordDict(
                {
                    "arrays": ArrayRecord(new),
                    "metrics": MetricRecord({"num-examples": n, "loss": loss}),
                }
            ),
            reply_to=msg,
        )

    class TimedFedAvg(FedAvg):
        """FedAvg that notes when each round's training starts (configure) and ends (aggregated)."""

        def configure_train(self, server_round, arrays, config, grid):
            round_times[server_round] = [time.perf_counter()]
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            out = super().aggregate_train(server_round, replies)
            round_times[server_round] += [time.perf_counter(), float(len(replies))]
            return out

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=rounds,
            train_config=ConfigRecord(),
        )

    return client_app, server_app


def run_flower(cfg_json: str, rounds: int, concurrency: int) -> dict[str, Any]:
    import flwr
    import ray
    import torch
    from flwr.simulation import run_simulation

    torch.set_num_threads(1)
    os.environ[CONFIG_ENV] = cfg_json  # the Ray workers inherit it
    cfg = load_cfg(cfg_json)
    n = cfg.federation.num_clients
    initial = TrivialClient(cfg).initial  # the same initial adapters the ClientActor starts from
    round_times: dict[int, list[float]] = {}
    client_app, server_app = _make_apps(rounds, n, initial, round_times)
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # K logical CPUs at one per client: an actor pool of K, as our simulation mode's pool.
            # A Ray of its own in a temp dir of its own: never a cluster already running on this
            # machine.
            "init_args": {
                "address": "local",
                "num_cpus": concurrency,
                "include_dashboard": False,
                "_temp_dir": tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
            },
        },
    )
    run_wall = time.perf_counter() - t0
    walls = [round_times[r][1] - round_times[r][0] for r in sorted(round_times)]
    replies = [int(round_times[r][2]) for r in sorted(round_times)]
    return {
        "framework": "flower",
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "clients": n,
        "rounds": rounds,
        "concurrency": concurrency,
        "round_walls_s": [round(w, 4) for w in walls],
        "replies": replies,
        "run_wall_s": round(run_wall, 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="_flower_side")
    p.add_argument("--config-json", required=True, help="the resolved fednano-ray config as JSON")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=1)
    a = p.parse_args(argv)
    out = run_flower(a.config_json, a.rounds, a.concurrency)
    print("FLOWER_RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    # Import this file by name so that cloudpickle sends the ClientApp's functions by reference:
    # each Ray worker then imports the module once and keeps its TrivialClient between messages.
    # (Flower puts the driver's sys.path, which starts with this folder, on the workers'
    # PYTHONPATH.)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _flower_side

    _flower_side.main()
