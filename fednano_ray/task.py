"""The federated task a config describes: dataset on disk, client shards, held-out splits."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fednano_ray.config import Config, ConfigError, DataConfig, min_holdout_error
from fednano_ray.data import generate, load_dataset, partition, split_holdout
from fednano_ray.data.dataset import VQAExample
from fednano_ray.data.synth import GENERATOR_VERSION


@dataclass
class FederatedData:
    """Examples and who holds which.

    Attributes:
        train: the training pool the partitioner divides.
        test: the global test split (capped by ``data.max_test_examples``).
        client_train: per client, indices into ``train`` it trains on.
        client_test: per client, indices into ``train`` it keeps as its own held-out test.
    """

    root: Path
    train: list[VQAExample]
    test: list[VQAExample]
    client_train: list[list[int]]
    client_test: list[list[int]]


def dataset_root(data: DataConfig) -> Path:
    """``data.path``, or the synthetic benchmark generated once into the cache."""
    if data.path is not None:
        return Path(data.path).expanduser()
    from fednano_ray.models.pretrained import cache_dir

    s = data.synth
    key = hashlib.sha256(
        json.dumps([GENERATOR_VERSION, s.model_dump()], sort_keys=True).encode()
    ).hexdigest()[:12]
    root = cache_dir() / "datasets" / f"synth-{key}"
    if not (root / "info.json").exists():
        tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
        generate(
            tmp,
            num_train=s.num_train,
            num_test=s.num_test,
            image_size=s.image_size,
            seed=s.seed,
            difficulty=s.difficulty,
        )
        try:
            tmp.replace(root)
        except OSError:  # another process won the race; theirs is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return root


def prepare_data(cfg: Config) -> FederatedData:
    """Load the dataset and split it across ``federation.num_clients`` clients,
    deterministically."""
    d, fed = cfg.data, cfg.federation
    root = dataset_root(d)
    splits = load_dataset(root)
    train, test = splits["train"], splits["test"]
    rng = np.random.default_rng(fed.seed)
    if d.max_train_examples is not None and len(train) > d.max_train_examples:
        train = [
            train[i] for i in sorted(rng.choice(len(train), d.max_train_examples, replace=False))
        ]
    if d.max_test_examples is not None and len(test) > d.max_test_examples:
        test = [test[i] for i in sorted(rng.choice(len(test), d.max_test_examples, replace=False))]
    if d.partition_by == "category":
        labels = [ex.category or "none" for ex in train]
    else:
        labels = [ex.choices[ex.answer] for ex in train]
    # Every client holds out max(round(holdout_fraction * shard), min_holdout) and trains on at
    # least one.
    msg = min_holdout_error(d, fed.num_clients, len(train))
    if msg:
        raise ConfigError(msg)
    try:
        shards = partition(
            labels,
            fed.num_clients,
            d.partition,
            alpha=d.alpha,
            labels_per_client=d.labels_per_client,
            seed=fed.seed,
            min_examples=max(2, d.min_holdout + 1),
        )
    except ValueError as e:
        if d.min_holdout <= 0:
            raise
        raise ConfigError(
            f"data.min_holdout={d.min_holdout} needs at least {d.min_holdout + 1} examples on "
            f"every client ({d.min_holdout} held out + 1 to train) and the {d.partition} "
            f"partition of {len(train)} examples over federation.num_clients={fed.num_clients} "
            f"cannot give that ({e}); lower data.min_holdout, raise data.synth.num_train "
            "(or data.max_train_examples), use fewer clients, or a less skewed split "
            "(a larger data.alpha, data.partition=iid)"
        ) from e
    client_train, client_test = [], []
    for c, shard in enumerate(shards):
        tr, te = split_holdout(shard, d.holdout_fraction, seed=fed.seed + c, min_test=d.min_holdout)
        client_train.append(tr)
        client_test.append(te)
    if d.client_shift:
        from fednano_ray.data.shift import apply_client_shift
        from fednano_ray.models.pretrained import cache_dir

        train, test = apply_client_shift(
            train,
            test,
            [list(tr) + list(te) for tr, te in zip(client_train, client_test, strict=True)],
            d.client_shift,
            cache_dir() / "shifted",
        )
    return FederatedData(
        root=root, train=train, test=test, client_train=client_train, client_test=client_test
    )
