"""Aggregation math for federated adapters: pure functions on plain state dicts.

Everything here takes and returns ``dict[str, Tensor]`` (adapter state dicts in PEFT's vocabulary)
plus plain numbers: no Ray, pydantic or transport types (Flower's ``server/strategy/aggregate.py``
is the model). Strategies in this package are thin wrappers around these functions.

Rank layout. A key whose dot-separated name has a component ``lora_A`` (``vision.lora_A``,
``x.lora_A.weight``) holds a tensor of shape ``(r, d)``: rank on dim 0. A key with a ``lora_B``
component holds ``(d, r)``: rank on dim 1. Every other key has no rank dim and must have the same
shape on every client.

Heterogeneous ranks (HetLoRA, Cho et al. 2023): states of different ranks are zero-padded to the
largest rank before aggregation and each client truncates the result to its own rank on receipt.
What the padding does depends on the rule:

* ``fedavg`` with ``rank=...``: padded zeros are ordinary values, so a client of smaller rank
  *dilutes* the extra rank rows: with n = (1, 3), a rank-4 client whose row 3 is 2.0 and a rank-2
  client padded with 0 give row 3 = (1 * 2.0 + 3 * 0) / 4 = 0.5. Rows that no client holds become 0.
* ``fisher_merge`` / ``fisher_sums`` with ``rank=...``: each client's terms ``n_i (F_i + eps) θ_i``
  and ``n_i (F_i + eps)`` are computed at its own rank and *then* zero-padded, which is the same as
  padding the client with Fisher 0 and no epsilon: a padded client contributes nothing to the extra
  rows, which become the Fisher-weighted mean of the clients that hold them (2.0 in the example).
  Rows that no client holds have denominator 0 and take ``fallback`` (e.g. the global state) or 0.
  Padding states and Fisher yourself with :func:`pad_to_rank` before calling :func:`fisher_merge`
  is *not* equivalent: epsilon then gives padded zeros a weight ``n_i * eps``, a dilution of order
  ``eps / F`` that only matters where Fisher is itself near ``eps``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

State = dict[str, Tensor]

__all__ = [
    "State",
    "cap_shares",
    "capped_fisher_merge",
    "fedavg",
    "fisher_contribution",
    "fisher_from_sums",
    "fisher_merge",
    "fisher_sums",
    "lora_pairs",
    "max_rank",
    "merge_products",
    "normalize_fisher",
    "pad_to_rank",
    "proximal_penalty",
    "rank_dim",
    "server_step",
    "truncate_to_rank",
    "weighted_average",
]


# --------------------------------------------------------------------------------------------------
# Rank layout
# --------------------------------------------------------------------------------------------------


def rank_dim(key: str) -> int | None:
    """The dim of a state-dict tensor that holds the adapter rank.

    Args:
        key: State-dict key, e.g. ``"vision.lora_A"`` or ``"layer.lora_B.weight"``.

    Returns:
        0 for ``lora_A`` keys (``(r, d)``), 1 for ``lora_B`` keys (``(d, r)``), None otherwise.
    """
    parts = key.split(".")
    if "lora_A" in parts:
        return 0
    if "lora_B" in parts:
        return 1
    return None


def _rank_of(key: str, tensor: Tensor) -> int | None:
    dim = rank_dim(key)
    if dim is None:
        return None
    if tensor.ndim != 2:
        raise ValueError(
            f"key {key!r}: a LoRA tensor must be 2-D ((r, d) for lora_A, (d, r) for lora_B), "
            f"got shape {tuple(tensor.shape)}"
        )
    return int(tensor.shape[dim])


def max_rank(states: Sequence[Mapping[str, Tensor]]) -> int:
    """The largest adapter rank over all LoRA tensors of all states.

    Args:
        states: State dicts, possibly of different ranks.

    Returns:
        The largest rank, or 0 when no key carries a rank (padding to 0 is then a no-op).
    """
    ranks = [
        r
        for state in states
        for key, tensor in state.items()
        if (r := _rank_of(key, tensor)) is not None
    ]
    return max(ranks, default=0)


def pad_to_rank(state: Mapping[str, Tensor], r: int) -> State:
    """Zero-pad every LoRA tensor to rank ``r``: extra rows of ``lora_A``, extra columns of
    ``lora_B``.

    Padding keeps the adapter's output unchanged (``B @ A`` gains only zero terms). Apply it to a
    Fisher dict to give the padded entries Fisher 0.

    Args:
        state: State dict (or Fisher dict) of rank at most ``r``.
        r: Target rank.

    Returns:
        A new dict; tensors that need no padding are shared with ``state``, not copied.

    Raises:
        ValueError: If a LoRA tensor's rank exceeds ``r`` (use :func:`truncate_to_rank`).
    """
    out: State = {}
    for key, tensor in state.items():
        rank = _rank_of(key, tensor)
        if rank is None or rank == r:
            out[key] = tensor
            continue
        if rank > r:
            raise ValueError(
                f"key {key!r} has rank {rank} > {r}: pad_to_rank only grows; "
                "use truncate_to_rank to shrink"
            )
        dim = rank_dim(key)
        assert dim is not None  # a tensor with a rank has a rank dim
        shape = list(tensor.shape)
        shape[dim] = r - rank
        zeros = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        out[key] = torch.cat([tensor, zeros], dim=dim)
    return out


def truncate_to_rank(state: Mapping[str, Tensor], r: int) -> State:
    """Keep the first ``r`` rank components: rows of ``lora_A``, columns of ``lora_B``.

    This is how a client of rank ``r`` takes a max-rank global state on receipt.

    Args:
        state: State dict of rank at least ``r``.
        r: Target rank.

    Returns:
        A new dict of contiguous tensors; tensors without a rank dim are shared, not copied.

    Raises:
        ValueError: If ``r`` is negative or a LoRA tensor's rank is below ``r`` (use
            :func:`pad_to_rank`).
    """
    if r < 0:
        raise ValueError(f"rank must be >= 0, got {r}")
    out: State = {}
    for key, tensor in state.items():
        rank = _rank_of(key, tensor)
        if rank is None or rank == r:
            out[key] = tensor
            continue
        if rank < r:
            raise ValueError(
                f"key {key!r} has rank {rank} < {r}: truncate_to_rank only shrinks; "
                "use pad_to_rank to grow"
            )
        dim = rank_dim(key)
        assert dim is not None  # a tensor with a rank has a rank dim
        out[key] = tensor.narrow(dim, 0, r).contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _check_same_layout(
    states: Sequence[Mapping[str, Tensor]], names: Sequence[str] | None = None
) -> None:
    """Raise ValueError unless every state has the keys and shapes of ``states[0]``.

    ``names`` label the states in messages; the default is ``client 0``, ``client 1``, ...
    """
    if not states:
        raise ValueError("nothing to aggregate: got no states")
    names = names or [f"client {i}" for i in range(len(states))]
    ref = states[0]
    for name, state in zip(names[1:], states[1:], strict=True):
        if state.keys() != ref.keys():
            missing = sorted(ref.keys() - state.keys())
            extra = sorted(state.keys() - ref.keys())
            raise ValueError(
                f"{name}: keys differ from {names[0]} (missing {missing}, unexpected {extra})"
            )
        for key, tensor in state.items():
            if tensor.shape != ref[key].shape:
                raise ValueError(
                    f"{name}, key {key!r}: shape {tuple(tensor.shape)} != "
                    f"{tuple(ref[key].shape)} of {names[0]} (different ranks? pass rank= or pad "
                    "with pad_to_rank first)"
                )


def _check_weights(weights: Sequence[float], count: int) -> None:
    if len(weights) != count:
        raise ValueError(f"got {count} states but {len(weights)} weights")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"client {i}: weight must be finite and >= 0, got {w}")
    if sum(weights) <= 0:
        raise ValueError(f"total weight must be positive, got weights {list(weights)}")


def _acc_dtype(tensor: Tensor) -> torch.dtype:
    # Accumulate floats in float64 so sums over many clients lose nothing; cast back at the end.
    return torch.float64 if tensor.is_floating_point() else torch.float32


def _maybe_pad(
    states: Sequence[Mapping[str, Tensor]], rank: int | None
) -> list[Mapping[str, Tensor]]:
    return list(states) if rank is None else [pad_to_rank(s, rank) for s in states]


# --------------------------------------------------------------------------------------------------
# FedAvg (McMahan et al. 2017)
# --------------------------------------------------------------------------------------------------


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> State:
    """Elementwise ``sum(w_i * θ_i) / sum(w_i)``: the core of FedAvg.

    Args:
        states: State dicts with identical keys and shapes.
        weights: One finite, non-negative weight per state; their sum must be positive.

    Returns:
        A new state dict, each tensor in the dtype and on the device of ``states[0]``.

    Raises:
        ValueError: On no states, a key-set or shape mismatch (naming the client index and key), or
            invalid weights.
    """
    _check_same_layout(states)
    _check_weights(weights, len(states))
    total = float(sum(weights))
    out: State = {}
    for key, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=_acc_dtype(ref), device=ref.device)
        for state, w in zip(states, weights, strict=True):
            if w:
                acc += w * state[key].detach().to(acc.dtype)
        out[key] = (acc / total).to(ref.dtype)
    return out


def fedavg(
    results: Sequence[tuple[Mapping[str, Tensor], int]], *, rank: int | None = None
) -> State:
    """FedAvg: ``sum(n_i θ_i) / sum(n_i)``, weighting each client by its example count.

    Args:
        results: ``(state, num_examples)`` per client.
        rank: If given, zero-pad every state to this rank first (padded zeros dilute: see the
            module docstring). If None, all states must have the same shapes.

    Returns:
        The averaged state dict.

    Raises:
        ValueError: As :func:`weighted_average`, or if a state's rank exceeds ``rank``.
    """
    states = _maybe_pad([s for s, _ in results], rank)
    return weighted_average(states, [float(n) for _, n in results])


# --------------------------------------------------------------------------------------------------
# Product merging: average B·A, then re-factorise (adapter.factors: product)
# --------------------------------------------------------------------------------------------------


def lora_pairs(state: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """``(lora_A key, lora_B key)`` of every adapter in ``state`` whose two factors are both
    present."""
    pairs = []
    for key in state:
        parts = key.split(".")
        if "lora_A" in parts:
            partner = ".".join("lora_B" if p == "lora_A" else p for p in parts)
            if partner in state:
                pairs.append((key, partner))
    return pairs


def merge_products(
    results: Sequence[tuple[Mapping[str, Tensor], float]],
    *,
    rank: int,
    reference: Mapping[str, Tensor],
) -> State:
    """The weighted mean of each adapter's product ``B_i A_i``, re-factorised at ``rank``.

    Averaging ``A`` and ``B`` separately is not averaging ``B A`` (the cross terms ``B_i A_j``
    enter); this averages the products exactly, ``W = Σ w_i B_i A_i / Σ w_i``, and returns the
    factors of its best rank-``rank`` approximation (truncated SVD, Eckart–Young): ``B = U S / c``,
    ``A = c Vᵀ``, with ``c`` the mean row norm of ``reference``'s ``A`` so the factors keep their
    scale. The SVD is taken without forming the (d_out × d_in) matrix: ``W`` is
    ``[w_1 B_1 … w_k B_k] [A_1; …; A_k]``, and two QR decompositions reduce it to a (Σr × Σr) core.
    Components are ordered by singular value, so a client of smaller rank (HetLoRA truncation) takes
    the best rank-r approximation of the merge. Directions beyond ``W``'s rank (round 0's ``B = 0``
    makes ``W = 0``) keep orthonormal rows of ``A`` with ``B = 0`` there, so the factors never
    collapse to the saddle ``A = B = 0``. Keys that are not LoRA factors (a form's rank-free
    tensors) get the plain weighted mean.

    Args:
        results: ``(state, weight)`` per client, each state at its own rank.
        rank: The rank of the returned factors (the largest tier rank).
        reference: The global state the round started from (its ``A`` sets the factor scale).

    Raises:
        ValueError: on no results, non-positive total weight or a key mismatch.
    """
    if not results:
        raise ValueError("merge_products needs at least one client state")
    weights = [float(w) for _, w in results]
    _check_weights(weights, len(results))
    total = sum(weights)
    keys = set(results[0][0])
    for i, (state, _) in enumerate(results):
        if set(state) != keys:
            raise ValueError(f"client {i}: keys {sorted(state)} differ from {sorted(keys)}")
    pairs = lora_pairs(results[0][0])
    paired = {k for pair in pairs for k in pair}
    rest = [k for k in results[0][0] if k not in paired]
    out: State = (
        weighted_average([{k: s[k] for k in rest} for s, _ in results], weights) if rest else {}
    )
    for a_key, b_key in pairs:
        a_ref = reference[a_key].detach().to(torch.float64)
        b_cat = torch.cat(
            [
                s[b_key].detach().to(torch.float64) * (w / total)
                for (s, _), w in zip(results, weights)
            ],
            1,
        )
        a_cat = torch.cat([s[a_key].detach().to(torch.float64) for s, _ in results], 0)
        q_b, r_b = torch.linalg.qr(b_cat)  # (d_out, k), (k, k)
        q_a, r_a = torch.linalg.qr(a_cat.T)  # (d_in, k), (k, k)
        u, sv, vh = torch.linalg.svd(r_b @ r_a.T)
        left, right = q_b @ u, q_a @ vh.T  # W = left diag(sv) rightᵀ
        if right.shape[1] < rank:  # fewer merged components than the rank: complete A's row space
            pad = torch.linalg.qr(
                torch.cat([right, a_ref.T, torch.eye(*a_ref.T.shape, dtype=torch.float64)], 1)
            )[0]
            right = torch.cat([right, pad[:, right.shape[1] : rank]], 1)
            left = torch.cat(
                [left, torch.zeros(left.shape[0], rank - left.shape[1], dtype=torch.float64)], 1
            )
            sv = torch.cat([sv, torch.zeros(rank - sv.shape[0], dtype=torch.float64)])
        norm = float(a_ref.norm(dim=1).mean()) if a_ref.numel() else 0.0
        c = norm if norm > 0 else 1 / math.sqrt(3)  # kaiming-uniform rows have norm ~ 1/sqrt(3)
        out[a_key] = (c * right[:, :rank].T).to(reference[a_key].dtype)
        out[b_key] = (left[:, :rank] * sv[:rank] / c).to(reference[b_key].dtype)
    return {k: out[k] for k in results[0][0]}


# --------------------------------------------------------------------------------------------------
# Fisher merging (Matena & Raffel 2022; FedNano's default, Zhang et al. 2025, arXiv 2506.14824)
# --------------------------------------------------------------------------------------------------


def fisher_contribution(
    state: Mapping[str, Tensor],
    num_examples: int,
    fisher: Mapping[str, Tensor],
    eps: float = 1e-8,
) -> tuple[State, State]:
    """One client's terms of the Fisher-merging sums: ``n (F + eps) ⊙ θ`` and ``n (F + eps)``.

    Secure aggregation needs only the sums of these terms over clients, so each client can compute
    its own and mask them before upload.

    Args:
        state: The client's state dict.
        num_examples: The client's example count ``n`` (>= 0).
        fisher: Diagonal Fisher, same keys and shapes as ``state``, entries >= 0.
        eps: Added to every Fisher entry (>= 0): see :func:`fisher_merge`.

    Returns:
        ``(numerator_term, denominator_term)`` in float64 (the caller casts when done summing).

    Raises:
        ValueError: If ``fisher`` does not match ``state``, has negative or non-finite entries, or
            ``num_examples`` / ``eps`` are invalid.
    """
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if fisher.keys() != state.keys():
        missing = sorted(state.keys() - fisher.keys())
        extra = sorted(fisher.keys() - state.keys())
        raise ValueError(
            f"Fisher keys differ from state keys (missing {missing}, unexpected {extra})"
        )
    num: State = {}
    den: State = {}
    for key, theta in state.items():
        f = fisher[key].detach()
        if f.shape != theta.shape:
            raise ValueError(
                f"key {key!r}: Fisher shape {tuple(f.shape)} != state shape {tuple(theta.shape)}"
            )
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError(f"key {key!r}: Fisher entries must be finite and >= 0")
        weight = float(num_examples) * (f.to(torch.float64) + eps)
        den[key] = weight
        num[key] = weight * theta.detach().to(torch.float64)
    return num, den


def _fisher_sums64(
    results: Sequence[tuple[Mapping[str, Tensor], int, Mapping[str, Tensor]]],
    eps: float,
    rank: int | None,
) -> tuple[State, State]:
    """:func:`fisher_sums` in float64 (what :func:`fisher_merge` divides, to lose nothing)."""
    if not results:
        raise ValueError("nothing to aggregate: got no results")
    if sum(float(n) for _, n, _ in results) <= 0:
        raise ValueError("total num_examples must be positive")
    nums, dens = [], []
    for i, (state, n, fisher) in enumerate(results):
        try:
            num_i, den_i = fisher_contribution(state, n, fisher, eps)
            if rank is not None:
                num_i, den_i = pad_to_rank(num_i, rank), pad_to_rank(den_i, rank)
        except ValueError as err:
            raise ValueError(f"client {i}: {err}") from err
        nums.append(num_i)
        dens.append(den_i)
    _check_same_layout(nums)
    numerator = {key: torch.stack([num[key] for num in nums]).sum(0) for key in nums[0]}
    denominator = {key: torch.stack([den[key] for den in dens]).sum(0) for key in dens[0]}
    return numerator, denominator


def fisher_sums(
    results: Sequence[tuple[Mapping[str, Tensor], int, Mapping[str, Tensor]]],
    eps: float = 1e-8,
    *,
    rank: int | None = None,
) -> tuple[State, State]:
    """The two sums of Fisher merging: ``Σ n_i (F_i + eps) ⊙ θ_i`` and ``Σ n_i (F_i + eps)``.

    :func:`fisher_from_sums` turns them into the merged state; this split exists so secure
    aggregation can sum masked :func:`fisher_contribution` terms without seeing any one client.

    Args:
        results: ``(state, num_examples, fisher)`` per client.
        eps: Added to every Fisher entry (>= 0).
        rank: If given, each client's terms are computed at its own rank and then zero-padded to
            ``rank``, so padded coordinates add nothing to either sum (not even ``eps``). If None,
            all states must have the same shapes.

    Returns:
        ``(numerator, denominator)``, each in the dtype and on the device of the first state.

    Raises:
        ValueError: On no results, key-set or shape mismatches (naming client index and key),
            invalid Fisher, or a state whose rank exceeds ``rank``.
    """
    numerator, denominator = _fisher_sums64(results, eps, rank)
    dtypes = {key: tensor.dtype for key, tensor in results[0][0].items()}
    return (
        {key: value.to(dtypes[key]) for key, value in numerator.items()},
        {key: value.to(dtypes[key]) for key, value in denominator.items()},
    )


def fisher_from_sums(
    numerator: Mapping[str, Tensor],
    denominator: Mapping[str, Tensor],
    *,
    fallback: Mapping[str, Tensor] | None = None,
) -> State:
    """Elementwise ``numerator / denominator``, the merged state from :func:`fisher_sums`.

    Args:
        numerator: ``Σ n_i (F_i + eps) ⊙ θ_i``.
        denominator: ``Σ n_i (F_i + eps)``, entries >= 0.
        fallback: Values for coordinates whose denominator is 0 (no client weighs in there, e.g.
            rank rows no client holds, or ``eps=0`` with all-zero Fisher), typically the current
            global state. If None those coordinates are 0.

    Returns:
        The merged state dict, in the dtype of ``numerator``.

    Raises:
        ValueError: On key-set or shape mismatches (naming the key) or negative denominators.
    """
    _check_same_layout([numerator, denominator], ["numerator", "denominator"])
    if fallback is not None:
        _check_same_layout([numerator, fallback], ["numerator", "fallback"])
    out: State = {}
    for key, num in numerator.items():
        den = denominator[key]
        if bool((den < 0).any()):
            raise ValueError(f"key {key!r}: denominator has negative entries")
        covered = den > 0
        merged = num / torch.where(covered, den, torch.ones_like(den))
        if fallback is None:
            rest = torch.zeros_like(merged)
        else:
            rest = fallback[key].detach().to(merged.dtype)
        out[key] = torch.where(covered, merged, rest)
    return out


def fisher_merge(
    results: Sequence[tuple[Mapping[str, Tensor], int, Mapping[str, Tensor]]],
    eps: float = 1e-8,
    *,
    rank: int | None = None,
    fallback: Mapping[str, Tensor] | None = None,
) -> State:
    """Fisher merging: elementwise ``θ = Σ n_i (F_i + eps) θ_i / Σ n_i (F_i + eps)``.

    Each coordinate is a mean of the clients' values weighted by ``n_i`` times how sensitive client
    ``i``'s loss is to that coordinate (its diagonal Fisher ``F_i``). Where Fisher is large compared
    with ``eps``, ``eps`` does not matter; where every client's Fisher is 0 (e.g. ``lora_A`` in
    round 0, whose gradient vanishes while ``lora_B`` is 0) the weights are ``n_i * eps`` and the
    result is exactly FedAvg. With ``eps=0`` such coordinates take ``fallback`` (or 0) instead.

    Args:
        results: ``(state, num_examples, fisher)`` per client; Fisher matches the state's layout.
        eps: Added to every Fisher entry (>= 0).
        rank: Zero-pad each client's terms to this rank (see :func:`fisher_sums`).
        fallback: Values where the denominator is 0 (see :func:`fisher_from_sums`).

    Returns:
        The merged state dict in the dtype of the first state.

    Raises:
        ValueError: As :func:`fisher_sums`.
    """
    numerator, denominator = _fisher_sums64(results, eps, rank)
    merged = fisher_from_sums(numerator, denominator, fallback=fallback)
    dtypes = {key: tensor.dtype for key, tensor in results[0][0].items()}
    return {key: value.to(dtypes[key]) for key, value in merged.items()}


def normalize_fisher(fisher: Mapping[str, Tensor]) -> State:
    """Each tensor of a diagonal Fisher divided by its mean (float64); an all-zero tensor stays 0.

    Fisher merging weighs a client by its Fisher's magnitude, which the client reports: scaled by
    ``1e9`` it would decide every coordinate. After this, a client's Fisher says only where in a
    tensor its loss is sensitive, not how loudly it claims so (``train.fisher_normalize`` does the
    same on the client; doing it again changes nothing).
    """
    out: State = {}
    for key, f in fisher.items():
        f64 = f.detach().to(torch.float64)
        mean = f64.mean() if f64.numel() else f64.new_zeros(())
        out[key] = f64 / mean if float(mean) > 0 else torch.zeros_like(f64)
    return out


def cap_shares(weights: Tensor, max_share: float) -> Tensor:
    """Coordinate-wise weights (clients along dim 0) lowered so that no client's share
    ``w_i / Σ_j w_j`` of any coordinate exceeds ``max_share``.

    Per coordinate the largest weights are cut to a common level ``t`` (water-filling), the others
    kept: ``t = s · Σ_j min(w_j, t)``. Where fewer than ``1 / s`` clients hold a coordinate the
    bound is ``1 / k`` for the ``k`` that do (the best any rule can do): a coordinate one client
    alone holds stays that client's.

    Args:
        weights: ``(clients, ...)``, entries >= 0.
        max_share: ``s`` in (0, 1]; 1 returns ``weights`` unchanged.

    Returns:
        The capped weights, the shape and dtype of ``weights``.

    Raises:
        ValueError: If ``max_share`` is outside (0, 1] or a weight is negative.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if bool((weights < 0).any()):
        raise ValueError("cap_shares: weights must be >= 0")
    k = weights.shape[0]
    if max_share >= 1 or k < 2:
        return weights
    w = weights.reshape(k, -1).to(torch.float64)
    holders = (w > 0).sum(0).clamp_min(1).to(torch.float64)
    s = torch.maximum(torch.full_like(holders, max_share), 1.0 / holders)
    ordered = torch.sort(w, dim=0, descending=True).values
    rest = ordered.flip(0).cumsum(0).flip(0)  # rest[j]: the sum of all but the j largest
    level = torch.full_like(holders, math.inf)  # inf: nothing to cut
    found = torch.zeros_like(holders, dtype=torch.bool)
    for j in range(k):  # j clients cut to the level; the smallest j that is consistent wins
        room = 1 - s * j
        t = torch.where(room > 0, s * rest[j] / room.clamp_min(1e-300), math.inf)
        ok = (~found) & (room > 1e-12) & (ordered[j] <= t * (1 + 1e-12))
        level = torch.where(ok, t, level)
        found |= ok
    capped = torch.minimum(w, level.unsqueeze(0))
    return capped.reshape(weights.shape).to(weights.dtype)


def capped_fisher_merge(
    results: Sequence[tuple[Mapping[str, Tensor], int, Mapping[str, Tensor]]],
    eps: float = 1e-8,
    *,
    max_share: float = 1.0,
    rank: int | None = None,
    fallback: Mapping[str, Tensor] | None = None,
) -> State:
    """Fisher merging in which no client decides a coordinate alone: the weights
    ``n_i (F_i + eps)`` (zero on coordinates a client of smaller rank does not hold) are capped
    per coordinate by :func:`cap_shares` before ``θ = Σ w_i θ_i / Σ w_i``. With ``max_share=1`` it
    is :func:`fisher_merge`.

    Args:
        results: ``(state, num_examples, fisher)`` per client (normalise the Fisher first with
            :func:`normalize_fisher` when clients report it).
        eps, rank, fallback: As :func:`fisher_merge`.
        max_share: The largest share ``w_i / Σ w`` one client may hold of a coordinate.

    Returns:
        The merged state in the dtype of the first state.

    Raises:
        ValueError: As :func:`fisher_merge`, or on ``max_share`` outside (0, 1].
    """
    if max_share >= 1:
        return fisher_merge(results, eps, rank=rank, fallback=fallback)
    if not results:
        raise ValueError("nothing to aggregate: got no results")
    weights, values = [], []
    for i, (state, n, fisher) in enumerate(results):
        try:
            _, den_i = fisher_contribution(state, n, fisher, eps)
        except ValueError as err:
            raise ValueError(f"client {i}: {err}") from err
        theta = {key: t.detach().to(torch.float64) for key, t in state.items()}
        if rank is not None:
            den_i, theta = pad_to_rank(den_i, rank), pad_to_rank(theta, rank)
        weights.append(den_i)
        values.append(theta)
    _check_same_layout(values)
    numerator: State = {}
    denominator: State = {}
    for key in values[0]:
        w = cap_shares(torch.stack([d[key] for d in weights]), max_share)
        numerator[key] = (w * torch.stack([v[key] for v in values])).sum(0)
        denominator[key] = w.sum(0)
    merged = fisher_from_sums(numerator, denominator, fallback=fallback)
    dtypes = {key: tensor.dtype for key, tensor in results[0][0].items()}
    return {key: value.to(dtypes[key]) for key, value in merged.items()}


# --------------------------------------------------------------------------------------------------
# FedProx (Li et al. 2020)
# --------------------------------------------------------------------------------------------------


def server_step(
    global_state: Mapping[str, Tensor], aggregate: Mapping[str, Tensor], lr: float
) -> State:
    """The server optimiser's step: ``θ + lr · (aggregate − θ)`` (FedAvg with a server learning
    rate, Reddi et al. 2021, "Adaptive Federated Optimization"; ``lr = 1`` is ``aggregate`` itself).

    The strategy's aggregate is read as a pseudo-gradient step: with few local steps per round the
    clients' updates, averaged, move the global adapters no further than one client's, and ``lr``
    above 1 scales that move. Coordinates no update changed (e.g. HetLoRA rows Fisher merging keeps
    at the global value) stay where they are for every ``lr``.

    Args:
        global_state: The global state the round started from (rank at most ``aggregate``'s; it is
            zero-padded to it, which leaves the adapter unchanged).
        aggregate: The strategy's new global state.
        lr: Server learning rate, finite and > 0.

    Returns:
        A new state with ``aggregate``'s keys, shapes and dtypes (``aggregate`` itself if
        ``lr == 1``).

    Raises:
        ValueError: If ``lr`` is not finite and > 0, or the keys differ.
    """
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"server learning rate must be finite and > 0, got {lr}")
    if lr == 1.0:
        return dict(aggregate)
    if set(global_state) != set(aggregate):
        raise ValueError(
            f"server step: the global state and the aggregate hold different keys "
            f"({sorted(set(global_state) ^ set(aggregate))[:3]} ...)"
        )
    old = pad_to_rank(global_state, max_rank([aggregate]))
    out: State = {}
    for key, new in aggregate.items():
        acc = _acc_dtype(new)
        theta = old[key].to(acc)
        out[key] = (theta + lr * (new.to(acc) - theta)).to(new.dtype)
    return out


def proximal_penalty(
    state: Mapping[str, Tensor], global_state: Mapping[str, Tensor], mu: float
) -> Tensor:
    """FedProx's proximal term ``mu / 2 * ||θ − θ_global||²``, summed over all keys.

    Differentiable in ``state`` (gradient ``mu * (θ − θ_global)``); ``global_state`` is detached.
    Add it to the client's local loss.

    Args:
        state: The client's trainable adapter tensors (e.g. parameters requiring grad).
        global_state: The global state at the client's rank (same keys and shapes).
        mu: Proximal coefficient (>= 0). With 0 the result is a constant zero.

    Returns:
        A scalar tensor on the device of ``state``.

    Raises:
        ValueError: If ``mu`` is negative/non-finite or the keys or shapes differ (naming the key).
    """
    if not math.isfinite(mu) or mu < 0:
        raise ValueError(f"mu must be finite and >= 0, got {mu}")
    _check_same_layout([state, global_state], ["state", "global_state"])
    first = next(iter(state.values()), None)
    device = first.device if first is not None else None
    total = torch.zeros((), device=device)
    if mu == 0:
        return total
    for key, theta in state.items():
        diff = theta - global_state[key].detach().to(theta.dtype)
        total = total + diff.pow(2).sum()
    return 0.5 * mu * total
