"""The embedded default ``nano`` MLLM, built fully offline from PyPI packages.

EfficientNet-Lite0 (ImageNet) ─► 7x7x1280 map pooled to grid x grid ─► MLP connector (1280→576→576)
─► SmolLM2-135M-Instruct. The connector is pretrained once, centrally, LLaVA stage-1 style (encoder
and LLM frozen, caption loss) on synthetic image–caption pairs, and cached under
``cache_dir()`` (``$FEDNANO_RAY_CACHE``); later runs reuse it. The federated stage tunes
NanoAdapters only.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fednano_ray.models.split import MLLMParts, ServerLLM

logger = logging.getLogger(__name__)

FEATURE_DIM = 1280  # EfficientNet-Lite0's last feature map: (B, 1280, 7, 7) at 224 px
CONNECTOR_VERSION = "nano-connector/3"  # bump when the alignment data or recipe changes

# SmolLM2-135M-Instruct's architecture, for building it with random weights (tests, accounting).
SMOLLM2_135M: dict[str, Any] = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


class PooledEncoder(nn.Module):
    """A CNN feature map pooled to ``grid x grid`` visual tokens: (B,3,H,W) -> (B, grid², C)."""

    def __init__(self, net: nn.Module, grid: int) -> None:
        super().__init__()
        self.net = net
        self.grid = grid

    def forward(self, pixel_values: Tensor) -> Tensor:
        fmap = self.net(pixel_values)  # (B, C, 7, 7)
        pooled = F.adaptive_avg_pool2d(fmap, self.grid)  # (B, C, g, g)
        return pooled.flatten(2).transpose(1, 2)  # (B, g², C)


def build_connector(in_dim: int = FEATURE_DIM, hidden: int = 576) -> nn.Sequential:
    """LLaVA-1.5's two-layer MLP projector (Linear, GELU, Linear)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def nano_parts(*, grid: int = 3, pretrained: bool = True, num_layers: int | None = None, connector_steps: int = 200):
    """The nano MLLM as MLLMParts plus its tokenizer.

    Args:
        grid: visual tokens per side (grid² tokens per image).
        pretrained: load the real weights (EfficientNet ImageNet, SmolLM2, cached aligned connector);
            False builds the same architecture with random weights (tests, accounting).
        num_layers: random-weight builds only: fewer decoder layers, for fast tests.
        connector_steps: stage-1 steps if the aligned connector is not cached yet.

    Returns:
        (MLLMParts, tokenizer or None when not pretrained).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from fednano_ray.models import pretrained as pt

    if pretrained:
        llm, tok = pt.load_smollm2()
        net = pt.load_efficientnet_lite0()
    else:
        cfg = dict(SMOLLM2_135M)
        if num_layers is not None:
            cfg["num_hidden_layers"] = num_layers
        llm = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
        tok = None
        net = pt.efficientnet_lite0_arch()
    parts = MLLMParts(
        encoder=PooledEncoder(net, grid).eval(),
        connector=build_connector(FEATURE_DIM, llm.config.hidden_size),
        embed_tokens=llm.get_input_embeddings(),
        decoder=llm.model,
        lm_head=llm.lm_head,
    )
    if pretrained:
        parts.connector.load_state_dict(aligned_connector(parts, tok, grid=grid, steps=connector_steps))
    return parts, tok


# ------------------------------------------------------------------------------------------------
# Stage-1 alignment of the connector (LLaVA, Liu et al. 2023, §4.2: encoder and LLM frozen).
# ------------------------------------------------------------------------------------------------


def _caption(objects: list[dict[str, Any]]) -> str:
    """'from left to right: a big red square, a small blue circle.' from synth scene metadata."""
    objs = sorted(objects, key=lambda o: o["x"])
    words = [f"a {o['size']} {o['colour']} {o['shape']}" for o in objs]
    return "from left to right: " + ", ".join(words) + "."


def connector_cache_path(grid: int, steps: int) -> Path:
    from fednano_ray.models.pretrained import cache_dir

    version = CONNECTOR_VERSION.rsplit("/", 1)[1]
    return cache_dir() / f"nano-connector-v{version}-g{grid}-s{steps}.safetensors"


def aligned_connector(parts: MLLMParts, tokenizer, *, grid: int, steps: int, seed: int = 0) -> dict[str, Tensor]:
    """The stage-1-aligned connector weights: from the cache, or trained now (once) and cached."""
    from safetensors.torch import load_file, save_file

    path = connector_cache_path(grid, steps)
    if path.exists():
        return load_file(str(path))
    logger.warning("aligning the nano connector once (LLaVA stage-1, %d steps); cached at %s", steps, path)
    state, info = pretrain_connector(parts, tokenizer, steps=steps, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(state)}")
    save_file(state, str(tmp), metadata={"version": CONNECTOR_VERSION, "grid": str(grid), "steps": str(steps)})
    tmp.replace(path)  # atomic: a killed run never leaves half a cache
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return state


def pretrain_connector(
    parts: MLLMParts,
    tokenizer,
    *,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    num_images: int = 800,
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train the connector on synthetic image–caption pairs (caption loss, LLM frozen, bf16 autocast).

    Returns:
        (connector state dict, info with the loss curve and wall time).
    """
    from tqdm.auto import tqdm

    from fednano_ray.data.dataset import open_image
    from fednano_ray.data.synth import generate
    from fednano_ray.models.pretrained import preprocess
    from fednano_ray.models.prompt import CHATML, PromptFormat, collate

    t0 = time.perf_counter()
    fmt = PromptFormat(prefix=CHATML.prefix, question_template="\n{question}<|im_end|>\n<|im_start|>assistant\n", end=CHATML.end)
    with tempfile.TemporaryDirectory() as tmp:
        # A seed the benchmark never uses, so alignment captions never overlap evaluation images.
        root = generate(tmp, num_train=num_images, num_test=10, seed=10_000 + seed)
        scenes = [json.loads(line) for line in (root / "train" / "scenes.jsonl").read_text().splitlines() if line]
        images = sorted((root / "train" / "images").glob("*.png"))
        feats = []
        for i in tqdm(range(0, len(images), 32), desc="stage-1: encoding images", unit="batch"):
            px = preprocess([open_image(p, 224) for p in images[i : i + 32]])
            with torch.no_grad():
                feats.append(parts.encoder(px))
        features = torch.cat(feats)  # (N, g², 1280)
    captions = [_caption(s["objects"]) for s in scenes]
    n_img = features.shape[1]
    rows = [fmt.encode(tokenizer, "Describe the image.", c, n_img, tokenizer.pad_token_id) for c in captions]

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        connector = build_connector(FEATURE_DIM, parts.hidden_size)
    server = ServerLLM(parts.decoder, parts.lm_head, autocast_bf16=True)
    opt = torch.optim.AdamW(connector.parameters(), lr=lr)
    warm = max(1, steps // 10)  # linear warm-up, then cosine decay to 10%
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, s / max(1, steps))))
    )
    losses: list[float] = []
    bar = tqdm(range(steps), desc="stage-1: aligning connector", unit="step")
    for _ in bar:
        idx = torch.randint(len(rows), (batch_size,), generator=gen).tolist()
        b = collate([rows[i] for i in idx], tokenizer.pad_token_id)
        with torch.no_grad():
            z = parts.embed_tokens(b["input_ids"])
        v = connector(features[idx])
        z = z.masked_scatter(b["image_mask"].unsqueeze(-1).expand_as(z), v)
        loss, grad = server.loss_and_grad(z, b["attention_mask"], b["labels"])
        opt.zero_grad()
        z.backward(grad)
        opt.step()
        sched.step()
        losses.append(float(loss[0]))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    info = {
        "version": CONNECTOR_VERSION,
        "steps": steps,
        "batch_size": batch_size,
        "num_images": num_images,
        "loss_first": losses[0] if losses else None,
        "loss_last20": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    return {k: v.detach().contiguous() for k, v in connector.state_dict().items()}, info
