"""Client shift: each client sees the world through its own imaging condition
(``data.client_shift``).

FedNano's claim is that clients adapt a shared frozen LLM to their own heterogeneous data. Non-IID
question types (the Dirichlet partition) are one kind of heterogeneity; this module adds the kind a
NanoEdge exists for: client ``c``'s images pass through condition ``conditions[c % K]`` (a colour
cast, a channel swap, inversion, blur, a mirror, sensor noise), so the pretrained model, aligned on
clean images, meets each client's images shifted. The labels keep what the scene shows (a red object
stays "red" under a channel swap); only ``mirror`` changes the geometry, and it swaps ``left`` and
``right`` in the question and every choice, which keeps each answer true for the mirrored image
(a position answer flips; a relation question asks the mirrored question). The global test gives
question ``i`` condition ``conditions[i % K]``, so it holds every client's condition.

It works on any dataset in the dataset format, not only the synthetic one: shifted images are
written once under the cache (never into the dataset), named by the source bytes, the condition and
:data:`SHIFT_VERSION`; the feature cache keys on image bytes, so shifted features never mix with
clean ones.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from fednano_ray.data.dataset import VQAExample

SHIFT_VERSION = "client-shift/1"  # bump when a condition's pixels change


def _colour_cast(img: Image.Image, seed: int) -> Image.Image:
    del seed
    a = np.asarray(img, dtype=np.float32) * np.array(
        [1.0, 0.75, 0.45], dtype=np.float32
    ) + np.array([40, 20, 0])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _channel_swap(img: Image.Image, seed: int) -> Image.Image:
    del seed
    r, g, b = img.split()
    return Image.merge("RGB", (b, g, r))


def _invert(img: Image.Image, seed: int) -> Image.Image:
    del seed
    return ImageOps.invert(img)


def _blur(img: Image.Image, seed: int) -> Image.Image:
    del seed
    return img.filter(ImageFilter.GaussianBlur(radius=max(1.0, img.width / 64)))


def _mirror(img: Image.Image, seed: int) -> Image.Image:
    del seed
    return ImageOps.mirror(img)


def _noise(img: Image.Image, seed: int) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    a = a + np.random.default_rng(seed).normal(0.0, 40.0, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


#: condition name -> (image, seed) -> image. ``mirror`` also mirrors the texts
#: (:func:`mirror_text`).
CONDITIONS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "colour_cast": _colour_cast,
    "channel_swap": _channel_swap,
    "invert": _invert,
    "blur": _blur,
    "mirror": _mirror,
    "noise": _noise,
}

_LR = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {
    "left": "right",
    "right": "left",
    "Left": "Right",
    "Right": "Left",
    "LEFT": "RIGHT",
    "RIGHT": "LEFT",
}


def mirror_text(text: str) -> str:
    """``left`` <-> ``right`` as whole words (``top-left`` -> ``top-right``), case kept."""
    return _LR.sub(lambda m: _SWAP[m.group(0)], text)


def shift_example(example: VQAExample, condition: str, out_dir: Path) -> VQAExample:
    """``example`` seen under ``condition``: its shifted image (written once under ``out_dir``) and,
    for ``mirror``, its texts mirrored.

    Raises:
        ValueError: for an unknown condition, naming the known ones.
    """
    if condition not in CONDITIONS:
        raise ValueError(
            f"unknown client-shift condition {condition!r}; use some of {sorted(CONDITIONS)}"
        )
    src = example.image.read_bytes()
    digest = hashlib.sha256(src + f"\0{condition}\0{SHIFT_VERSION}".encode()).hexdigest()
    path = out_dir / condition / f"{digest[:24]}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(example.image) as im:
            shifted = CONDITIONS[condition](im.convert("RGB"), int(digest[:8], 16))
        tmp = path.with_name(f"{path.stem}.tmp{id(shifted)}.png")
        shifted.save(tmp)
        tmp.replace(path)
    if condition != "mirror":
        return replace(example, image=path)
    choices = tuple(mirror_text(c) for c in example.choices)
    if len(set(choices)) != len(
        choices
    ):  # cannot happen for distinct choices; guard the invariant anyway
        raise ValueError(f"example {example.id}: mirroring made its choices {choices} collide")
    return replace(example, image=path, question=mirror_text(example.question), choices=choices)


def client_conditions(num_clients: int, conditions: Sequence[str]) -> list[str]:
    """Client ``c``'s condition: ``conditions[c % len(conditions)]``."""
    return [conditions[c % len(conditions)] for c in range(num_clients)]


def apply_client_shift(
    train: Sequence[VQAExample],
    test: Sequence[VQAExample],
    client_shards: Sequence[Sequence[int]],
    conditions: Sequence[str],
    out_dir: Path,
) -> tuple[list[VQAExample], list[VQAExample]]:
    """(train, test) with every training example under its client's condition and test question
    ``i`` under ``conditions[i % K]``.

    Args:
        train: the training pool; ``client_shards[c]`` are the indices client ``c`` holds (its
            training and held-out examples), disjoint across clients.
        test: the global test split.
        conditions: the K conditions, client ``c`` gets ``conditions[c % K]``.
        out_dir: where shifted images are written (a cache folder, not the dataset).
    """
    if not conditions:
        raise ValueError("apply_client_shift needs at least one condition")
    per_client = client_conditions(len(client_shards), conditions)
    out_train = list(train)
    for c, shard in enumerate(client_shards):
        for i in shard:
            out_train[i] = shift_example(train[i], per_client[c], out_dir)
    out_test = [
        shift_example(ex, conditions[i % len(conditions)], out_dir) for i, ex in enumerate(test)
    ]
    return out_train, out_test
