"""The on-disk VQA dataset format (DESIGN.md §4) and its strict loader.

A split is a folder holding ``data.jsonl`` plus the image files it names; one JSON object per line::

    {"id": "q1", "image": "images/q1.png", "question": "What colour is the square?",
     "choices": ["red", "blue", "green", "yellow"], "answer": 1, "category": "colour"}

A dataset root holds one split per folder: ``ROOT/train/`` and ``ROOT/test/``.

Every problem found while loading is reported as a :class:`DatasetError` whose message names the
file, the line and how to fix it, never as a traceback from deep inside the loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image, UnidentifiedImageError

__all__ = [
    "DATA_FILE",
    "SPLITS",
    "DatasetError",
    "VQAExample",
    "load_dataset",
    "load_split",
    "open_image",
]

DATA_FILE = "data.jsonl"
"""Name of the index file inside every split folder."""

SPLITS = ("train", "test")
"""Split folders a dataset root must hold."""

_REQUIRED = ("id", "image", "question", "choices", "answer")
_OPTIONAL = ("category",)
_FIELDS = _REQUIRED + _OPTIONAL


class DatasetError(ValueError):
    """A dataset on disk is missing or malformed.

    Attributes:
        path: The offending file or folder, when known.
        line: The 1-based line number inside ``path``, when the problem is on one line.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.line = line


@dataclass(frozen=True)
class VQAExample:
    """One multiple-choice visual question.

    Attributes:
        id: Identifier, unique within its split.
        image: Absolute path of the image file.
        question: The question text.
        choices: Candidate answers as texts (at least two, all distinct).
        answer: Index of the correct choice in ``choices``.
        category: Optional question category (e.g. ``"colour"``); used by partitioners and reports.
    """

    id: str
    image: Path
    question: str
    choices: tuple[str, ...]
    answer: int
    category: str | None = None

    @property
    def answer_text(self) -> str:
        """The text of the correct choice."""
        return self.choices[self.answer]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _at(file: Path, line: int, message: str) -> DatasetError:
    return DatasetError(f"{file}:{line}: {message}", path=file, line=line)


def _string_field(obj: dict[str, Any], key: str, file: Path, line: int) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _at(
            file,
            line,
            f"field '{key}' must be a string, got {_type_name(value)} ({value!r}); "
            f"write it as a JSON string in double quotes",
        )
    if not value.strip():
        raise _at(file, line, f"field '{key}' is empty; give it a non-empty string")
    return value


def _check_image_path(raw: str, folder: Path, file: Path, line: int) -> Path:
    posix, windows = PurePosixPath(raw), PureWindowsPath(raw)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or raw.startswith(("/", "\\")):
        raise _at(
            file,
            line,
            f"image path '{raw}' is absolute; write it relative to the split folder {folder} "
            f"(e.g. 'images/{posix.name}')",
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise _at(
            file,
            line,
            f"image path '{raw}' escapes the split folder with '..'; keep images inside {folder} "
            f"and write the path relative to it",
        )
    path = folder / raw
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise _at(
            file,
            line,
            f"image file '{raw}' {what} (looked for {path.absolute()}); "
            f"image paths are relative to the split folder {folder}",
        )
    return path.absolute()


def _parse_example(
    obj: Any, folder: Path, file: Path, line: int
) -> tuple[str, str, str, tuple[str, ...], int, str | None]:
    if not isinstance(obj, dict):
        raise _at(
            file,
            line,
            f"expected a JSON object ({{...}}) with fields {', '.join(_REQUIRED)}, "
            f"got {_type_name(obj)}; write one object per line",
        )
    missing = [key for key in _REQUIRED if key not in obj]
    if missing:
        raise _at(
            file,
            line,
            f"missing required field(s) {', '.join(repr(k) for k in missing)}; every line needs "
            f"{', '.join(_REQUIRED)} (and may have category)",
        )
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise _at(
            file,
            line,
            f"unknown field(s) {', '.join(repr(k) for k in unknown)}; allowed fields are "
            f"{', '.join(_FIELDS)} (fold extra context into 'question' or drop it)",
        )

    ex_id = _string_field(obj, "id", file, line)
    image = _string_field(obj, "image", file, line)
    question = _string_field(obj, "question", file, line)

    choices = obj["choices"]
    if not isinstance(choices, list):
        raise _at(
            file,
            line,
            f"field 'choices' must be a list of strings, got {_type_name(choices)}; "
            f'write e.g. "choices": ["red", "blue"]',
        )
    if len(choices) < 2:
        raise _at(
            file,
            line,
            f"field 'choices' has {len(choices)} entr{'y' if len(choices) == 1 else 'ies'}; "
            f"a multiple-choice question needs at least 2",
        )
    seen: dict[str, int] = {}
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise _at(
                file,
                line,
                f"choice {i} must be a string, got {_type_name(choice)} ({choice!r}); "
                f"quote it (answers are scored as texts)",
            )
        key = choice.strip()
        if not key:
            raise _at(file, line, f"choice {i} is empty; every choice needs a non-empty text")
        if key in seen:
            raise _at(
                file,
                line,
                f"choice {i} ({choice!r}) duplicates choice {seen[key]}; choices must be distinct",
            )
        seen[key] = i

    answer = obj["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise _at(
            file,
            line,
            f"field 'answer' must be an integer index into 'choices', got {_type_name(answer)} "
            f"({answer!r}); use 0..{len(choices) - 1}",
        )
    if not 0 <= answer < len(choices):
        raise _at(
            file,
            line,
            f"answer index {answer} is out of range for {len(choices)} choices "
            f"(use 0..{len(choices) - 1})",
        )

    category = obj.get("category")
    if category is not None:
        category = _string_field(obj, "category", file, line)

    image_path = _check_image_path(image, folder, file, line)
    return ex_id, str(image_path), question, tuple(choices), answer, category


def load_split(folder: str | Path) -> list[VQAExample]:
    """Load one split folder (``folder/data.jsonl`` plus its images).

    Args:
        folder: The split folder, e.g. ``data/train``.

    Returns:
        The examples in file order, with absolute image paths.

    Raises:
        DatasetError: If the folder or ``data.jsonl`` is missing, or any line is malformed (bad
            JSON, missing or wrongly typed fields, answer out of range, empty or duplicate choices,
            duplicate ids, missing image, image path outside the folder). The message names the file
            and line.
    """
    folder = Path(folder)
    file = folder / DATA_FILE
    if not folder.is_dir():
        raise DatasetError(
            f"{folder}: split folder does not exist; it should contain {DATA_FILE} "
            f"(one JSON object per line) and the image files it names",
            path=folder,
        )
    if not file.is_file():
        raise DatasetError(
            f"{file}: not found; a split folder must contain {DATA_FILE} (one JSON object per line "
            f"with {', '.join(_REQUIRED)} and optional category) and the image files it names",
            path=file,
        )
    try:
        raw_lines = file.read_bytes().splitlines()
    except OSError as exc:
        raise DatasetError(f"{file}: cannot read ({exc.strerror or exc})", path=file) from None

    examples: list[VQAExample] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _at(
                file, number, f"not valid UTF-8 ({exc.reason}); save the file as UTF-8"
            ) from None
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _at(
                file,
                number,
                f"malformed JSON ({exc.msg} at column {exc.colno}); each line must be one complete "
                f"JSON object",
            ) from None
        ex_id, image, question, choices, answer, category = _parse_example(
            obj, folder, file, number
        )
        if ex_id in first_line:
            raise _at(
                file,
                number,
                f"duplicate id {ex_id!r} (first used on line {first_line[ex_id]}); "
                f"ids must be unique within a split",
            )
        first_line[ex_id] = number
        examples.append(
            VQAExample(
                id=ex_id,
                image=Path(image),
                question=question,
                choices=choices,
                answer=answer,
                category=category,
            )
        )
    if not examples:
        raise DatasetError(f"{file}: contains no examples; add one JSON object per line", path=file)
    return examples


def load_dataset(root: str | Path) -> dict[str, list[VQAExample]]:
    """Load a dataset root holding ``train/`` and ``test/`` split folders.

    Args:
        root: The dataset root (``data.path`` in the config).

    Returns:
        ``{"train": [...], "test": [...]}``.

    Raises:
        DatasetError: If the root or a split folder is missing, or a split is malformed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{root}: dataset root does not exist; it should hold the split folders "
            f"{root / 'train'} and {root / 'test'} (generate an offline one with "
            f"`fednano-ray data synth {root}`)",
            path=root,
        )
    missing = [split for split in SPLITS if not (root / split).is_dir()]
    if missing:
        raise DatasetError(
            f"{root}: missing split folder(s) {', '.join(repr(s) for s in missing)}; "
            "a dataset root "
            f"must hold {' and '.join(f'{s}/{DATA_FILE}' for s in SPLITS)} with their images",
            path=root,
        )
    return {split: load_split(root / split) for split in SPLITS}


def open_image(path: str | Path, size: int) -> Image.Image:
    """Open an image as RGB, resized to ``size`` × ``size``.

    Args:
        path: The image file.
        size: Side of the returned square image in pixels.

    Returns:
        A loaded RGB ``PIL.Image.Image`` of shape ``size`` × ``size``.

    Raises:
        ValueError: If ``size`` is not a positive integer.
        DatasetError: If the file is missing or cannot be decoded as an image.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found", path=path) from None
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        SyntaxError,
    ) as exc:
        raise DatasetError(
            f"{path}: cannot decode image ({exc}); replace it with a valid PNG or JPEG file",
            path=path,
        ) from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return rgb
