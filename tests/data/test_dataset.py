"""The dataset loader: valid splits load, every malformed input is a DatasetError naming
file:line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fednano_ray.data import DatasetError, VQAExample, load_dataset, load_split, open_image


def _png(path: Path, colour: tuple[int, int, int] = (200, 10, 10), size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _item(i: int = 0, **overrides: Any) -> dict[str, Any]:
    item = {
        "id": f"q{i}",
        "image": "images/a.png",
        "question": "What colour is the square?",
        "choices": ["red", "green", "blue", "yellow"],
        "answer": 0,
        "category": "colour",
    }
    item.update(overrides)
    return item


def _split(folder: Path, lines: list[str | dict[str, Any]]) -> Path:
    """Write ``folder/data.jsonl`` (dicts as JSON, strings verbatim) and ``images/a.png``."""
    _png(folder / "images" / "a.png")
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (folder / "data.jsonl").write_text(text + "\n", encoding="utf-8")
    return folder


def test_valid_split_loads(tmp_path: Path) -> None:
    _png(tmp_path / "s" / "images" / "b.jpg.png", (0, 0, 255))
    no_cat = _item(1, image="images/b.jpg.png", answer=2)
    del no_cat["category"]
    folder = _split(tmp_path / "s", [_item(0), "", "   ", no_cat, _item(2, category=None)])
    examples = load_split(folder)
    assert [e.id for e in examples] == ["q0", "q1", "q2"]
    first = examples[0]
    assert isinstance(first, VQAExample)
    assert first.image.is_absolute() and first.image == (folder / "images" / "a.png").absolute()
    assert first.choices == ("red", "green", "blue", "yellow")
    assert first.answer == 0 and first.answer_text == "red"
    assert first.category == "colour"
    assert examples[1].category is None and examples[1].answer_text == "blue"
    assert examples[2].category is None
    with pytest.raises(AttributeError):
        first.answer = 1  # type: ignore[misc]  # frozen


def test_utf8_bom_and_unicode_text_are_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    _png(folder / "images" / "a.png")
    line = json.dumps(_item(0, question="Quelle couleur a le carré ?"), ensure_ascii=False)
    (folder / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode("utf-8") + b"\n")
    assert load_split(folder)[0].question == "Quelle couleur a le carré ?"


BAD_LINES: list[tuple[str, str | dict[str, Any], str]] = [
    ("malformed json", '{"id": "q1", "image": ', "malformed JSON"),
    ("non-object", "[1, 2, 3]", "expected a JSON object"),
    ("string line", '"hello"', "expected a JSON object"),
    ("missing field", {k: v for k, v in _item(1).items() if k != "answer"}, "'answer'"),
    ("missing two", {"id": "q1", "image": "images/a.png", "question": "x"}, "'choices', 'answer'"),
    ("unknown field", _item(1, hint="look left"), "unknown field(s) 'hint'"),
    ("id not str", _item(1, id=7), "field 'id' must be a string, got int"),
    ("empty id", _item(1, id="  "), "field 'id' is empty"),
    ("question not str", _item(1, question=["a"]), "field 'question' must be a string"),
    ("empty question", _item(1, question=""), "field 'question' is empty"),
    ("image not str", _item(1, image=None), "field 'image' must be a string, got null"),
    ("choices not list", _item(1, choices="red,green"), "field 'choices' must be a list"),
    ("one choice", _item(1, choices=["red"]), "at least 2"),
    ("no choices", _item(1, choices=[]), "at least 2"),
    ("choice not str", _item(1, choices=["red", 3]), "choice 1 must be a string, got int"),
    ("empty choice", _item(1, choices=["red", " "]), "choice 1 is empty"),
    ("duplicate choice", _item(1, choices=["red", "blue", "red"]), "duplicates choice 0"),
    ("answer bool", _item(1, answer=True), "must be an integer index"),
    ("answer str", _item(1, answer="0"), "must be an integer index"),
    ("answer float", _item(1, answer=1.0), "must be an integer index"),
    ("answer range", _item(1, answer=5), "answer index 5 is out of range for 4 choices (use 0..3)"),
    ("answer negative", _item(1, answer=-1), "answer index -1 is out of range"),
    ("category int", _item(1, category=3), "field 'category' must be a string"),
    ("duplicate id", _item(0), "duplicate id 'q0' (first used on line 1)"),
    ("missing image", _item(1, image="images/nope.png"), "'images/nope.png' does not exist"),
    ("image is dir", _item(1, image="images"), "is not a file"),
    ("parent escape", _item(1, image="../outside.png"), "escapes the split folder"),
    ("nested escape", _item(1, image="images/../../outside.png"), "escapes the split folder"),
    ("absolute", _item(1, image="/etc/passwd"), "is absolute"),
    ("windows absolute", _item(1, image="C:\\img\\a.png"), "is absolute"),
]


@pytest.mark.parametrize(
    ("bad", "expected"), [(b, e) for _, b, e in BAD_LINES], ids=[n for n, _, _ in BAD_LINES]
)
def test_bad_line_names_file_and_line(tmp_path: Path, bad: str | dict[str, Any], expected: str):
    _png(tmp_path / "outside.png")  # exists, so escaping paths fail for escaping, not for missing
    folder = _split(tmp_path / "split", [_item(0), "", bad, _item(9)])
    with pytest.raises(DatasetError) as info:
        load_split(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / 'data.jsonl'}:3: "), message
    assert expected in message
    assert info.value.line == 3
    assert info.value.path == folder / "data.jsonl"


def test_error_names_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _split(tmp_path / "data" / "train", [_item(0, answer=5)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"^data/train/data\.jsonl:1: answer index 5"):
        load_split("data/train")


def test_invalid_utf8_line(tmp_path: Path) -> None:
    folder = _split(tmp_path / "s", [_item(0)])
    with (folder / "data.jsonl").open("ab") as f:
        f.write(b'{"id": "\xff\xfe"}\n')
    with pytest.raises(DatasetError, match=r"data\.jsonl:2: not valid UTF-8"):
        load_split(folder)


def test_missing_data_file_says_what_folder_should_contain(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as info:
        load_split(tmp_path / "empty")
    message = str(info.value)
    assert str(tmp_path / "empty" / "data.jsonl") in message
    assert "must contain data.jsonl" in message and "image files" in message


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="split folder does not exist"):
        load_split(tmp_path / "nowhere")


def test_empty_data_file(tmp_path: Path) -> None:
    folder = _split(tmp_path / "s", ["", "  "])
    with pytest.raises(DatasetError, match=r"data\.jsonl: contains no examples"):
        load_split(folder)


def test_dataset_error_is_value_error() -> None:
    assert issubclass(DatasetError, ValueError)


def test_load_dataset_reads_both_splits(tmp_path: Path) -> None:
    _split(tmp_path / "train", [_item(0), _item(1)])
    _split(tmp_path / "test", [_item(0)])
    data = load_dataset(tmp_path)
    assert set(data) == {"train", "test"}
    assert [len(data["train"]), len(data["test"])] == [2, 1]


@pytest.mark.parametrize("missing", ["train", "test"])
def test_load_dataset_names_missing_split(tmp_path: Path, missing: str) -> None:
    present = "test" if missing == "train" else "train"
    _split(tmp_path / present, [_item(0)])
    with pytest.raises(DatasetError, match=f"missing split folder\\(s\\) '{missing}'"):
        load_dataset(tmp_path)


def test_load_dataset_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset root does not exist"):
        load_dataset(tmp_path / "nope")


def test_load_dataset_propagates_line_errors(tmp_path: Path) -> None:
    _split(tmp_path / "train", [_item(0)])
    _split(tmp_path / "test", [_item(0), _item(1, answer=4)])
    with pytest.raises(DatasetError, match=r"test[/\\]data\.jsonl:2: answer index 4"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_open_image_returns_rgb_square(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"img_{mode}.png"
    Image.new(mode, (40, 20)).save(path)
    img = open_image(path, 32)
    assert img.mode == "RGB" and img.size == (32, 32)


def test_open_image_keeps_content(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    _png(path, (250, 0, 0), size=16)
    assert open_image(path, 16).getpixel((8, 8)) == (250, 0, 0)


def test_open_image_undecodable_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=f"^{re.escape(str(bad))}: cannot decode image"):
        open_image(bad, 32)
    truncated = tmp_path / "trunc.png"
    _png(truncated, size=64)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DatasetError, match="trunc.png: cannot decode image"):
        open_image(truncated, 32)


def test_open_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="image file not found"):
        open_image(tmp_path / "gone.png", 32)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_open_image_bad_size(tmp_path: Path, size: object) -> None:
    path = tmp_path / "a.png"
    _png(path)
    with pytest.raises(ValueError, match="size"):
        open_image(path, size)  # type: ignore[arg-type]
