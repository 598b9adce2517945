"""Export the frozen server LLM as a standalone Hugging Face causal-LM folder.

Serving engines (vLLM, or the Hugging Face engine in :mod:`fednano_ray.serve.engines`) load a plain
causal-LM checkpoint: ``config.json``, ``model.safetensors``, the tokenizer files and
``generation_config.json``. The split MLLM holds the LLM as parts (``embed_tokens``, ``decoder``,
``lm_head``); :func:`export_llm` writes those parts back as a ``*ForCausalLM`` folder.

* ``nano``: the LLM already is such a folder (:func:`fednano_ray.models.pretrained.smollm2_dir`),
  returned as is — nothing is copied.
* ``tiny`` and ``hf`` (LLaVA family): a fresh ``AutoModelForCausalLM`` is built from the decoder's
  config (LLaVA's ``text_config``), the decoder's weights are loaded under ``model.*`` and the LM
  head under ``lm_head.weight``, and the result is saved with the tokenizer.

The export is deterministic and idempotent: a marker file written last records a fingerprint of the
weights, and a later call with the same model returns the folder without writing anything.

Example:
    >>> mllm = build_mllm(load_config("examples/tiny.yaml").model)   # doctest: +SKIP
    >>> model_dir = export_llm(mllm, "/tmp/tiny-llm")                  # doctest: +SKIP
    >>> LLMServer(str(model_dir), engine="vllm")                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fednano_ray.models.build import MLLM

__all__ = ["EXPORT_MARKER", "export_llm", "is_exported", "weights_fingerprint"]

#: Written last into a finished export; holds the fingerprint of the exported weights.
EXPORT_MARKER = "fednano_ray_export.json"
_EXPORT_FORMAT = 1


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap, deterministic fingerprint of a state dict.

    Hashes every tensor's name, dtype and shape, its first and last 1,024 values and its float64
    sum, so changing any weight noticeably changes the fingerprint without hashing gigabytes.

    Args:
        state: Tensor name -> tensor.

    Returns:
        A hex SHA-256 digest.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t[:1024].float().numpy().tobytes())
        h.update(t[-1024:].float().numpy().tobytes())
        h.update(repr(float(t.double().sum())).encode())
    return h.hexdigest()


def is_exported(out_dir: str | os.PathLike[str], fingerprint: str | None = None) -> bool:
    """Tells whether ``out_dir`` holds a finished export (of the given fingerprint, if any).

    Args:
        out_dir: Export folder.
        fingerprint: Expected :func:`weights_fingerprint`; None accepts any finished export.

    Returns:
        True if the marker is present (and matches) and the weights and config exist.
    """
    out = Path(out_dir)
    marker = out / EXPORT_MARKER
    if not (marker.is_file() and (out / "config.json").is_file()):
        return False
    if not any(out.glob("*.safetensors")):
        return False
    if fingerprint is None:
        return True
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and meta.get("format") == _EXPORT_FORMAT


def _is_nano(mllm: MLLM) -> bool:
    return mllm.name.startswith("nano") and mllm.tokenizer is not None


def _causal_lm_state(mllm: MLLM) -> tuple[dict[str, torch.Tensor], bool]:
    """The ``*ForCausalLM`` state dict of the MLLM's LLM, and whether the head is tied."""
    parts = mllm.parts
    state = {f"model.{k}": v for k, v in parts.decoder.state_dict().items()}
    if "model.embed_tokens.weight" not in state:  # a decoder that keeps its table elsewhere
        state["model.embed_tokens.weight"] = parts.embed_tokens.weight
    head = parts.lm_head.weight
    tied = head.data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    state["lm_head.weight"] = head  # when tied, the same tensor: save_pretrained writes it once
    return {k: v.detach() for k, v in state.items()}, tied


def _generation_config(tokenizer: Any, config: Any) -> Any:
    from transformers import GenerationConfig

    def pick(name: str) -> int | None:
        value = getattr(tokenizer, name, None)
        return int(value) if value is not None else getattr(config, name, None)

    return GenerationConfig(
        bos_token_id=pick("bos_token_id"),
        eos_token_id=pick("eos_token_id"),
        pad_token_id=pick("pad_token_id"),
    )


def _write_export(mllm: MLLM, target: Path, state: dict[str, torch.Tensor], tied: bool) -> None:
    """Builds the causal LM from the decoder's config, loads ``state``, saves it into ``target``."""
    from transformers import AutoModelForCausalLM

    config = mllm.parts.decoder.config.__class__.from_dict(mllm.parts.decoder.config.to_dict())
    config.tie_word_embeddings = tied
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(mllm.tokenizer, name, None)
        if value is not None:
            setattr(config, name, int(value))
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):  # no random init: every saved tensor comes from ``state``
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.tie_weights()
    model.eval()
    model.generation_config = _generation_config(mllm.tokenizer, config)
    model.save_pretrained(str(target), safe_serialization=True)
    mllm.tokenizer.save_pretrained(str(target))


def export_llm(mllm: MLLM, out_dir: str | os.PathLike[str]) -> Path:
    """Writes the MLLM's frozen LLM as a Hugging Face causal-LM folder that vLLM can load.

    Args:
        mllm: A built MLLM (:func:`fednano_ray.models.build.build_mllm`).
        out_dir: Folder to write (created; its parent must be writable). Unused for the ``nano``
            model, whose LLM already is a saved folder.

    Returns:
        The folder to load: ``smollm2_dir()`` for ``nano``, else ``out_dir``.

    Raises:
        ValueError: If the MLLM has no tokenizer to save with the weights.
    """
    if _is_nano(mllm):
        from fednano_ray.models.pretrained import smollm2_dir

        return smollm2_dir()
    if mllm.tokenizer is None:
        raise ValueError(
            f"cannot export {mllm.name!r}: it has no tokenizer (random-weight nano build?)"
        )
    final = Path(out_dir).expanduser().resolve()
    state, tied = _causal_lm_state(mllm)
    fingerprint = weights_fingerprint(state)
    if is_exported(final, fingerprint):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o755)
        _write_export(mllm, tmp, state, tied)
        meta = {
            "format": _EXPORT_FORMAT,
            "source": mllm.name,
            "fingerprint": fingerprint,
            "tied_word_embeddings": tied,
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
