"""fp32 against bf16 autocast on this machine: a matmul and the frozen SmolLM2-135M's split step.

What ``model.precision: auto`` decides from the CPU flags, measured side by side in one run: the
issue-11 matmul (512x576 @ 576x1536) and, on a random-weight SmolLM2-135M (30 layers, the real
architecture; nothing is loaded), the split step (forward + backward to the inputs) and the scoring
forward at 8 rows x 48 tokens, after one warm-up each. Prints what ``auto`` resolves to, why, and
the CPU. Usage: ``fednano-ray bench precision [--repeats 3]``. To see an AVX2-only CPU's behaviour
on a newer one, run it under
``MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _ms(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000


def main(argv: list[str] | None = None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fednano_ray.models.nano import SMOLLM2_135M
    from fednano_ray.models.split import ServerLLM
    from fednano_ray.precision import hardware_info, resolve_precision

    p = argparse.ArgumentParser(prog="fednano-ray bench precision")
    p.add_argument("--repeats", type=int, default=3, help="timed split steps per precision")
    a = p.parse_args(argv)

    torch.manual_seed(0)
    x, w = torch.randn(512, 576), torch.randn(576, 1536)

    def bf16_matmul():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return x @ w

    out: dict = {"auto": resolve_precision("auto").as_dict(), "hardware": hardware_info()}
    out["matmul_ms"] = {
        "fp32": round(_ms(lambda: x @ w, 20), 2),
        "bf16": round(_ms(bf16_matmul, 20), 2),
    }
    llm = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    z = torch.randn(8, 48, 576)
    mask = torch.ones(8, 48, dtype=torch.long)
    labels = torch.full((8, 48), -100)
    labels[:, -4:] = torch.randint(0, 49152, (8, 4))
    for name in ("fp32", "bf16"):
        server = ServerLLM(llm.model, llm.lm_head, autocast_bf16=name == "bf16")
        step = _ms(lambda s=server: s.loss_and_grad(z, mask, labels), a.repeats) / 1000
        fwd = _ms(lambda s=server: s.score(z, mask, labels), a.repeats) / 1000
        out[name] = {
            "split_step_s": round(step, 3),
            "split_step_tokens_per_s": round(8 * 48 / step),
            "score_s": round(fwd, 3),
            "score_tokens_per_s": round(8 * 48 / fwd),
        }
    out["bf16_speedup_split_step"] = round(
        out["fp32"]["split_step_s"] / out["bf16"]["split_step_s"], 2
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
