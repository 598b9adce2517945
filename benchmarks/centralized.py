"""Headroom probe: zero-shot accuracy of a config's model, then centralised NanoAdapter training.

Trains the adapters on ALL training data pooled (no Ray, in-process split steps) and evaluates on
the global test split every 50 steps, per category. This is what the README's zero-shot and
"centralised" figures come from. Usage:
``fednano-ray bench centralized [--config examples/quickstart.yaml] [--steps 200] [--lr 0.01] [--set k=v ...]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> None:
    from fednano_ray.config import load_config
    from fednano_ray.features import cached_features
    from fednano_ray.models.build import build_mllm
    from fednano_ray.models.pretrained import cache_dir
    from fednano_ray.task import prepare_data
    from fednano_ray.training import LocalServer, evaluate, local_fit

    p = argparse.ArgumentParser(prog="fednano-ray bench centralized")
    p.add_argument("--config", default="examples/quickstart.yaml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)

    cfg = load_config(a.config, a.set)
    mllm = build_mllm(cfg.model)
    data = prepare_data(cfg)
    key = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
    cache = None if cfg.model.kind == "tiny" else cache_dir() / "features"
    train_f = cached_features(mllm, key, data.train, cache)
    test_f = cached_features(mllm, key, data.test, cache)
    edge, server_llm = mllm.split(cfg.adapter, autocast_bf16=cfg.model.autocast_bf16)
    server = LocalServer(server_llm)
    rows = [mllm.encode_row(e.question, e.choices[e.answer]) for e in data.train]
    questions = [([mllm.encode_row(e.question, c) for c in e.choices], e.answer, e.category) for e in data.test]
    chance = sum(1 / len(e.choices) for e in data.test) / len(data.test)

    def report(step: int, extra: dict | None = None) -> None:
        ev = evaluate(edge, server, test_f, questions, pad_id=mllm.pad_id, batch_size=cfg.train.eval_batch_size)
        print(json.dumps({"step": step, "chance": round(chance, 3), **{k: round(v, 3) for k, v in ev.items()}, **(extra or {})}), flush=True)

    report(0)
    t0, done = time.perf_counter(), 0
    while done < a.steps:
        n = min(a.eval_every, a.steps - done)
        _, _, metrics = local_fit(edge, server, train_f, rows, steps=n, batch_size=a.batch_size, lr=a.lr,
                                  pad_id=mllm.pad_id, seed=done)
        done += n
        report(done, {"train_loss": round(metrics["loss"], 3), "wall_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
