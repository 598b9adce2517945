"""Update validation at the coordinator: reject malformed, non-finite or outsized client updates.

:func:`validate_update` is a pure function: it checks one :class:`ClientUpdate` against the state
the client started from and returns a reason a person can act on, or None if the update may be
aggregated. The coordinator turns a reason into ``ClientFailure(client_id, "rejected: <reason>")``
(:func:`screen_updates`), so a rejected update is recorded with the round's failures, is never
aggregated and does not count towards the quorum.

What is checked, in this order (the first problem found is reported):

1. ``num_examples`` is positive (an update with no examples carries no weight).
2. The keys are exactly the global keys (missing and unexpected keys are named).
3. Every value is a float32 tensor of the global shape; for LoRA keys (see
   :func:`~fednano_ray.strategies.aggregate.rank_dim`) the rank dim may differ, between 1 and
   ``max_rank``, and the ``lora_A``/``lora_B`` tensors of one adapter must share their rank.
4. Every entry is finite (no NaN or Inf).
5. The update norm ``||θ_i − θ_global||`` over all keys, at the client's own rank (the global state
   truncated, or zero-padded, to the client's rank: exactly what the client started from), is at
   most ``max_update_norm``.
6. If ``check_fisher`` and the update carries a Fisher dict: its keys and shapes are the state's,
   it is float32, finite and non-negative (a diagonal Fisher is a mean of squared gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from fednano_ray.strategies.aggregate import rank_dim
from fednano_ray.strategies.base import ClientFailure, ClientUpdate
from fednano_ray.strategies.robust import update_norm

__all__ = ["REJECTED", "screen_updates", "validate_update"]

REJECTED = "rejected: "


def _fmt_shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in tensor.shape)


def _check_tensors(
    what: str,
    tensors: Mapping[str, object],
    reference: Mapping[str, Tensor],
    max_rank: int | None,
) -> str | None:
    """Keys, types, dtypes, shapes and finiteness of ``tensors`` against ``reference``."""
    if not isinstance(tensors, Mapping):
        return f"{what} is a {type(tensors).__name__}, not a mapping of key to tensor"
    if tensors.keys() != reference.keys():
        missing = sorted(reference.keys() - tensors.keys())
        extra = sorted(tensors.keys() - reference.keys())
        return (
            f"{what} keys differ from the global state: missing {missing}, unexpected {extra} "
            "(client and coordinator must use the same adapter.modalities)"
        )
    for key, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            return f"{what} key {key!r} is a {type(tensor).__name__}, not a torch.Tensor"
        if tensor.dtype != torch.float32:
            return f"{what} key {key!r} has dtype {tensor.dtype}; updates must be torch.float32"
        ref = reference[key]
        dim = rank_dim(key)
        if dim is None or ref.ndim != 2:
            if tensor.shape != ref.shape:
                return (
                    f"{what} key {key!r} has shape {_fmt_shape(tensor)}, "
                    f"the global shape is {_fmt_shape(ref)}"
                )
        else:
            if tensor.ndim != 2 or tensor.shape[1 - dim] != ref.shape[1 - dim]:
                return (
                    f"{what} key {key!r} has shape {_fmt_shape(tensor)}, which does not fit the "
                    f"global shape {_fmt_shape(ref)} (only dim {dim}, the rank, may differ)"
                )
            rank = int(tensor.shape[dim])
            if rank < 1 or (max_rank is not None and rank > max_rank):
                limit = (
                    "" if max_rank is None else f" and at most {max_rank}, the largest tier rank"
                )
                return f"{what} key {key!r} has rank {rank}; the rank must be at least 1{limit}"
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            nans = int(torch.isnan(tensor).sum())
            return (
                f"{what} key {key!r} has {bad} non-finite entries ({nans} NaN, {bad - nans} Inf) "
                f"of {tensor.numel()}; the client diverged or its upload is corrupt"
            )
    return None


def _check_rank_pairs(state: Mapping[str, Tensor]) -> str | None:
    """``x.lora_A`` (r, d) and ``x.lora_B`` (d, r) of one adapter must have the same r."""
    for key, tensor in state.items():
        parts = key.split(".")
        if "lora_A" not in parts:
            continue
        partner = ".".join("lora_B" if p == "lora_A" else p for p in parts)
        if partner in state and state[partner].shape[1] != tensor.shape[0]:
            return (
                f"state key {key!r} has rank {tensor.shape[0]} but {partner!r} has rank "
                f"{state[partner].shape[1]}; the two factors of one adapter must share the rank"
            )
    return None


def validate_update(
    global_state: Mapping[str, Tensor],
    update: ClientUpdate,
    *,
    max_rank: int | None = None,
    max_update_norm: float | None = None,
    check_fisher: bool = False,
) -> str | None:
    """Why ``update`` must not be aggregated, or None if it may be.

    Args:
        global_state: The state the client started from (the global adapters, at the largest
            rank; for personalised strategies the client's own previous state).
        update: The client's update.
        max_rank: The largest rank an update may have (the largest tier rank); None: any rank.
        max_update_norm: Bound on ``||θ_i − θ_global||`` at the client's rank (see the module
            docstring); None: no bound.
        check_fisher: Also validate ``update.fisher`` when present (FedNano's Fisher merging).
            A missing Fisher is not an error: FedNano falls back to FedAvg for that round.

    Returns:
        A human-readable reason naming the key and the problem, or None.

    Raises:
        ValueError: If ``max_rank`` or ``max_update_norm`` is not positive.
    """
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if max_update_norm is not None and not max_update_norm > 0:
        raise ValueError(f"max_update_norm must be positive, got {max_update_norm}")
    if update.num_examples <= 0:
        return "reports 0 training examples, so it carries no weight"
    reason = _check_tensors("state", update.state, global_state, max_rank)
    if reason is None:
        reason = _check_rank_pairs(update.state)
    if reason is not None:
        return reason
    if max_update_norm is not None:
        norm = update_norm(global_state, update.state)
        if not norm <= max_update_norm:
            return (
                f"update norm ||θ − θ_global|| = {norm:.4g} exceeds trust.max_update_norm = "
                f"{max_update_norm:g} (a scaled or diverged update; raise the bound if honest "
                "clients reach it)"
            )
    if check_fisher and update.fisher is not None:
        reason = _check_tensors("Fisher", update.fisher, update.state, None)
        if reason is not None:
            return reason
        for key, f in update.fisher.items():
            if bool((f < 0).any()):
                return (
                    f"Fisher key {key!r} has {int((f < 0).sum())} negative entries; a diagonal "
                    "Fisher (mean squared gradient) is >= 0"
                )
    return None


def screen_updates(
    updates: Sequence[ClientUpdate],
    reference: Callable[[ClientUpdate], Mapping[str, Tensor]],
    *,
    max_rank: int | None = None,
    max_update_norm: float | None = None,
    check_fisher: bool = False,
) -> tuple[list[ClientUpdate], list[ClientFailure]]:
    """Split ``updates`` into the valid ones and ``ClientFailure(id, "rejected: <reason>")``.

    Args:
        updates: The updates that arrived this round.
        reference: The state each client started from (``update -> state``).
        max_rank, max_update_norm, check_fisher: As :func:`validate_update`.

    Returns:
        ``(valid, rejected)``, each in the order of ``updates``.
    """
    valid: list[ClientUpdate] = []
    rejected: list[ClientFailure] = []
    for update in updates:
        reason = validate_update(
            reference(update),
            update,
            max_rank=max_rank,
            max_update_norm=max_update_norm,
            check_fisher=check_fisher,
        )
        if reason is None:
            valid.append(update)
        else:
            rejected.append(ClientFailure(update.client_id, REJECTED + reason))
    return valid, rejected
