"""The aligned connector and the feature cache: keyed on model and preprocessing, shipped with a
checksum.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fednano_ray.config import load_config
from fednano_ray.models import nano, pretrained
from fednano_ray.models.nano import (
    aligned_connector,
    build_connector,
    connector_cache_path,
    connector_key,
    connector_name,
    load_shipped_connector,
    shipped_connector_path,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def _quickstart_key() -> dict:
    m = load_config(QUICKSTART).model
    return connector_key(grid=m.grid, steps=m.connector_steps, instruct_steps=m.instruct_steps)


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in build_connector(16, 8).state_dict().items()}


def _ship(folder: Path, key: dict, state: dict[str, torch.Tensor]) -> Path:
    path = folder / f"{connector_name(key)}.safetensors"
    nano._save_cached(path, state, {"key": key})
    return path


def test_key_names_the_preprocessing_model_and_recipe(monkeypatch):
    """Changing the normalisation, the recipe, the grid or a stage's steps changes the connector's
    name.
    """
    # Prepare
    base = connector_key(grid=4, steps=200, instruct_steps=100)

    # Execute
    variants = [
        connector_key(grid=3, steps=200, instruct_steps=100),
        connector_key(grid=4, steps=100, instruct_steps=100),
        connector_key(grid=4, steps=200, instruct_steps=0),
    ]
    monkeypatch.setattr(pretrained, "EFFICIENTNET_LITE_MEAN", pretrained.IMAGENET_MEAN)
    monkeypatch.setattr(pretrained, "EFFICIENTNET_LITE_STD", pretrained.IMAGENET_STD)
    variants.append(connector_key(grid=4, steps=200, instruct_steps=100))
    monkeypatch.undo()
    monkeypatch.setattr(nano, "CONNECTOR_VERSION", "nano-connector/999")
    variants.append(connector_key(grid=4, steps=200, instruct_steps=100))

    # Assert
    assert (
        base["preprocessing"]
        == "rgb224-bicubic-mean(0.4980,0.4980,0.4980)-std(0.5020,0.5020,0.5020)"
    )
    assert (
        base["llm"] == pretrained.SMOLLM2_GGUF_FILE
        and base["encoder"] == pretrained.EFFICIENTNET_WEIGHTS_FILE
    )
    names = {connector_name(k) for k in variants}
    assert len(names) == len(variants) and connector_name(base) not in names


def test_feature_cache_misses_when_the_preprocessing_changes(tmp_path, monkeypatch):
    """Features cached under one normalisation are never served for another."""
    # Prepare
    from fednano_ray.features import cached_features, feature_key
    from fednano_ray.models.build import build_mllm
    from fednano_ray.task import prepare_data

    cfg = load_config(ROOT / "examples" / "tiny.yaml")
    mllm = build_mllm(cfg.model)
    examples = prepare_data(cfg).test[:4]
    calls = []
    real = mllm.preprocess
    monkeypatch.setattr(
        type(mllm), "preprocess", lambda self, ims: calls.append(len(ims)) or real(ims)
    )

    # Execute
    key = feature_key(cfg.model, mllm)
    first = cached_features(mllm, key, examples, tmp_path)
    again = cached_features(mllm, key, examples, tmp_path)
    n_first = len(calls)
    renormalised = dataclasses.replace(mllm, mean=(0.0, 0.0, 0.0))
    other = feature_key(cfg.model, renormalised)
    cached_features(renormalised, other, examples, tmp_path)

    # Assert
    assert np.array_equal(first, again) and n_first == 1  # the second call read the cache
    assert other != key and len(calls) == 2  # another preprocessing encoded again
    assert len(list(tmp_path.glob("features-*.npy"))) == 2
    precision_only = load_config(ROOT / "examples" / "tiny.yaml", ["model.precision=bf16"]).model
    assert (
        feature_key(precision_only, build_mllm(precision_only)) == key
    )  # the encoder runs fp32 either way


def test_shipped_connector_is_checked_and_used_before_aligning(tmp_path, monkeypatch):
    """A shipped connector with a matching sha256 is loaded without aligning; a corrupt one is
    refused.
    """
    # Prepare
    monkeypatch.setattr(nano, "ASSETS_DIR", tmp_path / "assets")
    monkeypatch.setenv("FEDNANO_RAY_CACHE", str(tmp_path / "cache"))
    key = connector_key(grid=2, steps=3, instruct_steps=1)
    state = _state(0)
    path = _ship(tmp_path / "assets", key, state)

    def no_alignment(*args, **kwargs):
        raise AssertionError("aligned although a connector ships")

    monkeypatch.setattr(nano, "pretrain_connector", no_alignment)
    monkeypatch.setattr(nano, "_alignment_images", no_alignment)

    # Execute
    loaded = aligned_connector(None, None, key)
    record = json.loads(path.with_suffix(".json").read_text())
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))

    # Assert
    assert shipped_connector_path(key) == path
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert record["key"] == key and len(record["sha256"]) == 64
    with pytest.raises(RuntimeError, match="corrupt.*fednano-ray align"):
        load_shipped_connector(key)


def test_cache_wins_over_shipped_and_force_aligns_again(tmp_path, monkeypatch):
    """A user's own cached alignment is preferred; --force ignores both and aligns (stage 1 then
    2).
    """
    # Prepare
    monkeypatch.setattr(nano, "ASSETS_DIR", tmp_path / "assets")
    monkeypatch.setenv("FEDNANO_RAY_CACHE", str(tmp_path / "cache"))
    key = connector_key(grid=2, steps=3, instruct_steps=1)
    _ship(tmp_path / "assets", key, _state(0))
    nano._save_cached(connector_cache_path(key), _state(1), {"key": key})
    stages = []
    monkeypatch.setattr(nano, "_alignment_images", lambda *a: ("images",))
    monkeypatch.setattr(
        nano, "pretrain_connector", lambda *a, **k: (stages.append(1) or _state(2), {})
    )
    monkeypatch.setattr(
        nano, "instruct_connector", lambda *a, **k: (stages.append(2) or _state(3), {})
    )

    # Execute
    cached = aligned_connector(None, None, key)
    forced = aligned_connector(None, None, key, force=True)

    # Assert
    assert all(torch.equal(cached[k], _state(1)[k]) for k in cached)
    assert stages == [1, 2] and all(torch.equal(forced[k], _state(3)[k]) for k in forced)


def test_the_default_configs_connector_ships_and_matches_its_checksum():
    """The repo ships the quickstart's aligned connector, for exactly the key the code computes
    today.

    If this fails after a change of recipe, preprocessing or model, re-align and re-ship it:
    ``fednano-ray align examples/quickstart.yaml --force --out fednano_ray/assets``.
    """
    # Prepare
    key = _quickstart_key()

    # Execute
    state = load_shipped_connector(key)
    record = json.loads(shipped_connector_path(key).with_suffix(".json").read_text())

    # Assert
    assert state is not None, f"{shipped_connector_path(key).name} is not in fednano_ray/assets"
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert state["0.weight"].shape == (576, 1280) and all(
        torch.isfinite(v).all() for v in state.values()
    )
    assert record["hardware"]["cpu_model"] and record["precision"]["name"] in ("bf16", "fp32")
    assert record["loss_last20"] < record["loss_first"]  # stage 2 trained


def test_align_refuses_other_model_kinds():
    """fednano-ray align is for the nano model only, and says why."""
    # Execute / Assert
    with pytest.raises(ValueError, match="hf LLaVA checkpoint brings its own"):
        nano.align_nano(load_config(ROOT / "examples" / "tiny.yaml").model)
