"""data.client_shift: each client's images under its own imaging condition, labels kept true."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fednano_ray.config import load_config
from fednano_ray.data.dataset import VQAExample
from fednano_ray.data.shift import CONDITIONS, mirror_text, shift_example
from fednano_ray.task import prepare_data


def _example(tmp_path, **kw) -> VQAExample:
    a = np.zeros((32, 32, 3), np.uint8)
    a[8:16, 2:10] = (220, 40, 30)  # a red square on the left
    path = tmp_path / "img.png"
    Image.fromarray(a).save(path)
    base = {
        "id": "q0",
        "image": path,
        "question": "Where is the red square?",
        "choices": ("left", "right", "top"),
        "answer": 0,
        "category": "position",
    }
    return VQAExample(**{**base, **kw})


def _pixels(ex: VQAExample) -> np.ndarray:
    return np.asarray(Image.open(ex.image).convert("RGB"), dtype=np.int16)


def test_mirror_text_swaps_left_and_right_as_words():
    assert mirror_text("What is left of the square?") == "What is right of the square?"
    assert mirror_text("top-left, Right, LEFT") == "top-right, Left, RIGHT"
    assert mirror_text("Is it bright? leftover") == "Is it bright? leftover"  # whole words only


@pytest.mark.parametrize("condition", sorted(CONDITIONS))
def test_each_condition_changes_the_image_deterministically_and_only_mirror_changes_the_texts(
    tmp_path, condition
):
    ex = _example(tmp_path)
    a = shift_example(ex, condition, tmp_path / "out")
    b = shift_example(ex, condition, tmp_path / "out2")
    assert a.image.parent.name == condition and a.image.read_bytes() == b.image.read_bytes()
    assert not np.array_equal(_pixels(a), _pixels(ex))
    if condition == "mirror":
        assert (
            a.choices == ("right", "left", "top") and a.answer == 0
        )  # the square is now on the right
        assert a.choices[a.answer] == "right"
    else:
        assert (a.question, a.choices, a.answer) == (ex.question, ex.choices, ex.answer)


def test_the_conditions_do_what_they_say(tmp_path):
    ex = _example(tmp_path)
    src = _pixels(ex)
    swap = _pixels(shift_example(ex, "channel_swap", tmp_path / "o"))
    assert np.array_equal(swap, src[..., ::-1])  # red <-> blue
    assert np.array_equal(_pixels(shift_example(ex, "invert", tmp_path / "o")), 255 - src)
    assert np.array_equal(_pixels(shift_example(ex, "mirror", tmp_path / "o")), src[:, ::-1])
    mass = _pixels(shift_example(ex, "mirror", tmp_path / "o")).sum(-1).sum(0)
    assert mass[16:].sum() > 0 and mass[:16].sum() == 0  # the square moved to the right half
    with pytest.raises(ValueError, match="unknown client-shift condition 'fog'"):
        shift_example(ex, "fog", tmp_path / "o")


def test_prepare_data_puts_each_client_under_its_condition_and_the_test_under_all():
    conds = ["channel_swap", "mirror", "invert"]
    cfg = load_config("examples/tiny.yaml", [f"data.client_shift=[{','.join(conds)}]"])
    clean, shifted = prepare_data(load_config("examples/tiny.yaml")), prepare_data(cfg)
    assert shifted.client_train == clean.client_train and shifted.client_test == clean.client_test
    for c in range(cfg.federation.num_clients):
        for i in [*shifted.client_train[c], *shifted.client_test[c]]:
            assert shifted.train[i].image.parent.name == conds[c % 3]
            if conds[c % 3] == "mirror":
                assert shifted.train[i].choices == tuple(
                    mirror_text(x) for x in clean.train[i].choices
                )
            else:
                assert shifted.train[i].choices == clean.train[i].choices
    assert [ex.image.parent.name for ex in shifted.test] == [
        conds[i % 3] for i in range(len(shifted.test))
    ]
    assert {ex.id for ex in shifted.test} == {ex.id for ex in clean.test}


def test_an_unknown_condition_is_a_config_error():
    with pytest.raises(ValueError, match="client_shift"):
        load_config("examples/tiny.yaml", ["data.client_shift=[fog]"])
