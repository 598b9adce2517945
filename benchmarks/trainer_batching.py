"""LLM-trainer batching: split-step throughput with 1, 4 and 16 concurrent clients.

Each "client" sends split steps of ``--batch`` rows to one ``LLMTrainer`` (the real class,
in-process on its asyncio loop, no Ray in the timing). Concurrent requests are merged into one
padded forward/backward; the baseline is the same requests sent one after another. Reports
tokens/s and the ratio, measured side by side in one run. Usage:
``fednano-ray bench trainer_batching [--model tiny]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch


async def _client(trainer, z, mask, labels, steps: int) -> None:
    for _ in range(steps):
        await trainer.loss_and_grad(z, mask, labels)


def run(model: str, clients: list[int], batch: int, steps: int, threads: int) -> list[dict]:
    from fednano_ray.actors.llm_trainer import LLMTrainer
    from fednano_ray.config import load_config
    from fednano_ray.models.build import build_mllm
    from fednano_ray.models.prompt import collate

    torch.set_num_threads(threads)
    cfg = load_config("examples/quickstart.yaml" if model == "nano" else "examples/tiny.yaml")
    mllm = build_mllm(cfg.model)
    edge, _ = mllm.split(cfg.adapter)
    rows = [mllm.encode_row(f"What colour is the square number {i}?", "red") for i in range(batch)]
    b = collate(rows, mllm.pad_id)
    feats = torch.randn(
        batch, mllm.num_image_tokens, mllm.parts.connector[0].in_features if model == "nano" else 64
    )
    with torch.no_grad():
        z = (
            edge(b["input_ids"], b["image_mask"], features=feats)
            if model == "nano"
            else edge(b["input_ids"], b["image_mask"], pixel_values=torch.randn(batch, 3, 32, 32))
        )
    tokens_per_step = int(b["attention_mask"].sum())
    out = []
    for n in clients:
        for mode in ("sequential", "concurrent"):
            trainer = LLMTrainer(cfg.model, max_batch_size=max(64, n * batch), batch_wait_ms=5.0)

            async def main(trainer=trainer, mode=mode, n=n):
                await trainer.loss_and_grad(z, b["attention_mask"], b["labels"])  # warm-up
                t0 = time.perf_counter()
                if mode == "concurrent":
                    await asyncio.gather(
                        *[
                            _client(trainer, z, b["attention_mask"], b["labels"], steps)
                            for _ in range(n)
                        ]
                    )
                else:
                    for _ in range(n):
                        await _client(trainer, z, b["attention_mask"], b["labels"], steps)
                return time.perf_counter() - t0

            wall = asyncio.run(main())
            tps = n * steps * tokens_per_step / wall
            out.append(
                {
                    "clients": n,
                    "mode": mode,
                    "tokens_per_s": round(tps, 1),
                    "max_clients_in_batch": trainer.get_stats()["max_clients_in_batch"],
                }
            )
            print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fednano-ray bench trainer_batching")
    p.add_argument("--model", choices=["nano", "tiny"], default="nano")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch", type=int, default=8, help="rows per client step")
    p.add_argument("--steps", type=int, default=3, help="steps per client")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    rows = run(a.model, a.clients, a.batch, a.steps, a.threads)
    print(
        "\n| clients | sequential tokens/s | concurrent (merged) tokens/s | speed-up | "
        "clients per batch |"
    )
    print("|---:|---:|---:|---:|---:|")
    for n in a.clients:
        s = next(r for r in rows if r["clients"] == n and r["mode"] == "sequential")
        c = next(r for r in rows if r["clients"] == n and r["mode"] == "concurrent")
        print(
            f"| {n} | {s['tokens_per_s']:.0f} | {c['tokens_per_s']:.0f} | "
            f"{c['tokens_per_s'] / s['tokens_per_s']:.2f}x | {c['max_clients_in_batch']} |"
        )


if __name__ == "__main__":
    main()
