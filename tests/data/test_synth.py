"""The synthetic benchmark: valid format, deterministic, unambiguous, harder than one object."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fednano_ray.data import load_dataset, open_image
from fednano_ray.data.synth import (
    CATEGORIES,
    COLOURS,
    GENERATOR_VERSION,
    NUMBERS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    generate,
)

SIZE = 128
VOCAB = {
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "count": set(NUMBERS),
    "position": set(POSITIONS),
    "size": set(SIZES),
    "relation": set(RELATIONS),
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(
        tmp_path_factory.mktemp("synth"),
        num_train=240,
        num_test=60,
        image_size=SIZE,
        difficulty="hard",
    )


@pytest.fixture(scope="module")
def easy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("easy"), num_train=240, num_test=60, image_size=SIZE)


def test_easy_scenes_hold_one_object_and_answers_match_it(easy: Path) -> None:
    """easy (the default): one object per question (two for relations), counts 1-4 of one kind
    only.
    """
    assert json.loads((easy / "info.json").read_text())["difficulty"] == "easy"
    seen = set()
    for row, scene in _examples(easy):
        objects, cat, answer = scene["objects"], row["category"], row["choices"][row["answer"]]
        seen.add(cat)
        if cat in ("colour", "shape", "size"):
            assert len(objects) == 1 and objects[0][cat] == answer
        elif cat == "position":
            assert len(objects) == 1 and scene["region"] == answer
        elif cat == "relation":
            assert len(objects) == 2 and scene["relation"] == answer
        else:  # count: every object is of the counted kind, and the choices are one..four
            assert len(objects) == scene["count"] == NUMBERS.index(answer) + 1 <= 4
            assert sorted(row["choices"]) == sorted(NUMBERS[:4])
            assert _matching(objects, scene["filter"]) == list(range(len(objects)))
    assert seen == set(CATEGORIES)


def test_unknown_difficulty_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="difficulty must be one of easy, hard"):
        generate(tmp_path, num_train=10, num_test=10, difficulty="medium")


def _rows(folder: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines() if line]


def _examples(bench: Path, split: str = "train") -> list[tuple[dict[str, Any], dict[str, Any]]]:
    data, scenes = _rows(bench / split, "data.jsonl"), _rows(bench / split, "scenes.jsonl")
    assert [d["id"] for d in data] == [s["id"] for s in scenes]
    return list(zip(data, scenes, strict=True))


def _phrase(ref: dict[str, str]) -> str:
    words = [ref[k] for k in ("size", "colour") if k in ref]
    return "the " + " ".join([*words, ref.get("shape", "object")])


def _matching(objects: list[dict[str, Any]], ref: dict[str, str]) -> list[int]:
    return [i for i, o in enumerate(objects) if all(o[k] == v for k, v in ref.items())]


def test_loads_with_strict_loader_and_info(bench: Path) -> None:
    data = load_dataset(bench)
    assert len(data["train"]) == 240 and len(data["test"]) == 60
    info = json.loads((bench / "info.json").read_text())
    assert info["generator"] == GENERATOR_VERSION and info["seed"] == 0
    for split in ("train", "test"):
        counts = Counter(e.category for e in data[split])
        assert counts == Counter(info["splits"][split]["categories"])
        assert set(counts) == set(CATEGORIES)
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced


def test_answers_are_plain_words_from_the_vocabulary(bench: Path) -> None:
    for split in ("train", "test"):
        for row, _ in _examples(bench, split):
            cat = row["category"]
            for choice in row["choices"]:
                assert re.fullmatch(r"[a-z]+", choice), choice
                assert choice in VOCAB[cat]
            assert len(set(row["choices"])) == len(row["choices"])
            assert len(row["choices"]) == (2 if cat == "size" else 4)
            assert 0 <= row["answer"] < len(row["choices"])


def test_answer_position_is_shuffled(bench: Path) -> None:
    positions = Counter(row["answer"] for row, _ in _examples(bench) if len(row["choices"]) == 4)
    assert set(positions) == {0, 1, 2, 3}
    assert min(positions.values()) > 0.15 * sum(positions.values())


def test_questions_are_unambiguous_and_answers_correct(bench: Path) -> None:
    for row, scene in _examples(bench) + _examples(bench, "test"):
        objects, cat, q = scene["objects"], row["category"], row["question"]
        answer = row["choices"][row["answer"]]
        if cat == "count":
            ((key, value),) = scene["filter"].items()
            noun = value if key == "colour" else None
            assert (noun or value) in q
            assert len(_matching(objects, scene["filter"])) == NUMBERS.index(answer) + 1
            continue
        target = scene["target"]
        assert _matching(objects, scene["ref"]) == [target], (row["id"], q)
        assert _phrase(scene["ref"]) in q
        obj = objects[target]
        if cat in ("colour", "shape", "size"):
            assert cat not in scene["ref"]  # never refer to the object by the asked attribute
            assert obj[cat] == answer
        elif cat == "position":
            dx, dy = obj["x"] - SIZE / 2, obj["y"] - SIZE / 2
            if answer == "middle":
                assert max(abs(dx), abs(dy)) <= 0.1 * SIZE
            else:
                horizontal = abs(dx) > SIZE / 6 and abs(dx) > 2 * abs(dy)
                vertical = abs(dy) > SIZE / 6 and abs(dy) > 2 * abs(dx)
                expected = {
                    "left": horizontal and dx < 0,
                    "right": horizontal and dx > 0,
                    "top": vertical and dy < 0,
                    "bottom": vertical and dy > 0,
                }
                assert expected[answer], (row["id"], answer, dx, dy)
        elif cat == "relation":
            anchor = scene["anchor"]
            assert _matching(objects, scene["anchor_ref"]) == [anchor]
            assert _phrase(scene["anchor_ref"]) in q
            dx = obj["x"] - objects[anchor]["x"]
            dy = obj["y"] - objects[anchor]["y"]
            expected = {
                "left": dx < 0 and abs(dx) >= 2 * abs(dy),
                "right": dx > 0 and abs(dx) >= 2 * abs(dy),
                "above": dy < 0 and abs(dy) >= 2 * abs(dx),
                "below": dy > 0 and abs(dy) >= 2 * abs(dx),
            }
            assert expected[answer], (row["id"], answer, dx, dy)


def test_scenes_are_multi_object_non_overlapping_and_in_bounds(bench: Path) -> None:
    counts_seen = set()
    for row, scene in _examples(bench):
        objects = scene["objects"]
        limit = 9 if row["category"] == "count" else 5
        assert 2 <= len(objects) <= limit
        for o in objects:
            assert o["r"] - 0.02 <= o["x"] <= SIZE - o["r"] + 0.02
            assert o["r"] - 0.02 <= o["y"] <= SIZE - o["r"] + 0.02
        for a, b in combinations(objects, 2):
            assert np.hypot(a["x"] - b["x"], a["y"] - b["y"]) > a["r"] + b["r"]
        sizes = {o["size"]: o["r"] for o in objects}
        if len(sizes) == 2:
            assert sizes["big"] > 1.5 * sizes["small"]
        if row["category"] == "count":
            counts_seen.add(row["choices"][row["answer"]])
    assert {"four", "five", "six"} <= counts_seen  # counts beyond three


def test_images_decode_at_size(bench: Path) -> None:
    for example in load_dataset(bench)["test"][:12]:
        with example.image.open("rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        img = open_image(example.image, SIZE)
        assert img.size == (SIZE, SIZE)
        assert np.asarray(img).std() > 10  # not blank


def test_category_styles_differ(bench: Path) -> None:
    """Background style identifies the category: nearest-centroid on the median colour works."""
    feats, cats = [], []
    for example in load_dataset(bench)["train"]:
        pixels = np.asarray(open_image(example.image, 32), dtype=np.float64).reshape(-1, 3)
        feats.append(np.median(pixels, axis=0))
        cats.append(example.category)
    feats_arr = np.array(feats)
    centroids = {c: feats_arr[[k == c for k in cats]].mean(axis=0) for c in CATEGORIES}
    names = list(centroids)
    dists = np.stack([np.linalg.norm(feats_arr - centroids[c], axis=1) for c in names], axis=1)
    predicted = [names[i] for i in dists.argmin(axis=1)]
    accuracy = np.mean([p == c for p, c in zip(predicted, cats, strict=True)])
    assert accuracy > 0.8


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    kwargs = {"num_train": 18, "num_test": 6, "image_size": 64}
    a = _files(generate(tmp_path / "a", seed=7, **kwargs))
    b = _files(generate(tmp_path / "b", seed=7, **kwargs))
    c = _files(generate(tmp_path / "c", seed=8, **kwargs))
    assert a == b
    assert "train/data.jsonl" in a and "train/images/train-00000.png" in a
    assert sum(k.endswith(".png") for k in a) == 24
    assert a["train/data.jsonl"] != c["train/data.jsonl"]
    assert a["test/data.jsonl"] != c["test/data.jsonl"]
    differing = [k for k in a if k.endswith(".png") and a[k] != c.get(k)]
    assert len(differing) == 24


def test_train_and_test_differ(bench: Path) -> None:
    train = {r["question"] + str(r["choices"]) for r, _ in _examples(bench)}
    test = {r["question"] + str(r["choices"]) for r, _ in _examples(bench, "test")}
    assert len(test - train) > len(test) // 2
    assert (bench / "train/images/train-00000.png").read_bytes() != (
        bench / "test/images/test-00000.png"
    ).read_bytes()


def test_tiny_images_still_work(tmp_path: Path) -> None:
    root = generate(tmp_path, num_train=30, num_test=12, image_size=16, seed=1)
    data = load_dataset(root)
    assert {e.category for e in data["train"]} == set(CATEGORIES)
    assert open_image(data["train"][0].image, 16).size == (16, 16)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"num_train": 0}, ValueError, "num_train"),
        ({"num_test": -1}, ValueError, "num_test"),
        ({"image_size": 8}, ValueError, "image_size"),
        ({"image_size": 64.0}, TypeError, "image_size"),
        ({"seed": "0"}, TypeError, "seed"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, Any], error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        generate(tmp_path, **kwargs)
