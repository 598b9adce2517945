"""Build any model kind (nano, hf, tiny) into one bundle: parts, tokenizer, prompt,
preprocessing."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from fednano_ray.config import AdapterConfig, ModelConfig
from fednano_ray.models.prompt import CHATML, LLAVA, PromptFormat
from fednano_ray.models.split import MLLMParts, NanoEdge, ServerLLM, split_mllm


@dataclass
class MLLM:
    """A multimodal LLM ready to split: its parts plus everything needed to feed it."""

    name: str
    parts: MLLMParts
    tokenizer: object
    prompt: PromptFormat
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_image_tokens: int
    image_token_id: int
    #: The dtype of the published checkpoint, at which accounting counts the frozen bytes (the
    #: tensors here may be held in another: ``hf`` models load in float32).
    dtype: str = "float32"

    @property
    def preprocessing(self) -> str:
        """Names :meth:`preprocess` (size, resampling, mean, std) for cache keys."""
        from fednano_ray.models.nano import preprocessing_id

        return preprocessing_id(self.image_size, self.mean, self.std)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images -> normalised pixels (B, 3, S, S)."""
        s = self.image_size
        arr = torch.stack(
            [
                torch.frombuffer(
                    bytearray(im.convert("RGB").resize((s, s), Image.BICUBIC).tobytes()),
                    dtype=torch.uint8,
                )
                for im in images
            ]
        )
        px = arr.view(len(images), s, s, 3).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (px - mean) / std

    def encode_row(
        self, question: str, answer: str | None
    ) -> tuple[list[int], list[int], list[bool]]:
        return self.prompt.encode(
            self.tokenizer, question, answer, self.num_image_tokens, self.image_token_id
        )

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def split(
        self,
        adapter: AdapterConfig,
        *,
        r: int | None = None,
        autocast_bf16: bool = False,
        seed: int | None = 0,
    ) -> tuple[NanoEdge, ServerLLM]:
        return split_mllm(
            self.parts,
            r=r or adapter.r,
            scaling=adapter.scaling,  # one scaling for every tier rank r
            dropout=adapter.dropout,
            modalities=adapter.modalities,
            autocast_bf16=autocast_bf16,
            seed=seed,
            train_a=adapter.factors != "frozen_a",
            kind=adapter.kind,
            slots=self.num_image_tokens,
        )

    def with_llm_lora(
        self,
        adapter: AdapterConfig,
        *,
        r: int | None = None,
        autocast_bf16: bool = False,
        seed: int | None = 0,
    ) -> tuple[NanoEdge, ServerLLM, dict[str, nn.Parameter]]:
        """``fedavg-lora``'s whole MLLM: (edge without NanoAdapters, this model's own LLM with PEFT
        LoRA on ``adapter.lora_target_modules``, the LoRA parameters by state key).

        The edge computes the LLM's input embeddings from frozen parts only; the LLM's backward
        fills the LoRA grads (:meth:`ServerLLM.loss_and_grad`). The decoder is changed in place, so
        never call this on the cached :func:`build_mllm`.
        """
        from fednano_ray.models.lora import inject_llm_lora

        edge, llm = split_mllm(
            self.parts, r=1, scaling=1.0, modalities=(), autocast_bf16=autocast_bf16
        )  # r: unused
        # Inject after the split: ServerLLM freezes its decoder, LoRA injected before would be
        # frozen too.
        # The same scaling on every tier (PEFT's lora_alpha becomes
        # adapter.lora_alpha * r / adapter.r).
        params = inject_llm_lora(
            llm.decoder,
            r=r or adapter.r,
            scaling=adapter.scaling,
            dropout=adapter.dropout,
            target_modules=adapter.lora_target_modules,
            seed=seed,
        )
        return edge, llm, params


@functools.lru_cache(maxsize=4)
def build_mllm(cfg: ModelConfig, device: str | None = None) -> MLLM:
    """Build (once per process, config and device) the MLLM a config names: the one way a client
    model, the server LLM and the accounting get their model.

    Args:
        cfg: the ``model`` section.
        device: ``None`` loads the weights (downloads for a hub ``hf`` model); ``"meta"`` builds the
            architecture only, reading and downloading nothing (``fednano-ray inspect``): shapes are
            exact, there are no values, and ``nano``/``hf`` get no tokenizer.

    Raises:
        ValueError: for a ``device`` other than ``None`` or ``"meta"``, or (on meta) an ``hf`` model
            whose config is not available locally.
    """
    if device is not None and device != "meta":
        raise ValueError(
            f"build_mllm(device={device!r}): pass None (load the weights) or 'meta' (shapes only)"
        )
    meta = device == "meta"
    from fednano_ray.models import llava as L

    if cfg.kind == "tiny":
        t = cfg.tiny
        with torch.device("meta") if meta else contextlib.nullcontext():
            model, tok = L.build_tiny_llava(**t.model_dump())
        return MLLM(
            name="tiny-llava",
            parts=L.parts_from_llava(model),
            tokenizer=tok,
            prompt=CHATML,
            image_size=t.image_size,
            mean=L.CLIP_MEAN,
            std=L.CLIP_STD,
            num_image_tokens=L.num_image_tokens(model.config),
            image_token_id=model.config.image_token_index,
        )
    if cfg.kind == "hf":
        name = str(cfg.name_or_path)
        hf_cfg, dtype = L.llava_config(name, offline=meta)
        if meta:
            from transformers import LlavaForConditionalGeneration

            with torch.device("meta"):
                model = LlavaForConditionalGeneration(hf_cfg)
            size, mean, std, tok = hf_cfg.vision_config.image_size, L.CLIP_MEAN, L.CLIP_STD, None
        else:
            model, processor = L.load_hf_llava(name)
            ip, tok = processor.image_processor, processor.tokenizer
            size = (
                ip.crop_size["height"]
                if getattr(ip, "crop_size", None)
                else model.config.vision_config.image_size
            )
            mean, std = tuple(ip.image_mean), tuple(ip.image_std)
        return MLLM(
            name=name,
            parts=L.parts_from_llava(model),
            tokenizer=tok,
            prompt=LLAVA,
            image_size=int(size),
            mean=mean,
            std=std,
            num_image_tokens=L.num_image_tokens(model.config),
            image_token_id=model.config.image_token_index,
            dtype=dtype,
        )
    from fednano_ray.models.nano import nano_parts
    from fednano_ray.models.pretrained import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD

    if meta:
        try:
            with torch.device("meta"):
                parts, tok = nano_parts(pretrained=False, grid=cfg.grid)
        except Exception:  # noqa: BLE001 - a layer that cannot be built on meta: random weights, same shapes
            parts, tok = nano_parts(pretrained=False, grid=cfg.grid)
    else:
        parts, tok = nano_parts(
            grid=cfg.grid,
            connector_steps=cfg.connector_steps,
            instruct_steps=cfg.instruct_steps,
            precision=cfg.precision,
        )
    return MLLM(
        name="nano (EfficientNet-Lite0 + SmolLM2-135M-Instruct)",
        parts=parts,
        tokenizer=tok,
        prompt=CHATML,
        image_size=224,
        mean=tuple(EFFICIENTNET_LITE_MEAN),  # the Lite checkpoints' (x - 127) / 128, not ImageNet's
        std=tuple(EFFICIENTNET_LITE_STD),
        num_image_tokens=cfg.grid**2,
        image_token_id=int(tok.pad_token_id)
        if tok is not None
        else -1,  # -1: on meta, no tokenizer
    )
