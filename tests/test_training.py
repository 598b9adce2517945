"""A client's local split-step training (local_fit) and multiple-choice evaluation, on the tiny
model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fednano_ray.config import load_config
from fednano_ray.models.adapter import adapter_state
from fednano_ray.models.build import build_mllm
from fednano_ray.models.prompt import collate
from fednano_ray.training import (
    LocalServer,
    _split_step,
    choice_rows,
    endpoint_fisher,
    evaluate,
    local_fit,
    normalize_fisher,
    pack_choices,
)

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml"
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "star", "triangle"]


class RecordingServer(LocalServer):
    """A LocalServer that also keeps every step's loss (local_fit reports only the mean and
    last).
    """

    def __init__(self, server_llm) -> None:
        super().__init__(server_llm)
        self.losses: list[float] = []

    def loss_and_grad(self, z, attention_mask, labels):
        loss, grad = super().loss_and_grad(z, attention_mask, labels)
        self.losses.append(loss)
        return loss, grad


# One torch thread: these models are small, and a busy machine punishes oversubscription.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    """The tiny MLLM, 16 training rows and their frozen-encoder features."""
    cfg = load_config(TINY)
    mllm = build_mllm(cfg.model)
    qa = [(f"What colour is object {i}?", COLOURS[i % 4]) for i in range(16)]
    rows = [mllm.encode_row(q, a) for q, a in qa]
    pixels = torch.randn(
        16, 3, mllm.image_size, mllm.image_size, generator=torch.Generator().manual_seed(0)
    )
    edge, _ = mllm.split(cfg.adapter, seed=0)
    features = edge.encode_images(pixels).numpy()
    return cfg, mllm, rows, features


def _full_loss(edge, server, rows, features, pad_id) -> float:
    batch = collate(rows, pad_id)
    with torch.no_grad():
        z = edge(batch["input_ids"], batch["image_mask"], features=torch.from_numpy(features))
    return float(server.loss_and_grad(z, batch["attention_mask"], batch["labels"])[0][0])


def _fit(setup, *, steps=30, prox_mu=0.0, lr=0.05):
    cfg, mllm, rows, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    server = RecordingServer(server_llm)
    start = adapter_state(edge.adapters)
    before = _full_loss(edge, server_llm, rows, features, mllm.pad_id)
    state, fisher, metrics, _ = local_fit(
        edge,
        server,
        features,
        [([r], 0, None) for r in rows],  # the LM objective trains each question's answer row
        steps=steps,
        batch_size=4,
        lr=lr,
        pad_id=mllm.pad_id,
        prox_mu=prox_mu,
        seed=0,
    )
    after = _full_loss(edge, server_llm, rows, features, mllm.pad_id)
    return start, state, fisher, metrics, server.losses, before, after


def test_local_fit_lowers_the_loss(setup):
    """30 steps at lr 0.05 lower both the per-step training loss and the loss on all rows."""
    # Execute
    _, _, _, metrics, losses, before, after = _fit(setup)

    # Assert
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])
    assert after < 0.9 * before
    assert metrics["loss"] == pytest.approx(np.mean(losses))
    assert metrics["loss_last"] == losses[-1]


def test_local_fit_returns_state_and_fisher(setup):
    """The returned state is the trained adapters; the Fisher matches it key for key, >= 0, not
    all 0.
    """
    # Execute
    start, state, fisher, _, _, _, _ = _fit(setup, steps=5)

    # Assert
    assert (
        set(state) == set(start) == {"vision.lora_A", "vision.lora_B", "text.lora_A", "text.lora_B"}
    )
    assert set(fisher) == set(state)
    for k in state:
        assert fisher[k].shape == state[k].shape, k
        assert torch.isfinite(fisher[k]).all(), k
        assert (fisher[k] >= 0).all(), k
        assert state[k].dtype == torch.float32
    assert any(fisher[k].abs().sum() > 0 for k in fisher)
    assert fisher["text.lora_B"].abs().sum() > 0  # B gets a gradient from the first step
    assert any(not torch.equal(state[k], start[k]) for k in state)


def test_prox_term_keeps_adapters_near_the_start(setup):
    """With a large FedProx mu the adapters move less from the global state than with mu 0."""
    # Execute
    start, free, _, _, _, _, _ = _fit(setup, steps=10, prox_mu=0.0)
    start2, held, _, _, _, _, _ = _fit(setup, steps=10, prox_mu=100.0)

    # Assert
    for k in start:
        assert torch.equal(start[k], start2[k])  # same seed: same starting point

    def dist(s):
        return sum(float((s[k] - start[k]).norm() ** 2) for k in s) ** 0.5

    assert dist(held) < 0.5 * dist(free)


def _questions(mllm, n=6):
    """Multiple-choice questions (choice rows, answer index, category) over two categories."""
    out = []
    for i in range(n):
        if i % 2:
            q, choices, cat = f"What shape is object {i}?", SHAPES, "shape"
        else:
            q, choices, cat = f"What colour is object {i}?", COLOURS, "colour"
        out.append((choice_rows(mllm.encode_row, q, choices[:2]), i % 2, cat))
    return out


def test_evaluate_reports_accuracy_n_and_categories(setup):
    """evaluate gives an accuracy in [0, 1], n = number of questions and one key per category."""
    # Prepare
    cfg, mllm, _, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    questions = _questions(mllm)
    questions.append((questions[0][0], 0, None))  # no category: counted, no key

    # Execute
    out = evaluate(
        edge, LocalServer(server_llm), features, questions, pad_id=mllm.pad_id, batch_size=5
    )

    # Assert
    assert 0.0 <= out["accuracy"] <= 1.0
    assert out["n"] == len(questions)
    assert set(out) == {"accuracy", "n", "correct", "accuracy/colour", "accuracy/shape"}
    assert len(out["correct"]) == len(questions) and out["correct"].count("1") == round(
        out["accuracy"] * len(questions)
    )
    for k in ("accuracy/colour", "accuracy/shape"):
        assert 0.0 <= out[k] <= 1.0


def test_evaluate_two_choice_answers_are_complementary(setup):
    """With two distinct choices exactly one is the argmax: accuracy(answers) +
    accuracy(flipped) = 1.
    """
    # Prepare
    cfg, mllm, _, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    server = LocalServer(server_llm)
    questions = _questions(mllm)
    flipped = [(rows, 1 - ans, cat) for rows, ans, cat in questions]

    # Execute
    acc = evaluate(edge, server, features, questions, pad_id=mllm.pad_id)
    acc_flipped = evaluate(edge, server, features, flipped, pad_id=mllm.pad_id)

    # Assert
    assert acc["accuracy"] + acc_flipped["accuracy"] == pytest.approx(1.0)
    for k in ("accuracy/colour", "accuracy/shape"):
        assert acc[k] + acc_flipped[k] == pytest.approx(1.0)


def test_evaluate_agrees_with_direct_scores(setup):
    """evaluate's verdict per question is the argmax of ServerLLM.score over that question's
    choices.
    """
    # Prepare
    cfg, mllm, _, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    questions = _questions(mllm)
    expected = []
    for q, (rows, answer, _) in enumerate(questions):
        batch = collate(rows, mllm.pad_id)
        feats = torch.from_numpy(features[[q] * len(rows)]).float()
        with torch.no_grad():
            z = edge(batch["input_ids"], batch["image_mask"], features=feats)
            s = server_llm.score(z, batch["attention_mask"], batch["labels"])
        assert abs(float(s[0] - s[1])) > 1e-3  # no near-tie: the comparison below is stable
        expected.append(int(s.argmax()) == answer)

    # Execute
    out = evaluate(edge, LocalServer(server_llm), features, questions, pad_id=mllm.pad_id)

    # Assert
    assert out["accuracy"] == pytest.approx(np.mean(expected))


def test_evaluate_single_choice_is_always_correct(setup):
    """A question with one choice is answered correctly whatever the model."""
    # Prepare
    cfg, mllm, _, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    questions = [([mllm.encode_row(f"Question {i}?", "red")], 0, "colour") for i in range(4)]

    # Execute
    out = evaluate(
        edge, LocalServer(server_llm), features, questions, pad_id=mllm.pad_id, batch_size=3
    )

    # Assert
    assert out["accuracy"] == 1.0
    assert out["accuracy/colour"] == 1.0
    assert out["n"] == 4


@pytest.mark.parametrize("kind", ["tiny", "nano"])
def test_packed_choices_score_as_each_choice_alone(setup, kind):
    """One packed pass (prompt once, then every choice) gives each choice the score it gets alone.

    Checked for the tiny LLaVA and for the nano architecture (random weights, 2 of SmolLM2's
    layers), with multi-token answers of different lengths, across a padded batch of questions.
    """
    # Prepare
    from fednano_ray.models.nano import nano_parts
    from fednano_ray.models.split import split_mllm
    from fednano_ray.training import pack_choices

    cfg, mllm, _, features = setup
    if kind == "tiny":
        edge, server_llm = mllm.split(cfg.adapter, seed=0)
        encode, pad_id = mllm.encode_row, mllm.pad_id
    else:
        from fednano_ray.models.prompt import CHATML

        parts, _ = nano_parts(pretrained=False, num_layers=2, grid=2)
        edge, server_llm = split_mllm(parts, r=4, scaling=2.0, seed=0)
        words = {
            "red": [700],
            "blue": [701],
            "triangle": [702, 703],
            "circle": [704],
            "star": [705, 706, 707],
        }

        class Tok:
            def encode(self, text, add_special_tokens=False):
                out = []
                for piece in text.replace("<|im_end|>", " <|im_end|> ").split():
                    out += (
                        [2] if piece == "<|im_end|>" else words.get(piece, [hash(piece) % 500 + 10])
                    )
                return out

        encode = lambda q, a: CHATML.encode(Tok(), q, a, 4, 2)
        pad_id = 2
        features = edge.encode_images(
            torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        ).numpy()
    with torch.no_grad():
        for p in edge.adapters.parameters():  # B = 0 at init: give the adapters an effect
            p.normal_(0, 0.05)
    choices = [["red", "blue"], ["triangle", "circle", "star"], ["star", "red", "blue", "triangle"]]
    questions = [
        ([encode(f"Which one {i}?", c) for c in cs], i % len(cs), None)
        for i, cs in enumerate(choices)
    ]

    # Execute
    alone = []
    for q, (rows, _, _) in enumerate(questions):
        batch = collate(rows, pad_id)
        with torch.no_grad():
            z = edge(
                batch["input_ids"],
                batch["image_mask"],
                features=torch.from_numpy(features[[q] * len(rows)]).float(),
            )
            alone.append(server_llm.score(z, batch["attention_mask"], batch["labels"]))
    packed = [pack_choices(rows) for rows, _, _ in questions]
    out = evaluate(edge, LocalServer(server_llm), features, questions, pad_id=pad_id, batch_size=3)

    # Assert
    assert all(
        len(p.ids) < sum(len(r[0]) for r in rows)
        for p, (rows, _, _) in zip(packed, questions, strict=True)
    )
    expected = np.mean(
        [int(s.argmax()) == a for s, (_, a, _) in zip(alone, questions, strict=True)]
    )
    assert out["accuracy"] == pytest.approx(expected)
    # the same scores, from the server directly, with the batch padded as evaluate pads it
    from fednano_ray.training import _packed_batch

    z_in, args, n_scores = _packed_batch(packed, questions, pad_id)
    with torch.no_grad():
        z = edge(
            z_in["input_ids"], z_in["image_mask"], features=torch.from_numpy(features[:3]).float()
        )
        got = server_llm.score_packed(z, *args, n_scores)
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-4, atol=1e-4)


def test_pack_choices_refuses_rows_that_do_not_share_a_prompt(setup):
    """Rows of different questions cannot be packed, and the error says why."""
    # Prepare
    from fednano_ray.training import pack_choices

    _, mllm, _, _ = setup

    # Execute / Assert
    with pytest.raises(ValueError, match="prompt"):
        pack_choices(
            [mllm.encode_row("What colour?", "red"), mllm.encode_row("What shape?", "red")]
        )


def _choice_questions(mllm):
    """Questions with 2-4 choices, some answers two tokens long ("light blue"), over two
    categories.
    """
    colours = ["red", "green", "light blue", "yellow"]
    out = []
    for i in range(6):
        k = 2 + i % 3
        out.append(
            (
                choice_rows(mllm.encode_row, f"What colour is object {i}?", colours[:k]),
                i % k,
                "colour",
            )
        )
    return out


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_choice_loss_is_cross_entropy_over_each_choice_scored_alone(setup, lm_weight):
    """The packed choice objective equals, loss and dL/dθ, the cross-entropy of the answer among the
    choices' summed log-likelihoods computed one choice per row (ServerLLM.score), plus lm_weight x
    the answer's mean token NLL (ServerLLM.loss_and_grad's LM loss on the answer row)."""
    # Prepare
    from fednano_ray.training import _packed_batch, pack_choices

    cfg, mllm, _, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    with torch.no_grad():
        for p in edge.adapters.parameters():  # B = 0 at init: give the adapters an effect
            p.normal_(0, 0.05)
    questions = _choice_questions(mllm)
    feats = torch.from_numpy(features[: len(questions)]).float()

    # Reference: one row per choice, scores and the LM loss through autograd end to end.
    edge.zero_grad()
    ref_losses = []
    for q, (rows, answer, _) in enumerate(questions):
        batch = collate(rows, mllm.pad_id)
        z = edge(batch["input_ids"], batch["image_mask"], features=feats[[q] * len(rows)])
        logp, r = server_llm._token_logprobs(z, batch["attention_mask"], batch["labels"])
        scores = torch.zeros(len(rows)).index_add(0, r, logp)
        loss = torch.nn.functional.cross_entropy(scores[None], torch.tensor([answer]))
        loss = loss + lm_weight * (-logp[r == answer]).mean()
        ref_losses.append(loss)
    ref = torch.stack(ref_losses).mean()
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in edge.adapters.named_parameters()}

    # Execute: the packed split step.
    edge.zero_grad()
    inputs, args, _ = _packed_batch(
        [pack_choices(rows) for rows, _, _ in questions], questions, mllm.pad_id
    )
    z = edge(inputs["input_ids"], inputs["image_mask"], features=feats)
    counts = torch.tensor([len(rows) for rows, _, _ in questions])
    answers = torch.tensor([a for _, a, _ in questions])
    loss, grad = LocalServer(server_llm).choice_loss_and_grad(
        z.detach(), *args, counts, answers, lm_weight
    )
    z.backward(grad)

    # Assert
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    for k, p in edge.adapters.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in ref_grads.values())


def test_choice_loss_rejects_answers_outside_their_choices(setup):
    """An answer index beyond its question's choices is an error naming the problem."""
    from fednano_ray.training import _packed_batch, pack_choices

    cfg, mllm, _, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    questions = _choice_questions(mllm)[:2]
    inputs, args, _ = _packed_batch(
        [pack_choices(rows) for rows, _, _ in questions], questions, mllm.pad_id
    )
    with torch.no_grad():
        z = edge(
            inputs["input_ids"],
            inputs["image_mask"],
            features=torch.from_numpy(features[:2]).float(),
        )
    with pytest.raises(ValueError, match="answer must index"):
        server_llm.choice_loss_and_grad(z, *args, torch.tensor([2, 3]), torch.tensor([0, 3]))


def test_choice_objective_learns_what_evaluation_ranks(setup):
    """30 steps of the choice objective on 2-choice questions whose answers the pretrained model
    gets wrong raise the accuracy evaluate reports on them from 0 to 100%, and the choice loss
    falls."""
    # Prepare
    cfg, mllm, _, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    server = LocalServer(server_llm)
    questions = _questions(mllm, n=12)
    # Every answer is the choice the pretrained model ranks lower: accuracy starts at 0.
    first = evaluate(edge, server, features, questions, pad_id=mllm.pad_id)
    per_q = [
        evaluate(edge, server, features[i : i + 1], [q], pad_id=mllm.pad_id)["accuracy"]
        for i, q in enumerate(questions)
    ]
    questions = [
        (rows, a if not ok else 1 - a, cat)
        for (rows, a, cat), ok in zip(questions, per_q, strict=True)
    ]
    before = evaluate(edge, server, features, questions, pad_id=mllm.pad_id)["accuracy"]
    assert first["n"] == 12

    # Execute
    _, _, metrics, _ = local_fit(
        edge,
        server,
        features,
        questions,
        steps=30,
        batch_size=4,
        lr=0.05,
        pad_id=mllm.pad_id,
        objective="choice",
    )

    # Assert
    after = evaluate(edge, server, features, questions, pad_id=mllm.pad_id)["accuracy"]
    assert before == 0.0 and after == 1.0
    assert metrics["loss_last"] < metrics["loss"]


def test_optimizer_state_carries_adam_moments_over_calls(setup):
    """Two calls of 3 full-batch steps, the second given the first's AdamW state, land where one
    call of 6 steps does; without the state (fresh moments) the second call lands elsewhere."""
    # Prepare
    cfg, mllm, rows, features = setup
    questions = [([r], 0, None) for r in rows[:8]]
    kw = {
        "batch_size": 8,
        "lr": 0.05,
        "pad_id": mllm.pad_id,
    }  # full batch: every step sees every row

    def fit(steps_list, carry):
        edge, server_llm = mllm.split(cfg.adapter, seed=0)
        state = None
        for i, steps in enumerate(steps_list):
            out, _, _, opt = local_fit(
                edge,
                LocalServer(server_llm),
                features[:8],
                questions,
                steps=steps,
                seed=i,
                optimizer_state=state if carry else None,
                **kw,
            )
            state = opt
        return out, state

    # Execute
    once, _ = fit([6], carry=True)
    carried, opt_carried = fit([3, 3], carry=True)
    reset, _ = fit([3, 3], carry=False)

    # Assert
    for k in once:
        torch.testing.assert_close(carried[k], once[k], rtol=1e-4, atol=1e-6)
    assert max(float((reset[k] - once[k]).abs().max()) for k in once) > 1e-3
    assert all(int(s["step"]) == 6 for s in opt_carried["state"].values())


def test_unknown_objective_is_an_error(setup):
    cfg, mllm, rows, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    with pytest.raises(ValueError, match="unknown objective 'nll'"):
        local_fit(
            edge,
            LocalServer(server_llm),
            features,
            [([rows[0]], 0, None)],
            steps=1,
            batch_size=1,
            lr=0.1,
            pad_id=mllm.pad_id,
            objective="nll",
        )


def _per_example_fisher(edge, server, features, questions, objective, pad_id):
    """The reference: each example alone through the split step, its squared adapter gradient,
    averaged.
    """
    params = dict(edge.adapters.named_parameters())
    out = {k: torch.zeros_like(p) for k, p in params.items()}
    packed = [pack_choices(rows) for rows, _, _ in questions] if objective == "choice" else None
    for i in range(len(questions)):
        for p in params.values():
            p.grad = None
        _, z, grad, _ = _split_step(
            edge, server, features, questions, [i], packed, pad_id=pad_id, lm_weight=0.0
        )
        z.backward(grad)
        for k, p in params.items():
            out[k] += p.grad.detach() ** 2
    return {k: v / len(questions) for k, v in out.items()}


@pytest.mark.parametrize("objective", ["lm", "choice"])
def test_endpoint_fisher_is_the_mean_of_per_example_squared_gradients(setup, objective):
    """Batched on the server (4 rows per call, different lengths), the end-point Fisher equals each
    example's own squared gradient taken alone, averaged: the per-row split of dL/dz' is exact."""
    # Prepare
    cfg, mllm, rows, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    with torch.no_grad():  # away from B = 0, so that lora_A has a gradient too
        for p in edge.adapters.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    server = LocalServer(server_llm)
    if objective == "choice":
        questions = _questions(mllm, n=6)
    else:
        questions = [([r], 0, None) for r in rows[:6]]
        questions[1] = (
            [mllm.encode_row("Which of the many colours does object one have here?", "red")],
            0,
            None,
        )
    params = dict(edge.adapters.named_parameters())

    # Execute
    got = endpoint_fisher(
        edge,
        server,
        features,
        questions,
        list(range(6)),
        params=params,
        batch_size=4,
        pad_id=mllm.pad_id,
        objective=objective,
    )
    want = _per_example_fisher(edge, server, features, questions, objective, mllm.pad_id)

    # Assert
    for k in want:
        assert want[k].abs().sum() > 0, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-10)


def test_local_fit_endpoint_fisher_is_bounded_and_normalised(setup):
    """fisher=endpoint with normalisation: every tensor's Fisher has mean 1; it differs from the
    trajectory estimate of the same run; the adapters trained are the same either way."""
    # Prepare
    cfg, mllm, rows, features = setup
    questions = [([r], 0, None) for r in rows]

    def fit(**kw):
        edge, server_llm = mllm.split(cfg.adapter, seed=0)
        return local_fit(
            edge,
            LocalServer(server_llm),
            features,
            questions,
            steps=4,
            batch_size=4,
            lr=0.05,
            pad_id=mllm.pad_id,
            seed=0,
            **kw,
        )

    # Execute
    state_e, fisher_e, _, _ = fit(fisher="endpoint", fisher_examples=8, fisher_normalize=True)
    state_t, fisher_t, _, _ = fit(fisher="trajectory")

    # Assert
    for k in state_e:
        torch.testing.assert_close(state_e[k], state_t[k])
        assert float(fisher_e[k].mean()) == pytest.approx(1.0, rel=1e-5), k
        assert not torch.allclose(fisher_e[k], fisher_t[k] / fisher_t[k].mean()), k


def test_normalised_fisher_does_not_let_scale_win():
    """A client whose Fisher is 1000x another's (same shape of importance) no longer outweighs
    it.
    """
    # Prepare
    f = {"a": torch.tensor([1.0, 3.0, 0.0, 4.0]), "z": torch.zeros(3)}

    # Execute
    small, large = normalize_fisher(f), normalize_fisher({k: 1000 * v for k, v in f.items()})

    # Assert
    torch.testing.assert_close(small["a"], large["a"])
    torch.testing.assert_close(small["a"], torch.tensor([0.5, 1.5, 0.0, 2.0]))
    assert torch.equal(small["z"], torch.zeros(3))


def test_frozen_a_trains_only_b_and_fedavg_merges_products_exactly(setup):
    """adapter.factors=frozen_a (FFA-LoRA): lora_A never moves, lora_B does, A has Fisher 0; and the
    FedAvg of two clients' factors computes exactly the average of their products B @ A."""
    # Prepare
    from fednano_ray.strategies.aggregate import fedavg

    cfg, mllm, rows, features = setup
    frozen = cfg.adapter.model_copy(update={"factors": "frozen_a"})
    questions = [([r], 0, None) for r in rows]
    states = []

    # Execute
    for shard in (slice(0, 8), slice(8, 16)):
        edge, server_llm = mllm.split(frozen, seed=0)
        start = adapter_state(edge.adapters)
        state, fisher, _, _ = local_fit(
            edge,
            LocalServer(server_llm),
            features[shard],
            questions[shard],
            steps=5,
            batch_size=4,
            lr=0.05,
            pad_id=mllm.pad_id,
            seed=0,
        )
        states.append(state)
        # Assert (per client)
        for m in ("vision", "text"):
            assert torch.equal(state[f"{m}.lora_A"], start[f"{m}.lora_A"])
            assert not torch.equal(state[f"{m}.lora_B"], start[f"{m}.lora_B"])
            assert float(fisher[f"{m}.lora_A"].abs().sum()) == 0.0
    merged = fedavg([(s, 8) for s in states])

    # Assert (merged)
    for m in ("vision", "text"):
        product = merged[f"{m}.lora_B"] @ merged[f"{m}.lora_A"]
        mean_product = sum(s[f"{m}.lora_B"] @ s[f"{m}.lora_A"] for s in states) / 2
        torch.testing.assert_close(product, mean_product, rtol=1e-5, atol=1e-7)


def test_unknown_fisher_estimator_is_an_error(setup):
    cfg, mllm, rows, features = setup
    edge, server_llm = mllm.split(cfg.adapter, seed=0)
    with pytest.raises(ValueError, match="unknown Fisher estimator 'diag'"):
        local_fit(
            edge,
            LocalServer(server_llm),
            features,
            [([rows[0]], 0, None)],
            steps=1,
            batch_size=1,
            lr=0.1,
            pad_id=mllm.pad_id,
            fisher="diag",
        )
