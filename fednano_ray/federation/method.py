"""What a federated method is, resolved once from the config.

A method is more than its aggregation rule. It also says what a client holds (a NanoEdge beside a
shared frozen LLM, or the whole MLLM), whether the clients' data is pooled, whether clients upload a
Fisher, whether there is a global model at all, whether a shared LLM trainer is started, and which
``trust`` rules and adapter options make sense with it. :data:`METHODS` holds one
:class:`MethodSpec` entry per ``federation.strategy``; the config validates against the entries,
and the coordinator, accounting, serving and the CLI read the resolved :class:`Method`.

Adding a baseline is its strategy file (``fednano_ray/strategies/``), one entry here and its tests::

    MethodSpec("fedavgm", "FedAvg with server momentum",
               strategy="fednano_ray.strategies.fedavgm:FedAvgM", options=FedAvgMOptions)

The resolved :class:`Method` also applies ``cfg.trust`` to a round: it screens the updates that
arrived (:meth:`Method.screen`), aggregates them on the plain uplink (:meth:`Method.aggregate`) and
accounts the privacy spent (:meth:`Method.dp_extras`, :meth:`Method.trust_summary`).

This module imports neither Ray nor torch; :meth:`Method.build_strategy` imports the strategies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from fednano_ray.config import Config
    from fednano_ray.strategies.base import ClientFailure, ClientUpdate, Strategy

__all__ = [
    "FULL_MLLM",
    "METHODS",
    "NANO_EDGE",
    "ClientKind",
    "Method",
    "MethodSpec",
    "method_names",
    "resolve_options",
]


@dataclass(frozen=True)
class ClientKind:
    """What a client holds and trains.

    Attributes:
        name: ``nano-edge`` or ``full-mllm``.
        holds_llm: True if the client holds the whole MLLM and trains PEFT LoRA inside its LLM: no
            split step, no shared LLM trainer, nothing to serve in front of a shared LLM.
        adapter_kind: What accounting calls the trained parameters (``nano_adapter``, ``llm_lora``).
    """

    name: str
    holds_llm: bool
    adapter_kind: str


#: FedNano's client: encoder, connector, embeddings and NanoAdapters; the LLM stays on the server.
NANO_EDGE = ClientKind("nano-edge", holds_llm=False, adapter_kind="nano_adapter")
#: The conventional baseline's client: the whole MLLM, with PEFT LoRA inside its LLM.
FULL_MLLM = ClientKind("full-mllm", holds_llm=True, adapter_kind="llm_lora")


class _Options(BaseModel):
    """Options of one strategy (``federation.strategy_options``): none by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FedNanoOptions(_Options):
    eps: float = Field(
        1e-8, gt=0, description="Epsilon of Fisher merging (keeps the weights' sum positive)."
    )
    max_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Largest share of any coordinate's Fisher weight one client may hold (the "
        "clipped Fisher share; 1: plain Fisher merging). Not applied under secure aggregation.",
    )


class FedProxOptions(_Options):
    mu: float = Field(
        0.01, ge=0, description="Proximal coefficient mu of mu/2 ||theta - theta_global||^2."
    )


class FedAvgMOptions(_Options):
    momentum: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="Server momentum beta (Hsu et al. 2019): v <- beta v + (mean - theta), "
        "theta <- theta + server_lr * v. 0 is FedAvg.",
    )


class FedDPAFOptions(_Options):
    train_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The local adapter's constant weight w in (1 - w) E_global + w E_local while "
        "the local adapter trains (the paper's fixed mixing weight during training).",
    )
    top_k: int = Field(
        5,
        ge=1,
        description="The dynamic weight at inference is the mean of the top-k cosine similarities "
        "between the instance's frozen summary and the client's bank, clipped to [0, 1].",
    )
    bank_size: int = Field(
        256,
        ge=1,
        description="Most training-prompt summaries a client keeps for the dynamic weight (a "
        "seeded subsample when its shard is larger); checkpointed beside its local adapter, "
        "counted in client storage.",
    )


def _check_feddpa(options: FedDPAFOptions) -> str | None:
    if options.top_k > options.bank_size:
        return (
            f"federation.strategy_options.top_k ({options.top_k}) averages more bank entries than "
            f"federation.strategy_options.bank_size ({options.bank_size}) keeps: "
            "lower top_k or raise bank_size"
        )
    return None


@dataclass(frozen=True)
class MethodSpec:
    """One ``federation.strategy``: its rule and what the rest of the platform must do for it.

    Attributes:
        name: The config's name (``federation.strategy``).
        summary: One line for the config's description and ``--help-config``.
        strategy: Its aggregation rule: a name in ``fednano_ray.strategies.STRATEGIES``, or the
            ``module:Class`` path of a :class:`~fednano_ray.strategies.base.Strategy` subclass.
        options: The pydantic model of ``federation.strategy_options``; its fields are the strategy
            constructor's keyword arguments.
        client: What a client holds (:data:`NANO_EDGE` or :data:`FULL_MLLM`).
        pooled: One "client" holding every client's training data (the centralised upper bound).
        aggregates: The rounds merge client updates into a global model (so a server learning
            rate and secure aggregation apply).
        personal_only: No global model: every client trains only its own adapters.
        dual_adapter: Every client ends with a global and a local adapter (needs personalisation).
        fisher_upload: Clients upload a diagonal Fisher with their state (Fisher merging).
        robust: ``trust.aggregator`` robust rules and ``trust.dp`` may replace its weighted mean.
        product_factors: ``adapter.factors: product`` (FedAvg of the clients' ``B @ A``) applies.
        check: Cross-option rules: returns an error message, or None.
    """

    name: str
    summary: str
    strategy: str = ""
    options: type[_Options] = _Options
    client: ClientKind = NANO_EDGE
    pooled: bool = False
    aggregates: bool = True
    personal_only: bool = False
    dual_adapter: bool = False
    fisher_upload: bool = False
    robust: bool = False
    product_factors: bool = False
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.strategy:
            object.__setattr__(self, "strategy", self.name)


#: Every method, in the order tables list them (baselines first, the full-model reference last).
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "local",
            "every client trains only its own adapters, no federation (lower bound)",
            aggregates=False,
            personal_only=True,
        ),
        MethodSpec(
            "centralized",
            "every client's training data pooled into one run (upper bound)",
            pooled=True,
            aggregates=False,
        ),
        MethodSpec(
            "fedavg", "example-weighted mean of the NanoAdapters", robust=True, product_factors=True
        ),
        MethodSpec(
            "fedprox",
            "FedAvg with a proximal term on the clients (Li et al. 2020)",
            options=FedProxOptions,
            robust=True,
            product_factors=True,
        ),
        MethodSpec(
            "fedavgm",
            "FedAvg with server momentum (Hsu et al. 2019, arXiv 1909.06335)",
            strategy="fednano_ray.strategies.fedavgm:FedAvgM",
            options=FedAvgMOptions,
        ),
        MethodSpec(
            "fednano",
            "Fisher merging of the NanoAdapters (FedNano, arXiv 2506.14824)",
            options=FedNanoOptions,
            fisher_upload=True,
        ),
        MethodSpec(
            "feddpa-f",
            "FedDPA-F (Yang et al. 2024): a FedAvg global adapter, then a local adapter per "
            "client beside it, mixed per instance",
            options=FedDPAFOptions,
            dual_adapter=True,
            product_factors=True,
            check=_check_feddpa,
        ),
        MethodSpec(
            "fedavg-lora",
            "the conventional baseline: every client holds the whole MLLM and trains PEFT "
            "LoRA inside its LLM, FedAvg",
            client=FULL_MLLM,
            robust=True,
        ),
    )
}


def method_names() -> tuple[str, ...]:
    """The valid ``federation.strategy`` names, in :data:`METHODS` order."""
    return tuple(METHODS)


def resolve_options(name: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """``federation.strategy_options`` validated for method ``name``, with defaults filled in.

    Raises:
        ValueError: naming the unknown method, or the bad option and the valid ones.
    """
    try:
        spec = METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown federation.strategy {name!r}; valid: {', '.join(METHODS)}"
        ) from None
    raw = dict(raw or {})
    valid = list(spec.options.model_fields)
    try:
        options = spec.options(**raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            why = (
                f"unknown option (valid for {name}: {', '.join(valid) or 'none'})"
                if e["type"] == "extra_forbidden"
                else e["msg"]
            )
            problems.append(f"federation.strategy_options.{key}: {why}")
        raise ValueError("; ".join(problems)) from None
    if spec.check is not None and (msg := spec.check(options)):
        raise ValueError(msg)
    return options.model_dump()


DP_TRUST_ASSUMPTION = (
    "client-level (epsilon, delta) against everyone who sees the released adapters, assuming the "
    "coordinator is trusted: it draws the noise and the sample and, without secure aggregation, "
    "sees each client's clipped update in the clear"
)
DP_NOT_COVERED = (
    "outside the DP accounting: the round losses and every accuracy (per client and global), "
    "computed on the clients' data without noise; with secret_sampling=false also which clients "
    "took part"
)


@dataclass(frozen=True)
class Method:
    """The run's method: its :class:`MethodSpec`, its options and how ``trust`` changes it.

    Build it with :meth:`from_config`. ``aggregation`` names the rule that actually merges the
    updates: the method's own, or ``dp_fedavg`` / a robust rule when ``trust`` replaces it.
    """

    spec: MethodSpec
    options: Mapping[str, Any]
    adapter_factors: str = "joint"
    aggregation: str = ""
    aggregation_options: Mapping[str, Any] = field(default_factory=dict)
    uplink: Literal["plain", "secagg"] = "plain"
    bank_size: int = 0
    trust: Any = None  # cfg.trust (TrustConfig): screening bounds and the DP accounting
    max_rank: int = 0  # the largest tier rank: no update may be wider
    sampling_rate: float = 1.0  # clients_per_round / num_clients (DP accounting)

    @classmethod
    def from_config(cls, cfg: Config) -> Method:
        fed, trust = cfg.federation, cfg.trust
        spec = METHODS[fed.strategy]
        options = dict(fed.strategy_options)
        mu = float(options.get("mu", 0.0))
        aggregation, agg_options = spec.strategy, {**options}
        if spec.product_factors and cfg.adapter.factors == "product":
            agg_options["factors"] = "product"
        if trust.dp is not None:
            aggregation = "dp_fedavg"
            agg_options = {
                "clip_norm": trust.dp.clip_norm,
                "noise_multiplier": trust.dp.noise_multiplier,
                "mu": mu,
            }
        elif trust.aggregator == "median":
            aggregation, agg_options = "median", {"mu": mu}
        elif trust.aggregator == "trimmed_mean":
            aggregation, agg_options = (
                "trimmed_mean",
                {"trim_fraction": trust.trim_fraction, "mu": mu},
            )
        elif trust.aggregator == "clip":
            aggregation, agg_options = "clip", {"clip_norm": trust.clip_norm, "mu": mu}
        secagg = trust.secure_aggregation and spec.aggregates and not spec.personal_only
        return cls(
            spec=spec,
            options=options,
            adapter_factors=cfg.adapter.factors,
            aggregation=aggregation,
            aggregation_options=agg_options,
            uplink="secagg" if secagg else "plain",
            bank_size=int(options["bank_size"]) if spec.dual_adapter else 0,
            trust=trust,
            max_rank=max(cfg.tier_rank(t) for t in cfg.tiers),
            # A published sample buys no amplification: account every round as if all took part.
            sampling_rate=(
                fed.clients_per_round / fed.num_clients
                if trust.dp is None or trust.dp.secret_sampling
                else 1.0
            ),
        )

    # -- what the platform asks -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def client(self) -> ClientKind:
        return self.spec.client

    @property
    def pooled(self) -> bool:
        return self.spec.pooled

    @property
    def personal_only(self) -> bool:
        return self.spec.personal_only

    @property
    def dual_adapter(self) -> bool:
        return self.spec.dual_adapter

    @property
    def fisher_upload(self) -> bool:
        return self.spec.fisher_upload

    @property
    def secret_sampling(self) -> bool:
        """Rounds sample from OS entropy and the results name no client (``trust.dp``'s
        ``secret_sampling``)."""
        dp = self.trust.dp if self.trust is not None else None
        return dp is not None and dp.secret_sampling

    @property
    def needs_trainer(self) -> bool:
        """A shared frozen-LLM trainer runs the split steps (every method whose clients are
        NanoEdges)."""
        return not self.spec.client.holds_llm

    def build_strategy(self) -> Strategy:
        """A fresh instance of the rule that merges this run's updates."""
        from fednano_ray.strategies import build_strategy

        if ":" not in self.aggregation:
            return build_strategy(self.aggregation, **self.aggregation_options)
        import importlib

        module, cls = self.aggregation.split(":")
        try:
            return getattr(importlib.import_module(module), cls)(**self.aggregation_options)
        except TypeError as err:
            raise ValueError(
                f"strategy {self.name!r}: bad options {sorted(self.aggregation_options)}: {err}"
            ) from err

    # -- cfg.trust applied to a round -------------------------------------------------------------

    def screen(
        self,
        updates: Sequence[ClientUpdate],
        reference: Callable[[ClientUpdate], Mapping[str, Tensor]],
    ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        """Valid updates, and ``ClientFailure(id, "rejected: <reason>")`` for the others.

        Structure, dtype and finiteness are always checked; the norm bound only if
        ``trust.max_update_norm`` is set; the Fisher only where the method uploads one (fednano).
        """
        from fednano_ray.trust.validate import screen_updates

        return screen_updates(
            updates,
            reference,
            max_rank=self.max_rank,
            max_update_norm=self.trust.max_update_norm,
            check_fisher=self.fisher_upload,
        )

    def aggregate(
        self,
        strategy: Strategy,
        rnd: int,
        global_state: dict[str, Tensor],
        updates: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure],
        history: Sequence[Mapping[str, Any]],
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The plain uplink's aggregation: the next global state, and what to add to the round
        record.

        Args:
            strategy: The run's strategy (:meth:`build_strategy`).
            rnd: The round number (seeds DP noise).
            global_state, updates, failures: As :meth:`Strategy.aggregate`.
            history: The records of the rounds before this one (to count DP releases on resume).

        Returns:
            ``(state, extras)``; ``extras`` may hold ``dp_epsilon`` / ``dp_delta`` /
            ``dp_noise_std`` / ``dp_releases``.

        Raises:
            ValueError: under the SecAgg uplink: no update may be aggregated in the clear (the
                round's SecAgg uplink finishes the masked sum and uses :meth:`dp_extras`).
        """
        if self.uplink == "secagg":
            raise ValueError(
                "trust.secure_aggregation: the clients mask their own terms and the round finishes "
                "the masked sum (Federation's SecAgg uplink); plain updates must not be aggregated"
            )
        strategy.begin_round(rnd)
        state = strategy.aggregate(global_state, updates, failures)
        return state, self.dp_extras(len(updates) + len(failures), history)

    def dp_extras(self, num_sampled: int, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The round record's DP figures for a release among ``num_sampled`` clients (empty
        without DP)."""
        dp = self.trust.dp
        if dp is None:
            return {}
        releases = 1 + sum(1 for r in history if "dp_epsilon" in r)
        return {
            "dp_epsilon": self.epsilon(releases),
            "dp_delta": dp.delta,
            "dp_noise_std": dp.noise_multiplier * dp.clip_norm / num_sampled,
            "dp_releases": releases,
        }

    def epsilon(self, releases: int) -> float | None:
        """ε after ``releases`` DP rounds at ``trust.dp.delta`` (None without DP)."""
        dp = self.trust.dp
        if dp is None:
            return None
        from fednano_ray.trust.dp import dp_epsilon

        eps = dp_epsilon(dp.noise_multiplier, self.sampling_rate, releases, dp.delta, dp.accountant)
        return eps if math.isfinite(eps) else None

    def trust_summary(self, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Run-level trust figures for ``results.json``'s summary: the final ε, SecAgg, and how many
        updates were rejected."""
        out: dict[str, Any] = {}
        dp = self.trust.dp
        if dp is not None:
            from fednano_ray.trust.dp import accountant_version

            releases = sum(1 for r in history if "dp_epsilon" in r)
            out.update(
                dp_epsilon=self.epsilon(releases),
                dp_delta=dp.delta,
                dp_releases=releases,
                dp_sampling_rate=self.sampling_rate,
                dp_accountant=f"{accountant_version()} ({dp.accountant}, "
                + (
                    "Poisson sampling"
                    if dp.secret_sampling
                    else "no subsampling amplification: the sample is published"
                )
                + ", add/remove-one-client adjacency)",
                dp_trust_assumption=DP_TRUST_ASSUMPTION,
                dp_not_covered=DP_NOT_COVERED,
            )
        if self.trust.secure_aggregation:
            out["secure_aggregation"] = True
        out["rejected_updates"] = sum(
            1 for r in history for f in r.get("failures", ()) if f["reason"].startswith("rejected:")
        )
        return out
