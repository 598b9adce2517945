"""The embedded default ``nano`` MLLM, built fully offline from PyPI packages.

EfficientNet-Lite0 (ImageNet) ─► 7x7x1280 map pooled to grid x grid ─► MLP connector (1280→576→576)
─► SmolLM2-135M-Instruct. The connector is pretrained once, centrally, LLaVA stage-1 style (encoder
and LLM frozen, caption loss) on synthetic image–caption pairs, and cached under
``cache_dir()`` (``$FEDNANO_RAY_CACHE``); later runs reuse it. The federated stage tunes
NanoAdapters only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
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
CONNECTOR_VERSION = "nano-connector/3"  # stage 1; bump when its alignment data or recipe changes
INSTRUCT_VERSION = "nano-instruct/1"  # stage 2; bump when its data or recipe changes
INSTRUCT_CATEGORIES = (
    "colour",
    "shape",
    "size",
)  # stage-2 VQA; the other benchmark categories stay new

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


def nano_parts(
    *,
    grid: int = 3,
    pretrained: bool = True,
    num_layers: int | None = None,
    connector_steps: int = 200,
    instruct_steps: int = 0,
    precision: str = "auto",
    align: bool = True,
):
    """The nano MLLM as MLLMParts plus its tokenizer.

    Args:
        grid: visual tokens per side (grid² tokens per image).
        pretrained: load the real weights (EfficientNet ImageNet, SmolLM2, aligned connector);
            False builds the same architecture with random weights (tests, accounting).
        num_layers: random-weight builds only: fewer decoder layers, for fast tests.
        connector_steps: stage-1 steps if the aligned connector is neither cached nor shipped.
        instruct_steps: stage-2 (short-answer VQA) steps after stage 1; 0 = stage 1 only.
        precision: ``model.precision`` of the LLM if the connector has to be aligned here.
        align: load (or align) the connector; False leaves it random (``fednano-ray align`` does
            it).

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
    if pretrained and align:
        key = connector_key(grid=grid, steps=connector_steps, instruct_steps=instruct_steps)
        parts.connector.load_state_dict(aligned_connector(parts, tok, key, precision=precision))
    return parts, tok


# ------------------------------------------------------------------------------------------------
# Stage-1 alignment of the connector (LLaVA, Liu et al. 2023, §4.2: encoder and LLM frozen).
# ------------------------------------------------------------------------------------------------

#: Aligned connectors that ship with the package (``fednano-ray align --out`` writes them), so a
#: first run on a 2-core CPU does not spend half an hour aligning. Each ``NAME.safetensors`` has a
#: ``NAME.json`` record with its sha256, the key it was aligned for, and how (hardware, precision,
#: loss).
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


def _caption(objects: list[dict[str, Any]]) -> str:
    """'from left to right: a big red square, a small blue circle.' from synth scene metadata."""
    objs = sorted(objects, key=lambda o: o["x"])
    words = [f"a {o['size']} {o['colour']} {o['shape']}" for o in objs]
    return "from left to right: " + ", ".join(words) + "."


def nano_preprocess(images) -> Tensor:
    """The nano model's pixels: 224 px, EfficientNet-Lite's ``(x - 127) / 128`` (the only copy of
    that choice)."""
    from fednano_ray.models.pretrained import EFFICIENTNET_LITE0_IMAGE_SIZE, preprocess

    return preprocess(images, EFFICIENTNET_LITE0_IMAGE_SIZE)


def nano_preprocessing_id() -> str:
    """Names :func:`nano_preprocess` in cache keys: change the preprocessing and every cache
    misses."""
    from fednano_ray.models.pretrained import (
        EFFICIENTNET_LITE0_IMAGE_SIZE,
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
    )

    return preprocessing_id(
        EFFICIENTNET_LITE0_IMAGE_SIZE, EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD
    )


def preprocessing_id(size: int, mean, std) -> str:
    r = lambda v: ",".join(f"{x:.4f}" for x in v)
    return f"rgb{size}-bicubic-mean({r(mean)})-std({r(std)})"


def connector_key(
    *, grid: int, steps: int, instruct_steps: int = 0, seed: int = 0
) -> dict[str, Any]:
    """Everything an aligned connector depends on: recipe, data, LLM, encoder and preprocessing.

    A cached or shipped connector is used only for exactly this key, so changing the model, the
    preprocessing or a recipe never reuses a stale one.
    """
    from fednano_ray.models.pretrained import EFFICIENTNET_WEIGHTS_FILE, SMOLLM2_GGUF_FILE

    key: dict[str, Any] = {
        "recipe": CONNECTOR_VERSION,
        "grid": grid,
        "steps": steps,
        "seed": seed,
        "llm": SMOLLM2_GGUF_FILE,
        "encoder": EFFICIENTNET_WEIGHTS_FILE,
        "preprocessing": nano_preprocessing_id(),
    }
    if instruct_steps:
        key.update(instruct_recipe=INSTRUCT_VERSION, instruct_steps=instruct_steps)
    return key


def connector_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stage = f"s{key['steps']}" + (f"-i{key['instruct_steps']}" if key.get("instruct_steps") else "")
    return f"nano-connector-g{key['grid']}-{stage}-{digest}"


def connector_cache_path(key: dict[str, Any]) -> Path:
    from fednano_ray.models.pretrained import cache_dir

    return cache_dir() / f"{connector_name(key)}.safetensors"


def shipped_connector_path(key: dict[str, Any]) -> Path:
    return ASSETS_DIR / f"{connector_name(key)}.safetensors"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _save_cached(path: Path, state: dict[str, Tensor], info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(
        state, str(tmp), metadata={k: str(v) for k, v in info.items() if isinstance(v, (str, int))}
    )
    tmp.replace(path)  # atomic: a killed run never leaves half a cache
    path.with_suffix(".json").write_text(
        json.dumps({**info, "sha256": file_sha256(path)}, indent=2)
    )


def _read(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors, copied out of the file (load_file maps it: a rewrite would
    change them)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path)).items()}


def load_shipped_connector(key: dict[str, Any]) -> dict[str, Tensor] | None:
    """The shipped connector for ``key``, checked against its recorded sha256; None if none
    ships."""

    path = shipped_connector_path(key)
    if not path.exists():
        return None
    record = json.loads(path.with_suffix(".json").read_text())
    if record.get("key") != key:
        raise RuntimeError(
            f"{path.with_suffix('.json')} records a different key than its name says: "
            "reinstall fednano-ray"
        )
    digest = file_sha256(path)
    if digest != record.get("sha256"):
        raise RuntimeError(
            f"{path} is corrupt: sha256 {digest[:16]}... but its record says "
            f"{str(record.get('sha256'))[:16]}...; "
            "reinstall fednano-ray, or re-align it with `fednano-ray align CONFIG --force`"
        )
    return _read(path)


def aligned_connector(
    parts: MLLMParts,
    tokenizer,
    key: dict[str, Any],
    *,
    precision: str = "auto",
    force: bool = False,
) -> dict[str, Tensor]:
    """The aligned connector weights for ``key``: from the cache, the shipped assets, or aligned
    now.

    Stage 1 (``key["steps"]`` caption steps) is cached on its own; stage 2
    (``key["instruct_steps"]`` of short-answer VQA, none when absent) starts from it and is cached
    under its own key. ``force`` ignores the cache and the shipped copy and aligns again
    (``fednano-ray align --force``).
    """

    path = connector_cache_path(key)
    if not force:
        if path.exists():
            return _read(path)
        shipped = load_shipped_connector(key)
        if shipped is not None:
            logger.info("using the shipped aligned connector %s", shipped_connector_path(key).name)
            return shipped
    if not key["steps"] and not key.get(
        "instruct_steps"
    ):  # an unaligned connector (ablations, benchmarks)
        with torch.random.fork_rng():
            torch.manual_seed(int(key["seed"]))
            return dict(build_connector(FEATURE_DIM, parts.hidden_size).state_dict())
    stage1_key = {k: v for k, v in key.items() if not k.startswith("instruct")}
    stage1 = connector_cache_path(stage1_key)
    seed = int(key["seed"])
    images = _alignment_images(
        parts, 800, seed
    )  # both stages use the same 800 images: encode them once
    if stage1.exists() and not force:
        state = _read(stage1)
    else:
        logger.warning(
            "aligning the nano connector (LLaVA stage 1, %d steps); cached at %s. "
            "`fednano-ray align` does this ahead of a run",
            key["steps"],
            stage1,
        )
        state, info = pretrain_connector(
            parts, tokenizer, steps=key["steps"], seed=seed, precision=precision, images=images
        )
        _save_cached(stage1, state, {**info, "key": stage1_key})
    if not key.get("instruct_steps"):
        return state
    logger.warning(
        "instruction-tuning the nano connector (stage 2, %d steps); cached at %s",
        key["instruct_steps"],
        path,
    )
    state, info = instruct_connector(
        parts,
        tokenizer,
        state,
        steps=key["instruct_steps"],
        seed=seed,
        precision=precision,
        images=images,
    )
    stage1_record = stage1.with_suffix(".json")
    info["stage1"] = json.loads(stage1_record.read_text()) if stage1_record.exists() else None
    _save_cached(path, state, {**info, "key": key})
    return state


def align_nano(model_cfg, *, out: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """``fednano-ray align``: make (or find) the aligned connector a ``nano`` config needs.

    Args:
        model_cfg: the config's ``model`` section (grid, connector_steps, instruct_steps,
            precision).
        out: also write the connector and its record (sha256, key, hardware, precision, loss curves)
            into this folder; ``--out fednano_ray/assets`` refreshes the copy that ships.
        force: align again even if a cached or shipped connector matches.

    Returns:
        The record: ``key``, ``name``, ``sha256``, ``source`` (cache, shipped or aligned) and
        ``path``.
    """
    import shutil

    if model_cfg.kind != "nano":
        raise ValueError(
            "fednano-ray align aligns the nano model's connector; "
            f"model.kind is {model_cfg.kind!r} "
            "(an hf LLaVA checkpoint brings its own aligned projector, tiny is random by design)"
        )
    key = connector_key(
        grid=model_cfg.grid,
        steps=model_cfg.connector_steps,
        instruct_steps=model_cfg.instruct_steps,
    )
    cached, shipped = connector_cache_path(key), shipped_connector_path(key)
    source = (
        "aligned"
        if force
        else "cache"
        if cached.exists()
        else "shipped"
        if shipped.exists()
        else "aligned"
    )
    if source != "shipped":
        parts, tok = nano_parts(grid=model_cfg.grid, align=False)
        aligned_connector(parts, tok, key, precision=model_cfg.precision, force=force)
    else:
        load_shipped_connector(key)  # checks its sha256
    path = shipped if source == "shipped" else cached
    record = json.loads(path.with_suffix(".json").read_text())
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        if target.resolve() != path.resolve():
            shutil.copyfile(path, target)
            target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        path = target
    return {
        "name": connector_name(key),
        "source": source,
        "path": str(path),
        "sha256": record["sha256"],
        "key": key,
    }


def _alignment_images(
    parts: MLLMParts, num_images: int, seed: int
) -> tuple[Tensor, list[dict[str, Any]], list[dict[str, Any]]]:
    """Encoder features, scene metadata and benchmark-style questions of the alignment images.

    A seed the benchmark never uses (10,000 + seed), so alignment never sees evaluation images;
    multi-object ("hard") scenes give richer captions, whatever difficulty is benchmarked.
    """
    from tqdm.auto import tqdm

    from fednano_ray.data.dataset import open_image
    from fednano_ray.data.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(
            tmp, num_train=num_images, num_test=10, seed=10_000 + seed, difficulty="hard"
        )
        read = lambda name: [
            json.loads(line) for line in (root / "train" / name).read_text().splitlines() if line
        ]
        scenes, questions = read("scenes.jsonl"), read("data.jsonl")
        images = [root / "train" / q["image"] for q in questions]
        feats = []
        for i in tqdm(range(0, len(images), 32), desc="alignment: encoding images", unit="batch"):
            px = nano_preprocess([open_image(p, 224) for p in images[i : i + 32]])
            with torch.no_grad():
                feats.append(parts.encoder(px))
    return torch.cat(feats), scenes, questions  # features (N, g², 1280), row i <-> image i


def _fit_connector(
    parts: MLLMParts,
    connector: nn.Module,
    features: Tensor,
    rows: list[tuple[int, tuple[list[int], list[int], list[bool]]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    seed: int,
    desc: str,
    precision: str = "auto",
) -> list[float]:
    """Train ``connector`` on (image index, row) pairs with the frozen LLM's answer loss (in
    ``precision``)."""
    from tqdm.auto import tqdm

    from fednano_ray.models.prompt import collate

    gen = torch.Generator().manual_seed(seed)
    from fednano_ray.precision import resolve_precision

    server = ServerLLM(
        parts.decoder, parts.lm_head, autocast_bf16=resolve_precision(precision).autocast_bf16
    )
    opt = torch.optim.AdamW(connector.parameters(), lr=lr)
    warm = max(1, steps // 10)  # linear warm-up, then cosine decay to 10%
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm)
            * (0.55 + 0.45 * math.cos(math.pi * min(1.0, s / max(1, steps))))
        ),
    )
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        pick = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=gen).tolist()]
        b = collate([r for _, r in pick], pad_id)
        with torch.no_grad():
            z = parts.embed_tokens(b["input_ids"])
        v = connector(features[[i for i, _ in pick]])
        z = z.masked_scatter(b["image_mask"].unsqueeze(-1).expand_as(z), v)
        loss, grad = server.loss_and_grad(z, b["attention_mask"], b["labels"])
        opt.zero_grad()
        z.backward(grad)
        opt.step()
        sched.step()
        losses.append(float(loss[0]))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses


def _curve_info(losses: list[float], t0: float, precision: str, **extra: Any) -> dict[str, Any]:
    from fednano_ray.precision import hardware_info, resolve_precision

    return {
        **extra,
        "precision": resolve_precision(precision).as_dict(),
        "hardware": hardware_info(),
        "loss_first": losses[0] if losses else None,
        "loss_last20": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]],
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }


def pretrain_connector(
    parts: MLLMParts,
    tokenizer,
    *,
    steps: int = 200,
    batch_size: int = 16,
    lr: float = 1e-3,
    num_images: int = 800,
    seed: int = 0,
    precision: str = "auto",
    images: tuple | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Stage 1: train a fresh connector on synthetic image–caption pairs (caption loss, LLM frozen).

    ``images``: :func:`_alignment_images`' result, when the caller already encoded them.

    Returns:
        (connector state dict, info with the loss curve and wall time).
    """
    from fednano_ray.models.prompt import CHATML, PromptFormat

    t0 = time.perf_counter()
    fmt = PromptFormat(
        prefix=CHATML.prefix,
        question_template="\n{question}<|im_end|>\n<|im_start|>assistant\n",
        end=CHATML.end,
    )
    features, scenes, _ = images or _alignment_images(parts, num_images, seed)
    n_img = features.shape[1]
    pad = tokenizer.pad_token_id
    rows = [
        (i, fmt.encode(tokenizer, "Describe the image.", _caption(s["objects"]), n_img, pad))
        for i, s in enumerate(scenes)
    ]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        connector = build_connector(FEATURE_DIM, parts.hidden_size)
    losses = _fit_connector(
        parts,
        connector,
        features,
        rows,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        pad_id=pad,
        seed=seed,
        desc="stage 1: aligning connector",
        precision=precision,
    )
    info = _curve_info(
        losses,
        t0,
        precision,
        version=CONNECTOR_VERSION,
        steps=steps,
        batch_size=batch_size,
        num_images=num_images,
    )
    return {k: v.detach().contiguous() for k, v in connector.state_dict().items()}, info


def instruct_connector(
    parts: MLLMParts,
    tokenizer,
    stage1: dict[str, Tensor],
    *,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 5e-4,
    num_images: int = 800,
    caption_fraction: float = 0.25,
    seed: int = 0,
    precision: str = "auto",
    images: tuple | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Stage 2: continue the stage-1 connector on short-answer VQA in the benchmark's prompt format.

    LLaVA-1.5's stage 2 adds short-answer VQA ("Answer with one word.") so the model answers
    questions about an image rather than only describing it. Ours trains only the connector (the LLM
    stays frozen) and only on the *attribute* questions (colour, shape, size) of the alignment
    images, with a share of stage-1 captions against forgetting. Counting, positions and relations
    stay new tasks for the federated stage, as ScienceQA is for the paper's LLaVA.
    """
    from fednano_ray.models.prompt import CHATML, PromptFormat

    t0 = time.perf_counter()
    cap_fmt = PromptFormat(
        prefix=CHATML.prefix,
        question_template="\n{question}<|im_end|>\n<|im_start|>assistant\n",
        end=CHATML.end,
    )
    features, scenes, questions = images or _alignment_images(parts, num_images, seed)
    n_img = features.shape[1]
    pad = tokenizer.pad_token_id
    qa = [
        (i, CHATML.encode(tokenizer, q["question"], q["choices"][q["answer"]], n_img, pad))
        for i, q in enumerate(questions)
        if q["category"] in INSTRUCT_CATEGORIES
    ]
    n_cap = round(len(qa) * caption_fraction / (1 - caption_fraction))
    caps = [
        (
            i,
            cap_fmt.encode(
                tokenizer, "Describe the image.", _caption(scenes[i]["objects"]), n_img, pad
            ),
        )
        for i in range(n_cap)
    ]
    connector = build_connector(FEATURE_DIM, parts.hidden_size)
    connector.load_state_dict(stage1)
    losses = _fit_connector(
        parts,
        connector,
        features,
        qa + caps,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        pad_id=pad,
        seed=seed + 1,
        desc="stage 2: instruction-tuning connector",
        precision=precision,
    )
    info = _curve_info(
        losses,
        t0,
        precision,
        version=INSTRUCT_VERSION,
        steps=steps,
        batch_size=batch_size,
        num_images=num_images,
        categories=list(INSTRUCT_CATEGORIES),
        qa_rows=len(qa),
        caption_rows=len(caps),
    )
    return {k: v.detach().contiguous() for k, v in connector.state_dict().items()}, info
