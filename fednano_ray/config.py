"""The configuration tree: one strict, frozen pydantic model parsed once from YAML and ``--set``.

Every field is described once; the descriptions double as CLI help
(``fednano-ray train --help-config``). Unknown keys are errors, so a typo fails loudly instead of
being silently ignored.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fednano_ray.federation.method import METHODS, Method, method_names, resolve_options


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


#: The flat ``federation`` keys of earlier versions, each ``(method, option)`` of
#: ``strategy_options``: run directories written before the move still load (a key of another
#: method is dropped).
LEGACY_OPTIONS = {
    "fedprox_mu": ("fedprox", "mu"),
    "fisher_eps": ("fednano", "eps"),
    "feddpa_train_weight": ("feddpa-f", "train_weight"),
    "feddpa_top_k": ("feddpa-f", "top_k"),
    "feddpa_bank_size": ("feddpa-f", "bank_size"),
}


def _either(names) -> str:
    """``a, b or c``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(_Section):
    """Sizes of the random-weight ``tiny`` LLaVA used by tests (head_dim >= 32 for vLLM's CPU
    kernels)."""

    hidden_size: int = Field(128, ge=32, description="LLM hidden size.")
    num_layers: int = Field(2, ge=1, description="LLM decoder layers.")
    num_heads: int = Field(
        4, ge=1, description="LLM attention heads (hidden_size / num_heads >= 32)."
    )
    intermediate_size: int = Field(256, ge=8, description="LLM MLP width.")
    vision_hidden_size: int = Field(64, ge=8, description="Vision tower hidden size.")
    vision_layers: int = Field(1, ge=1, description="Vision tower layers.")
    image_size: int = Field(32, ge=8, description="Input image side in pixels.")
    patch_size: int = Field(
        8, ge=2, description="Vision patch side; image_size/patch_size squared visual tokens."
    )
    seed: int = Field(
        0, description="Seed of the random weights (every process builds the same model)."
    )

    @model_validator(mode="after")
    def _check(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("model.tiny.hidden_size must be divisible by model.tiny.num_heads")
        if self.image_size % self.patch_size:
            raise ValueError("model.tiny.image_size must be divisible by model.tiny.patch_size")
        return self


class ModelConfig(_Section):
    """Where the multimodal LLM comes from (DESIGN.md §2)."""

    kind: Literal["nano", "hf", "tiny"] = Field(
        "nano",
        description="nano: offline EfficientNet-Lite0 + MLP connector + SmolLM2-135M; "
        "hf: a LLaVA-family checkpoint (name_or_path); tiny: random weights for tests.",
    )
    name_or_path: str | None = Field(
        None,
        description="hf only: hub id or local folder of a LlavaForConditionalGeneration "
        "checkpoint.",
    )
    grid: int = Field(
        4,
        ge=1,
        le=7,
        description="nano only: the 7x7 feature map is pooled to grid x grid visual tokens.",
    )
    connector_steps: int = Field(
        200,
        ge=0,
        description="nano only: stage-1 alignment steps of the connector (cached after the first "
        "run).",
    )
    instruct_steps: int = Field(
        100,
        ge=0,
        description="nano only: stage-2 short-answer VQA steps of the connector after stage 1 "
        "(0 = none; cached).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Precision of the frozen LLM (stages 1 and 2, training, evaluation, serving): "
        "auto = bf16 autocast only where the hardware runs bf16 natively (CUDA with bf16, a CPU "
        "with avx512_bf16 or amx_bf16), fp32 elsewhere (on an AVX2-only CPU bf16 is emulated and "
        "~50-70x slower); fp32 for exact checks; bf16 forces autocast. Weights, connector and "
        "adapters stay fp32.",
    )
    tiny: TinyModelConfig = Field(
        default_factory=TinyModelConfig, description="tiny only: model sizes."
    )

    def runtime_precision(self):
        """``precision`` resolved on this process's hardware
        (:func:`fednano_ray.precision.resolve_precision`)."""
        from fednano_ray.precision import resolve_precision

        return resolve_precision(self.precision)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "autocast_bf16" in data:
            raise ValueError(
                "model.autocast_bf16 was replaced by model.precision: use precision: auto (bf16 "
                "only where the hardware runs it natively), fp32 or bf16"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.kind == "hf" and not self.name_or_path:
            raise ValueError(
                "model.name_or_path is required when model.kind is 'hf' "
                "(e.g. llava-hf/llava-1.5-7b-hf)"
            )
        return self


class AdapterConfig(_Section):
    """NanoAdapter hyper-parameters (PEFT names): z' = z + (lora_alpha / r) * B(A(dropout(z))).

    The scaling ``lora_alpha / r`` uses this section's ``r`` (the reference rank) on EVERY tier,
    whatever a tier's ``adapter_rank``: one scaling, so the same global adapter state computes the
    same function on every client (DESIGN.md §1, heterogeneous clients).

    Under ``federation.strategy: fedavg-lora`` the same r, lora_alpha and dropout (and a tier's
    adapter_rank) configure PEFT LoRA on the LLM decoder's ``lora_target_modules`` instead, with the
    same one scaling (PEFT's per-layer lora_alpha is set to lora_alpha * adapter_rank / r).
    """

    r: int = Field(
        8,
        ge=1,
        description="Default adapter rank (a tier may override it) and the reference rank of the "
        "scaling lora_alpha / r, which every tier uses whatever its adapter_rank.",
    )
    lora_alpha: float = Field(
        16.0,
        gt=0,
        description="Scaling numerator; scaling = lora_alpha / r with r = adapter.r, the same for "
        "every tier (not lora_alpha / the tier's adapter_rank).",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    kind: Literal["lowrank", "bottleneck", "slots", "connector"] = Field(
        "lowrank",
        description="The NanoAdapter form (fednano_ray/models/adapter.py). lowrank: the paper's "
        "linear low-rank residual z + s*B(A z) on each modality's embeddings. bottleneck: the same "
        "with a GELU between A and B. slots: lowrank plus a zero-initialised learned offset per "
        "visual slot (N x d) on the visual tokens, position information without re-aligning the "
        "connector. connector: the vision adapter is LoRA on the connector's first layer, reading "
        "the encoder's features before the GELU (the text adapter stays lowrank). Every form is "
        "the identity at init and works with HetLoRA ranks, FedNano's Fisher, SecAgg, DP, resume "
        "and serving.",
    )
    factors: Literal["joint", "frozen_a", "product"] = Field(
        "joint",
        description="Which LoRA factors clients train. joint: lora_A and lora_B (the paper's "
        "NanoAdapter); merging A and B separately is not merging B@A (a second-order error under "
        "FedAvg, a patchwork of clients under Fisher weights). frozen_a: lora_A stays at its "
        "shared random init and only lora_B trains (FFA-LoRA, Sun et al. 2024, arXiv 2403.12313): "
        "B@A is linear in B, so FedAvg and Fisher merging of B merge the products exactly. "
        "product: clients train both, the server averages each client's B@A (example-weighted) and "
        "re-factorises the mean by truncated SVD at the largest tier rank (a smaller-rank client "
        "takes the top singular components); fedavg/fedprox only, without SecAgg, DP or robust "
        "rules (they need sums of the factors), and with train.optimizer_state=reset (the factors "
        "change basis every round).",
    )
    modalities: tuple[Literal["vision", "text"], ...] = Field(
        ("vision", "text"),
        min_length=1,
        description="Which NanoAdapters to train: vision, text or both (fedavg-lora trains none).",
    )
    lora_target_modules: tuple[str, ...] = Field(
        ("q_proj", "v_proj"),
        min_length=1,
        description="fedavg-lora only: the LLM decoder's Linear layers that get PEFT LoRA (PEFT's "
        "target_modules: a module matches when its name is, or ends with, .NAME); q_proj and "
        "v_proj are LLaVA's and PEFT's usual choice, add k_proj, o_proj, gate_proj, up_proj, "
        "down_proj for more. Rank, alpha and dropout as above.",
    )

    @field_validator("modalities")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("adapter.modalities lists a modality twice")
        return v

    @field_validator("lora_target_modules")
    @classmethod
    def _linear_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("adapter.lora_target_modules lists a module twice")
        frozen = sorted(set(v) & {"embed_tokens", "lm_head"})
        if frozen:
            raise ValueError(
                f"adapter.lora_target_modules names {frozen}: fedavg-lora trains LoRA on the "
                "decoder's linear layers only; the token embeddings (computed on the client before "
                "the LLM) and the LM head stay frozen"
            )
        return v

    @property
    def scaling(self) -> float:
        """The adapters' one scaling, ``lora_alpha / r`` with this section's r, for every tier
        rank."""
        return self.lora_alpha / self.r


class SynthConfig(_Section):
    """The offline synthetic benchmark, generated when ``data.path`` is not set."""

    num_train: int = Field(2000, ge=10, description="Training questions.")
    num_test: int = Field(400, ge=10, description="Global test questions.")
    seed: int = Field(0, description="Generator seed (same seed, same bytes).")
    image_size: int = Field(224, ge=16, description="Rendered image side in pixels.")
    difficulty: Literal["easy", "hard"] = Field(
        "easy",
        description="easy: one object per question (two for relations); hard: 2-5 objects with "
        "attribute binding.",
    )


class DataConfig(_Section):
    """Dataset and how it is split across clients."""

    path: Path | None = Field(
        None,
        description="Dataset root with train/ and test/ (DESIGN.md §4); unset = the synthetic "
        "benchmark.",
    )
    synth: SynthConfig = Field(
        default_factory=SynthConfig, description="Synthetic benchmark settings."
    )
    partition: Literal["iid", "dirichlet", "pathological"] = Field(
        "dirichlet", description="Partitioner."
    )
    alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration: small = more heterogeneous."
    )
    partition_by: Literal["answer", "category"] = Field(
        "category", description="Label the partitioner uses."
    )
    labels_per_client: int = Field(2, ge=1, description="pathological only: labels per client.")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Part of each client's shard kept for its own test."
    )
    min_holdout: int = Field(
        0,
        ge=0,
        description="Fewest held-out test questions per client: each client holds out "
        "max(round(holdout_fraction * shard size), min_holdout) and the partitioner gives every "
        "client at least min_holdout + 1 examples (one left to train on). 0 = no minimum beyond "
        "one question. A client accuracy measured on 2-3 questions is noise (its 95% interval "
        "spans most of [0, 1]); ~30 makes it usable.",
    )
    client_shift: tuple[
        Literal["colour_cast", "channel_swap", "invert", "blur", "mirror", "noise"], ...
    ] = Field(
        (),
        description="Client shift (fednano_ray/data/shift.py): client c's images pass through "
        "condition client_shift[c % K] (mirror also swaps left/right in the question and choices) "
        "and global-test question i through client_shift[i % K], so every client adapts to its own "
        "imaging condition and the global test holds them all. Empty (default): clean images. "
        "Works for any dataset; shifted images are cached, never written into the dataset.",
    )
    max_train_examples: int | None = Field(
        None, ge=1, description="Cap on training examples (quick runs)."
    )
    max_test_examples: int | None = Field(
        200, ge=1, description="Cap on global test examples evaluated."
    )


def min_holdout_error(
    data: DataConfig, num_clients: int, num_train: int | None = None
) -> str | None:
    """Why ``data.min_holdout`` cannot be met (every client needs ``min_holdout + 1`` examples), or
    None.

    ``num_train``: the size of the training pool once loaded; None = what the config alone says
    (``data.synth.num_train`` or ``data.max_train_examples``; unknown for a ``data.path`` dataset).
    """
    m = data.min_holdout
    if m <= 0:
        return None
    per = m + 1
    need = per * num_clients
    capped = data.max_train_examples is not None
    if num_train is None:
        if data.path is None and not (capped and data.max_train_examples < data.synth.num_train):
            avail, src = data.synth.num_train, "data.synth.num_train"
        elif capped:
            avail, src = data.max_train_examples, "data.max_train_examples"
        else:
            return None
    else:
        avail = num_train
        if capped and num_train >= data.max_train_examples:
            src = "data.max_train_examples"
        else:
            src = (
                "data.synth.num_train"
                if data.path is None
                else f"the training split of data.path ({data.path})"
            )
    if avail >= need:
        return None
    raise_it = f"raise {src}" if src.startswith("data.") else "use a larger dataset"
    return (
        f"data.min_holdout={m} needs at least {per} examples per client ({m} held out + 1 to "
        f"train), {need} for federation.num_clients={num_clients}, but {src} gives {avail}; "
        f"lower data.min_holdout, {raise_it}, or lower federation.num_clients"
    )


class FederationConfig(_Section):
    """Rounds, sampling, strategy and fault tolerance."""

    num_clients: int = Field(8, ge=1, description="Number of clients the data is split across.")
    clients_per_round: int = Field(8, ge=1, description="Clients sampled each round.")
    rounds: int = Field(3, ge=0, description="Federated rounds.")
    strategy: Literal[method_names()] = Field(  # type: ignore[valid-type]
        "fednano",
        description="The federated method, one of fednano_ray/federation/method.py's METHODS: "
        + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
        + ". Its options go in federation.strategy_options.",
    )
    strategy_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of federation.strategy, validated against that method and filled with "
        "its defaults: fednano {eps}, fedprox {mu}, fedavgm {momentum}, feddpa-f {train_weight, "
        "top_k, bank_size} (see fednano_ray/federation/method.py); the others take none. The older "
        "flat keys federation.fedprox_mu, fisher_eps and feddpa_* are still read (and moved here).",
    )
    server_lr: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Server learning rate eta (FedAvg with a server optimiser, Reddi et al. 2021): "
        "the new global adapters are theta + eta * (aggregate - theta). 1 keeps the strategy's "
        "aggregate. With a few local steps a round, averaging moves the global adapters no further "
        "than one client moves its own, so the rounds' sequential progress is rounds x local_steps "
        "steps; eta > 1 scales each round's move. Needs an aggregating strategy (not local, "
        "centralized) and adapter.factors joint or frozen_a.",
    )
    deadline_s: float = Field(
        600.0, gt=0, description="Seconds a round waits for clients before it moves on."
    )
    quorum: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Fraction of sampled clients that must report for a round to count.",
    )
    mode: Literal["simulation", "deployment"] = Field(
        "simulation",
        description="simulation: virtual clients multiplexed over a pool per tier; deployment: one "
        "actor per client.",
    )
    seed: int = Field(0, description="Seed of sampling, partitioning and adapter init.")
    evaluate_every: int = Field(
        1, ge=1, description="Evaluate the global model every N rounds (and after the last)."
    )
    personalize_steps: int = Field(
        0,
        ge=0,
        description="After the last round, every client fine-tunes a private copy of the global "
        "adapters for this many local steps on its own training data (fresh AdamW, its tier's "
        "batch size); it is then evaluated with them on its held-out data and on the global test, "
        "its checkpoint holds them, and `fednano-ray serve` answers it with them. 0 = no "
        "personalisation (every client is served the global adapters). Under feddpa-f these are "
        "the steps of the local adapter (required, > 0), which joins the global one instead of "
        "replacing it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _strategy_options(cls, data: Any) -> Any:
        """Fold the older flat option keys into ``strategy_options`` and validate them for the
        method."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        name = data.get("strategy", "fednano")
        options = dict(data.get("strategy_options") or {})
        for key, (method, option) in LEGACY_OPTIONS.items():
            if key in data:
                value = data.pop(key)
                if method == name:
                    options.setdefault(option, value)
        if isinstance(name, str) and name in METHODS:
            data["strategy_options"] = resolve_options(name, options)
        return data


class TierConfig(_Section):
    """A class of clients sharing a resource budget (DESIGN.md §1, heterogeneous clients)."""

    name: str = Field(
        description="Tier name, e.g. edge-small; also a custom Ray resource in cluster.yaml."
    )
    clients: int = Field(ge=1, description="How many of the clients belong to this tier.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs per client actor.")
    num_gpus: float = Field(
        0.0, ge=0, description="Ray GPUs per client actor (fractional allowed)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per client actor."
    )
    batch_size: int = Field(8, ge=1, description="Local batch size.")
    local_steps: int = Field(5, ge=1, description="Local optimizer steps per round.")
    adapter_rank: int | None = Field(
        None,
        ge=1,
        description="Adapter rank for this tier (default adapter.r; fedavg-lora: of its LLM LoRA).",
    )
    pool_size: int = Field(
        1, ge=1, description="simulation only: actors serving this tier's virtual clients."
    )


class TrainConfig(_Section):
    """Local optimisation and the frozen-LLM trainer."""

    lr: float = Field(5e-3, gt=0, description="AdamW learning rate of the adapters.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    objective: Literal["lm", "choice"] = Field(
        "choice",
        description="What local training minimises. choice: cross-entropy of the right answer "
        "among each question's choices, scored as evaluation scores them (summed log-likelihood, "
        "one packed pass per question); lm: next-token NLL of the right answer over the whole "
        "vocabulary. choice is the default because it trains what is evaluated; on the quickstart "
        "over 3 seeds the two ended within noise of each other (docs/RESULTS.md, 'Quickstart "
        "learning options').",
    )
    lm_weight: float = Field(
        0.0,
        ge=0,
        description="choice objective only: weight of the answer's next-token NLL mixed into the "
        "loss (0: none).",
    )
    optimizer_state: Literal["keep", "reset"] = Field(
        "keep",
        description="keep: each client's AdamW moments carry over from one of its rounds to the "
        "next (in checkpoints, exact under --resume); reset: fresh moments every round (the "
        "behaviour before).",
    )
    fisher: Literal["endpoint", "trajectory"] = Field(
        "endpoint",
        description="fednano only: the diagonal Fisher each client uploads. endpoint: the "
        "empirical Fisher at the end of local training, the mean of per-example squared gradients "
        "of each example's negative log-likelihood over train.fisher_examples of its training "
        "examples (Matena & Raffel's Fisher merging; costs ceil(fisher_examples / batch_size) "
        "extra split steps without an update); trajectory: the mean squared mini-batch gradient "
        "over the local steps (free, but its scale follows the batch size and how far the client "
        "still is from its optimum: an ablation).",
    )
    fisher_examples: int = Field(
        16,
        ge=1,
        description="fednano, fisher=endpoint: the bounded sample of training examples the Fisher "
        "averages over.",
    )
    fisher_normalize: bool = Field(
        True,
        description="fednano only: divide each adapter tensor's Fisher by its mean before upload, "
        "so it ranks the client's coordinates against each other and no client wins a coordinate "
        "by the scale of its gradients alone.",
    )
    eval_batch_size: int = Field(32, ge=1, description="Rows per forward when scoring choices.")
    max_batch_size: int = Field(
        64, ge=1, description="LLM trainer: most rows merged into one forward/backward."
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, description="LLM trainer: how long to wait for more requests to merge."
    )
    pad_to_multiple: int = Field(
        8,
        ge=1,
        description="LLM trainer: pad each split step to a multiple of this many tokens and merge "
        "only requests of the same padded length, so a client's loss and gradient are "
        "bit-identical whatever it was batched with (runs reproduce exactly); larger values merge "
        "more requests at the cost of more padding.",
    )
    trainer_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs of the LLM trainer actor.")
    trainer_num_gpus: float = Field(0.0, ge=0, description="Ray GPUs of the LLM trainer actor.")
    trainer_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of the LLM trainer (default: every core of its node; Ray's "
        "num_cpus only schedules).",
    )


class ServeConfig(_Section):
    """HTTP serving of the personalised models: ``fednano-ray serve RUN_DIR``'s defaults (its
    --host, --port and --engine override them)."""

    host: str = Field("127.0.0.1", description="Bind address (loopback only by default).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    engine: Literal["vllm", "hf"] = Field("hf", description="Generation engine of the frozen LLM.")

    @model_validator(mode="before")
    @classmethod
    def _drop_unused(cls, data: Any) -> Any:
        """serve.max_new_tokens was never read (each request sets its own): run directories that
        still have it load without it."""
        if isinstance(data, dict) and "max_new_tokens" in data:
            data = {k: v for k, v in data.items() if k != "max_new_tokens"}
        return data


class DPConfig(_Section):
    """Client-level differential privacy, DP-FedAvg (McMahan et al. 2018): clip each client's delta
    to clip_norm, average over the sampled clients, add Gaussian noise of std noise_multiplier *
    clip_norm / m."""

    noise_multiplier: float = Field(
        1.0, gt=0, description="z: noise std over the clip norm (larger: more private, noisier)."
    )
    clip_norm: float = Field(
        gt=0,
        description="C: bound on each client's update norm ||theta_i - theta_global|| (pick near "
        "honest updates' norms).",
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="delta of the (epsilon, delta) guarantee; keep it below 1/num_clients.",
    )
    accountant: Literal["pld", "rdp"] = Field(
        "pld",
        description="dp-accounting accountant for epsilon: pld (tight) or rdp (Renyi DP, a looser "
        "bound).",
    )
    secret_sampling: bool = Field(
        True,
        description="true: each round's clients are drawn from OS entropy and results.json names "
        "none of them (which clients took part, their losses, their nodes), as the accountant's "
        "subsampling amplification assumes; false: the seeded sample is published and epsilon is "
        "accounted without amplification (sampling rate 1).",
    )


class TrustConfig(_Section):
    """Update validation, robust aggregation, client-level DP and secure aggregation (docs:
    fednano_ray/trust)."""

    max_update_norm: float | None = Field(
        None,
        gt=0,
        description="Reject updates with ||theta_i - theta_global|| above this (null: no bound).",
    )
    aggregator: Literal["mean", "median", "trimmed_mean", "clip"] = Field(
        "mean",
        description="mean: the strategy's own rule; median / trimmed_mean: coordinate-wise robust "
        "rules; clip: clip each delta to clip_norm, then the example-weighted mean.",
    )
    trim_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="trimmed_mean only: fraction trimmed from each side."
    )
    clip_norm: float | None = Field(
        None, gt=0, description="clip only: bound on each client's delta norm."
    )
    dp: DPConfig | None = Field(None, description="Client-level DP (DP-FedAvg); null: off.")
    secure_aggregation: bool = Field(
        False,
        description="Sum updates with SecAgg masking, so the server sees only the sum (simulated "
        "in the coordinator).",
    )

    @model_validator(mode="after")
    def _check(self) -> TrustConfig:
        if self.aggregator == "clip" and self.clip_norm is None:
            raise ValueError(
                "trust.aggregator 'clip' needs trust.clip_norm (e.g. trust.clip_norm=1.0)"
            )
        if self.clip_norm is not None and self.aggregator != "clip":
            raise ValueError(
                f"trust.clip_norm is set but trust.aggregator is {self.aggregator!r}: set "
                "trust.aggregator=clip (for DP use trust.dp.clip_norm)"
            )
        if self.dp is not None and self.aggregator != "mean":
            raise ValueError(
                "trust.dp clips and averages by itself: leave trust.aggregator at 'mean', not "
                f"{self.aggregator!r}"
            )
        if self.secure_aggregation and self.aggregator in ("median", "trimmed_mean"):
            raise ValueError(
                f"trust.secure_aggregation with trust.aggregator {self.aggregator!r} is "
                "impossible: the server sees only the sum of updates, and a median or trimmed mean "
                "needs each one; use mean or clip"
            )
        if self.secure_aggregation and self.max_update_norm is not None:
            raise ValueError(
                "trust.max_update_norm cannot be checked under trust.secure_aggregation (the "
                "server never sees one update); bound updates with trust.aggregator=clip or "
                "trust.dp instead"
            )
        return self


class Config(_Section):
    """The whole run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The multimodal LLM.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="NanoAdapters.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data and partitioning.")
    federation: FederationConfig = Field(
        default_factory=FederationConfig, description="Federation."
    )
    tiers: tuple[TierConfig, ...] = Field(
        (TierConfig(name="default", clients=8),), min_length=1, description="Client tiers."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    trust: TrustConfig = Field(
        default_factory=TrustConfig,
        description="Update validation, robust aggregation, DP, secure aggregation.",
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        fed = self.federation
        n_tier = sum(t.clients for t in self.tiers)
        if n_tier != fed.num_clients:
            raise ValueError(
                f"tiers assign {n_tier} clients but federation.num_clients is {fed.num_clients}: "
                "make tiers[*].clients add up to federation.num_clients"
            )
        if fed.clients_per_round > fed.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) is larger than "
                f"federation.num_clients ({fed.num_clients}); lower it or add clients"
            )
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        spec = METHODS[fed.strategy]
        if fed.personalize_steps and spec.personal_only:
            raise ValueError(
                "federation.personalize_steps fine-tunes the global adapters on each client, but "
                f"strategy {fed.strategy} has no global model (every client already trains its "
                "own): set federation.personalize_steps=0"
            )
        if spec.dual_adapter and not fed.personalize_steps:
            raise ValueError(
                f"federation.strategy {fed.strategy} trains each client's local adapter after the "
                "last round for federation.personalize_steps steps, which is 0: set it, e.g. "
                "federation.personalize_steps=20"
            )
        if self.adapter.factors == "product":
            trust = self.trust
            if not spec.product_factors:
                ok = _either(m.name for m in METHODS.values() if m.product_factors)
                raise ValueError(
                    f"adapter.factors=product is a FedAvg of the clients' B@A; federation.strategy "
                    f"{fed.strategy} aggregates otherwise: use {ok}, or "
                    "adapter.factors=frozen_a (exact Fisher merging of B)"
                )
            if trust.secure_aggregation or trust.dp is not None or trust.aggregator != "mean":
                raise ValueError(
                    "adapter.factors=product needs each client's factors in the clear to form B@A: "
                    "turn off trust.secure_aggregation, trust.dp and robust trust.aggregator "
                    "rules, or use adapter.factors=frozen_a"
                )
            if self.train.optimizer_state != "reset":
                raise ValueError(
                    "adapter.factors=product re-factorises the global adapters every round, so a "
                    "client's kept AdamW moments would refer to other factors: set "
                    "train.optimizer_state=reset"
                )
        if fed.server_lr != 1.0:
            if not spec.aggregates:
                raise ValueError(
                    f"federation.server_lr={fed.server_lr} scales the step from one global state "
                    f"to the next, but federation.strategy {fed.strategy} aggregates nothing: set "
                    "federation.server_lr=1"
                )
            if self.adapter.factors == "product":
                raise ValueError(
                    f"federation.server_lr={fed.server_lr} steps each tensor from the old global "
                    "state, but adapter.factors=product re-factorises the global adapters every "
                    "round, so the old factors are in another basis: set federation.server_lr=1 or "
                    "adapter.factors=joint or frozen_a"
                )
        if self.adapter.kind != "lowrank" and spec.client.holds_llm:
            raise ValueError(
                f"adapter.kind={self.adapter.kind} is a NanoAdapter form; federation.strategy "
                f"{fed.strategy} trains PEFT LoRA inside the LLM: leave adapter.kind at lowrank"
            )
        if self.adapter.kind in ("slots", "connector") and "vision" not in self.adapter.modalities:
            raise ValueError(
                f"adapter.kind={self.adapter.kind} adapts the visual tokens, but "
                f"adapter.modalities {list(self.adapter.modalities)} has no vision: add vision or "
                "use adapter.kind=lowrank"
            )
        if self.adapter.factors != "joint" and spec.client.holds_llm:
            raise ValueError(
                f"adapter.factors={self.adapter.factors} applies to NanoAdapters; "
                f"federation.strategy {fed.strategy} trains PEFT LoRA inside the LLM: leave "
                "adapter.factors at joint"
            )
        return self

    @model_validator(mode="after")
    def _check_min_holdout(self) -> Config:
        # Known here only for the synthetic set or a max_train_examples cap; prepare_data checks a
        # data.path set.
        msg = min_holdout_error(self.data, self.federation.num_clients, None)
        if msg:
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _check_trust(self) -> Config:
        trust, fed = self.trust, self.federation
        # fedavg-lora is FedAvg over the LLM's LoRA: robust rules, DP-FedAvg and SecAgg apply to
        # any state.
        spec = METHODS[fed.strategy]
        robust = _either(m.name for m in METHODS.values() if m.robust)
        if trust.aggregator != "mean" and not spec.robust:
            raise ValueError(
                f"trust.aggregator {trust.aggregator!r} replaces the example-weighted mean, so it "
                f"needs federation.strategy {robust}, not {fed.strategy!r}"
            )
        if trust.dp is not None:
            if not spec.robust:
                raise ValueError(
                    f"trust.dp needs federation.strategy {robust}, not {fed.strategy!r} "
                    "(fednano's Fisher is not privatised; local and centralized do not aggregate; "
                    "fedavgm's momentum would be dropped)"
                )
            if trust.dp.delta >= 1 / fed.num_clients:
                raise ValueError(
                    f"trust.dp.delta ({trust.dp.delta:g}) must be below 1/federation.num_clients "
                    f"({1 / fed.num_clients:g}): a larger delta allows revealing a whole client"
                )
        if trust.secure_aggregation and not spec.aggregates:
            raise ValueError(
                "trust.secure_aggregation needs a federated sum; federation.strategy "
                f"{fed.strategy!r} has none"
            )
        return self

    def client_bank_size(self) -> int:
        """Most training summaries a client keeps beside its local adapter: the ``bank_size`` option
        of a dual-adapter method (FedDPA-F's dynamic weight), else 0 (no bank)."""
        return self.method().bank_size

    def clients_hold_llm(self) -> bool:
        """True when every client trains its own copy of the whole MLLM (``fedavg-lora``): no split
        step, so no shared LLM trainer."""
        return METHODS[self.federation.strategy].client.holds_llm

    def method(self) -> Method:
        """The run's method, resolved from ``federation`` and ``trust``
        (fednano_ray/federation/method.py)."""
        return Method.from_config(self)

    def tier_rank(self, tier: TierConfig) -> int:
        """The adapter rank a tier trains at."""
        return tier.adapter_rank or self.adapter.r

    def client_tiers(self) -> list[TierConfig]:
        """The tier of each client id 0..num_clients-1, in the order tiers are listed."""
        out: list[TierConfig] = []
        for t in self.tiers:
            out.extend([t] * t.clients)
        return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(k)]
            continue
        if k not in node or node[k] is None:
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict | list):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars (``3``, ``true``, ``[a, b]``)."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set federation.rounds=5")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw else ""))
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = (
                "unknown key (check the spelling; `fednano-ray train --help-config` lists the keys)"
            )
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(
    source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> Config:
    """Load a config from a YAML file (or a dict), apply ``--set`` overrides, validate.

    Raises:
        ConfigError: naming the file, the dotted key and what to do.
    """
    if source is None:
        tree: dict[str, Any] = {}
        name = "<defaults>"
    elif isinstance(source, dict):
        tree = copy.deepcopy(source)
        name = "<dict>"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see examples/quickstart.yaml)")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections (model, data, ...)"
            )
    for key, value in parse_overrides(overrides):
        try:
            _set_dotted(tree, key, value)
        except ConfigError:
            raise
        except (IndexError, ValueError, TypeError) as e:
            raise ConfigError(f"--set {key}: {e}") from e
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, name)) from None


def describe_config(model: type[BaseModel] | None = None, prefix: str = "") -> str:
    """Every key of the config tree with its default and description
    (``fednano-ray train --help-config``)."""
    model = model or Config
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            lines.append(f"{key}:  {field.description or ''}".rstrip())
            lines.append(describe_config(kind, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"{key} = {default!r}\n    {field.description or ''}".rstrip())
    return "\n".join(lines)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written to the run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
