"""What a run needs before its first round, without Ray: data, the frozen encoder's features, and
the run's accounting; and, for in-process runs, plain client objects.

The coordinator actor calls :func:`prepare_run` and puts :attr:`PreparedRun.client_data` in the
object store; :func:`in_process` builds the same run on plain
:class:`~fednano_ray.actors.client.ClientActor` objects that share one in-process frozen LLM, which
is how the round logic is tested without Ray.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fednano_ray.config import Config
    from fednano_ray.federation.rounds import Federation
    from fednano_ray.task import FederatedData

__all__ = ["PreparedRun", "in_process", "prepare_run"]


@dataclass
class PreparedRun:
    """The partitioned data, what every client actor gets of it, and the accounting.

    Attributes:
        data: who holds which example.
        client_data: ``{"train": (features, questions), "test": (...)}``: the frozen encoder's
            features (computed once, cached on disk for real models) and each question as
            ``(text, choices, answer, category)``.
        accounting: storage and traffic (:func:`fednano_ray.accounting.account_run`, the
            figures ``fednano-ray inspect`` prints).
    """

    data: FederatedData
    client_data: dict[str, Any]
    accounting: dict[str, Any]


def prepare_run(cfg: Config) -> PreparedRun:
    """Load and partition the data, encode its images once, and account the run's bytes.

    Uses every core of this process while it runs (before any other actor exists)."""
    import torch

    from fednano_ray.accounting import account_run
    from fednano_ray.features import cached_features, feature_key
    from fednano_ray.models.build import build_mllm
    from fednano_ray.models.pretrained import cache_dir
    from fednano_ray.task import prepare_data

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        data = prepare_data(cfg)
        mllm = build_mllm.__wrapped__(cfg.model)
        key = feature_key(cfg.model, mllm)
        cache = None if cfg.model.kind == "tiny" else cache_dir() / "features"
        train_f = cached_features(mllm, key, data.train, cache)
        test_f = cached_features(mllm, key, data.test, cache)
        accounting = account_run(
            cfg, mllm
        )  # fedavg-lora: fails here if lora_target_modules fit no layer
        del mllm
        gc.collect()
    finally:
        torch.set_num_threads(threads)
    qs = lambda exs: [(e.question, list(e.choices), e.answer, e.category) for e in exs]
    return PreparedRun(
        data, {"train": (train_f, qs(data.train)), "test": (test_f, qs(data.test))}, accounting
    )


def in_process(
    cfg: Config, run_dir: str | Path, *, client_class: type | None = None, transport=None
) -> Federation:
    """The run of ``cfg`` in this process: one plain client object per tier (a simulation pool of
    one), all calling one in-process frozen LLM, reached through ``transport`` (default
    :class:`~.transport.InProcess`). ``client_class`` replaces ``ClientActor`` (e.g. a faulty
    one)."""
    from fednano_ray.actors.client import ClientActor
    from fednano_ray.federation.rounds import Federation, Placement
    from fednano_ray.federation.transport import InProcess
    from fednano_ray.models.build import build_mllm
    from fednano_ray.training import LocalServer

    prepared = prepare_run(cfg)
    method = cfg.method()
    if method.client.holds_llm:
        server = None
    else:
        _, server_llm = build_mllm.__wrapped__(cfg.model).split(
            cfg.adapter, seed=cfg.federation.seed
        )
        server = LocalServer(server_llm)
    cls = client_class or ClientActor
    actors = {
        t.name: cls(
            cfg.model,
            cfg.adapter,
            rank=cfg.tier_rank(t),
            server=server,
            data=prepared.client_data,
            seed=cfg.federation.seed,
            llm_lora=method.client.holds_llm,
        )
        for t in cfg.tiers
    }
    tiers = cfg.client_tiers()
    top = max(cfg.tiers, key=cfg.tier_rank)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Federation(
        cfg,
        method=method,
        strategy=method.build_strategy(),
        data=prepared.data,
        placement=Placement(lambda c: actors[tiers[c].name], tiers, top, actors[top.name]),
        transport=transport or InProcess(),
        run_dir=run_dir,
        initial_state=actors[top.name].initial_state(),
        accounting=prepared.accounting,
    )
