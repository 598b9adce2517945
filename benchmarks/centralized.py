"""Headroom probe: zero-shot accuracy of a config's model, then centralised NanoAdapter training.

Trains the adapters on ALL training data pooled (no Ray, in-process split steps) and evaluates on
the global test split every 50 steps, per category. This is what the README's zero-shot and
"centralised" figures come from. Usage:
``fednano-ray bench centralized [--config examples/quickstart.yaml] [--steps 200] [--lr 0.01]
[--set k=v ...]``.

``--train connector`` trains the (otherwise frozen) connector instead of the adapters, at the same
cost per step: a diagnostic of whether the edge *can* learn the benchmark, not a FedNano setting.
``--train llm-lora`` trains PEFT LoRA inside the LLM (``adapter.lora_target_modules``), as a
``fedavg-lora`` client does: the centralised upper bound of that baseline.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


class _Wrapped(torch.nn.Module):
    """The connector in the vision adapter's slot, so local_fit trains and evaluate uses it."""

    def __init__(self, connector: torch.nn.Module) -> None:
        super().__init__()
        self.net = connector

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def main(argv: list[str] | None = None) -> None:
    from fednano_ray.config import load_config
    from fednano_ray.features import cached_features, feature_key
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
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="adapter init and batch order (repeat over seeds for intervals)",
    )
    p.add_argument("--set", action="append", default=[])
    p.add_argument(
        "--train",
        choices=["adapters", "connector", "llm-lora"],
        default="adapters",
        help="what to train: the NanoAdapters (FedNano), PEFT LoRA inside the LLM (fedavg-lora's "
        "clients) or, as a diagnostic, the connector",
    )
    a = p.parse_args(argv)

    cfg = load_config(a.config, a.set)
    mllm = build_mllm(cfg.model)
    data = prepare_data(cfg)
    key = feature_key(cfg.model, mllm)
    cache = None if cfg.model.kind == "tiny" else cache_dir() / "features"
    train_f = cached_features(mllm, key, data.train, cache)
    test_f = cached_features(mllm, key, data.test, cache)
    params = None
    if a.train == "llm-lora":  # an own copy of the model: the LoRA goes into its decoder in place
        edge, server_llm, params = build_mllm.__wrapped__(cfg.model).with_llm_lora(
            cfg.adapter, autocast_bf16=cfg.model.runtime_precision().autocast_bf16
        )
    else:
        edge, server_llm = mllm.split(
            cfg.adapter, autocast_bf16=cfg.model.runtime_precision().autocast_bf16, seed=a.seed
        )
    server = LocalServer(server_llm)
    if a.train == "connector":  # diagnostic: the connector's 1M parameters take the adapters' place
        connector = edge.connector
        for q in connector.parameters():
            q.requires_grad_(True)
        edge.adapters = torch.nn.ModuleDict({"vision": _Wrapped(connector)})
        edge.connector = torch.nn.Identity()
    train_qs = [
        ([mllm.encode_row(e.question, c) for c in e.choices], e.answer, e.category)
        for e in data.train
    ]
    questions = [
        ([mllm.encode_row(e.question, c) for c in e.choices], e.answer, e.category)
        for e in data.test
    ]
    chance = sum(1 / len(e.choices) for e in data.test) / len(data.test)

    def report(step: int, extra: dict | None = None) -> None:
        ev = evaluate(
            edge,
            server,
            test_f,
            questions,
            pad_id=mllm.pad_id,
            batch_size=cfg.train.eval_batch_size,
        )
        # Scores rounded; per-question outcomes (``correct``, a 0/1 string) kept for paired
        # comparisons.
        scores = {k: round(v, 3) if isinstance(v, float) else v for k, v in ev.items()}
        print(
            json.dumps({"step": step, "chance": round(chance, 3), **scores, **(extra or {})}),
            flush=True,
        )

    report(0)
    t0, done, opt_state = time.perf_counter(), 0, None
    while done < a.steps:
        n = min(a.eval_every, a.steps - done)
        # One optimiser for the whole run: AdamW's moments carry over between evaluation chunks.
        _, _, metrics, opt_state = local_fit(
            edge,
            server,
            train_f,
            train_qs,
            steps=n,
            batch_size=a.batch_size,
            lr=a.lr,
            pad_id=mllm.pad_id,
            seed=1000 * a.seed + done,
            params=params,
            objective=cfg.train.objective,
            lm_weight=cfg.train.lm_weight,
            optimizer_state=opt_state,
        )
        done += n
        report(
            done,
            {"train_loss": round(metrics["loss"], 3), "wall_s": round(time.perf_counter() - t0, 1)},
        )


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
