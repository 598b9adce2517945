"""A run of examples/tiny.yaml in this process that hangs at a chosen point, for a test to SIGKILL.

``python tests/federation/_killable.py RUN_DIR WHERE [--set KEY=VALUE ...]``; WHERE is ``fit``
(round 1, as client 2 starts training: the round is half done) or ``checkpoint`` (round 1's
``state.json`` written to its temporary file, not yet renamed: every other file of the checkpoint
is on disk). It prints ``hanging WHERE`` when it gets there and waits to be killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from fednano_ray.actors.client import ClientActor
from fednano_ray.config import load_config
from fednano_ray.federation import rundir
from fednano_ray.federation.rounds import round_seed
from fednano_ray.federation.setup import in_process

ROOT = Path(__file__).resolve().parents[2]


def hang(where: str) -> None:
    print(f"hanging {where}", flush=True)
    time.sleep(600)
    sys.exit(3)  # not killed: the test will fail on the exit status


def main(run_dir: str, where: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)  # as the in-process tests run: the same floating-point sums
    cfg = load_config(ROOT / "examples" / "tiny.yaml", overrides)
    stop = round_seed(cfg.federation.seed, 1, 2)

    class Client(ClientActor):
        def fit(self, client_id, *args, **kwargs):
            if where == "fit" and kwargs.get("seed") == stop:
                hang(where)
            return super().fit(client_id, *args, **kwargs)

    real_replace = os.replace

    def replace(src, dst):
        dst_path = Path(dst)
        if (
            where == "checkpoint"
            and dst_path.name == rundir.STATE
            and dst_path.parent.name == rundir.round_name(1)
        ):
            hang(where)
        real_replace(src, dst)

    os.replace = replace
    fed = in_process(cfg, run_dir, client_class=Client)
    fed.begin()
    for rnd in range(cfg.federation.rounds):
        fed.run_round(rnd)
    sys.exit(4)  # the hang point was never reached


if __name__ == "__main__":
    args = sys.argv[1:]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    main(args[0], args[1], overrides)
