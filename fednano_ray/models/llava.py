"""LLaVA-family models (``hf`` and ``tiny`` kinds) described as :class:`MLLMParts`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fednano_ray.models.split import MLLMParts

# CLIP's normalisation, used by LLaVA-1.5's image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# llava-hf/llava-1.5-7b-hf's architecture (its config.json), so accounting needs no download.
LLAVA_15_7B: dict[str, Any] = {
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}


class LlavaVisionEncoder(nn.Module):
    """The vision tower with LLaVA's feature selection: hidden layer ``feature_layer``, CLS
    dropped."""

    def __init__(self, vision_tower: nn.Module, feature_layer: int, select_strategy: str) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy

    def forward(self, pixel_values: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, N, d_v)
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.feature_layer]
        return feats[:, 1:] if self.select_strategy == "default" else feats


def parts_from_llava(llava: nn.Module) -> MLLMParts:
    """Describe a ``LlavaForConditionalGeneration`` as MLLMParts (tensors shared, not copied)."""
    cfg = llava.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise TypeError("only a single (int) vision_feature_layer is supported, got a list")
    inner = llava.model
    lm = inner.language_model
    return MLLMParts(
        encoder=LlavaVisionEncoder(
            inner.vision_tower, cfg.vision_feature_layer, cfg.vision_feature_select_strategy
        ),
        connector=inner.multi_modal_projector,
        embed_tokens=lm.get_input_embeddings(),
        decoder=lm,
        lm_head=llava.lm_head,
    )


def num_image_tokens(config: Any) -> int:
    """Visual tokens per image of a LLaVA config (patches, minus CLS under 'default')."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n if config.vision_feature_select_strategy == "default" else n + 1


LLAVA_15_7B_ID = "llava-hf/llava-1.5-7b-hf"


def llava_config(name_or_path: str, *, offline: bool = True) -> tuple[Any, str]:
    """(``LlavaConfig``, checkpoint dtype name) of an ``hf`` model, reading only its config.

    ``offline``: never download; a local folder's ``config.json``, the built-in llava-1.5-7b
    architecture for its hub id (published in float16), or a hub id already in the Hugging Face
    cache.

    Raises:
        ValueError: when the config cannot be found locally, or describes no LLaVA model.
    """
    from transformers import AutoConfig, LlavaConfig

    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        cfg = AutoConfig.from_pretrained(str(path))
    elif offline and name_or_path == LLAVA_15_7B_ID:
        return LlavaConfig(**LLAVA_15_7B), "float16"
    else:
        try:
            cfg = AutoConfig.from_pretrained(name_or_path, local_files_only=offline)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"cannot read the config of model.name_or_path={name_or_path!r} without "
                "downloading it: pass a local folder holding the checkpoint's config.json (or "
                f"{LLAVA_15_7B_ID!r}, whose architecture is built in)"
            ) from e
    if getattr(cfg, "model_type", None) != "llava":
        raise ValueError(
            f"{name_or_path}: config.json describes a {getattr(cfg, 'model_type', '?')!r} model; "
            "model.kind 'hf' needs a LlavaForConditionalGeneration checkpoint (model_type 'llava')"
        )
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if dtype is None:
        text = getattr(cfg, "text_config", None)
        dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    return cfg, str(dtype or "float32").removeprefix("torch.")


def load_hf_llava(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Load a LLaVA checkpoint (local folder or hub id) with its processor's tokenizer.

    Raises:
        RuntimeError: naming the checkpoint and what to check when it cannot be loaded.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"could not load the LLaVA checkpoint {name_or_path!r}: {e}. model.name_or_path must "
            "be a local folder or a hub id of a LlavaForConditionalGeneration checkpoint (set "
            "HF_HUB_OFFLINE=1 to use the cache only)"
        ) from e
    return model.eval(), processor


def tiny_tokenizer():
    """A byte-level tokenizer built in code (256 bytes + chat specials); saveable, so vLLM can load
    it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<image>"],
    )


def build_tiny_llava(
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    vision_hidden_size: int = 64,
    vision_layers: int = 1,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
):
    """A random-weight LLaVA (CLIP vision tower + Llama) small enough for tests, and its
    tokenizer."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok = tiny_tokenizer()
    cfg = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
            "vocab_size": len(tok),
            "max_position_embeddings": 1024,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
        },
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.random.set_rng_state(state)
    return model, tok
