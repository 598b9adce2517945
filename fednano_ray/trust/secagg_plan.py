"""Secure aggregation of a strategy's round: what each client masks and what the server finishes.

:mod:`fednano_ray.trust.secagg` is the protocol on plain vectors. This module is its glue with the
strategies, which aggregate from sums (:meth:`~fednano_ray.strategies.base.Strategy.sum_plan`):

- the server builds the round's plan from the global state alone (:func:`sum_template`) and turns
  the unmasked ring sum into the new global state (:meth:`SumTemplate.finish_ring`);
- each client flattens, quantises and masks its own term (:func:`client_masked_input`).

A federated run runs these on separate parties: the client actors and the round's SecAgg uplink
(:meth:`fednano_ray.federation.rounds.Federation._secure_uplink`). :func:`secure_aggregate` runs the
same functions for every party in one process, for tests and for measuring a strategy's plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fednano_ray.trust.secagg import (
    DEFAULT_FRAC_BITS,
    RING_BITS,
    SecAggClient,
    SecAggServer,
    default_threshold,
    dequantize,
    quantize,
)

__all__ = [
    "SumTemplate",
    "client_masked_input",
    "client_term_vector",
    "protocol_info",
    "secure_aggregate",
    "sum_template",
]


def _flatten(term: Mapping[str, Tensor], keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([term[k].detach().to(torch.float64).reshape(-1).numpy() for k in keys])


def _unflatten(
    flat: np.ndarray, like: Mapping[str, Tensor], keys: Sequence[str]
) -> dict[str, Tensor]:
    out, offset = {}, 0
    for k in keys:
        size = like[k].numel()
        out[k] = torch.from_numpy(flat[offset : offset + size].copy()).reshape(like[k].shape)
        offset += size
    return out


def protocol_info(
    *,
    clients: int,
    threshold: int,
    summed: Iterable[str],
    dropped_before_upload: Iterable[str],
    dropped_before_unmask: Iterable[str],
    vector_length: int,
    frac_bits: int,
    num_masked: int,
) -> dict[str, object]:
    """The round record's description of one run of the protocol (client ids as strings)."""

    def order(names: Iterable[str]) -> list[str]:
        return sorted(names, key=lambda name: (len(name), name))  # "2" before "10"

    summed = order(summed)
    return {
        "protocol": "SecAgg (Bonawitz et al. 2017), semi-honest, X25519 + AES-CTR masks in Z_2^64",
        "clients": clients,
        "threshold": threshold,
        "summed": summed,
        "dropped_before_upload": order(dropped_before_upload),
        "dropped_before_unmask": order(dropped_before_unmask),
        "vector_length": vector_length,
        "frac_bits": frac_bits,
        "masked_bytes_up": vector_length * RING_BITS // 8 * num_masked,
        "max_rounding_error": len(summed) * 2.0 ** -(frac_bits + 1),
    }


# --------------------------------------------------------------------------------------------------
# The protocol between separate parties (client actors and the coordinator)
# --------------------------------------------------------------------------------------------------


@dataclass
class SumTemplate:
    """The server's view of a round's sum plan, built without any client's update.

    Attributes:
        keys: The term keys, in the order every client flattens them.
        like: ``{key: zero tensor}`` with each term's shape (to unflatten the sum).
        finish: The strategy's function of the sums (the plan's ``finish``).
        rank: The rank every client pads its term to.
    """

    keys: list[str]
    like: dict[str, Tensor] = field(repr=False)
    finish: Callable[[dict[str, Tensor]], dict[str, Tensor]] = field(repr=False)
    rank: int = 0

    @property
    def length(self) -> int:
        """The length of each client's flattened term."""
        return sum(self.like[k].numel() for k in self.keys)

    def finish_ring(self, total: np.ndarray, frac_bits: int) -> dict[str, Tensor]:
        """The new global state from the unmasked sum in ``Z_{2^64}``
        (:meth:`SecAggServer.unmask`)."""
        return self.finish(_unflatten(dequantize(total, frac_bits), self.like, self.keys))


def sum_template(strategy, global_state: dict[str, Tensor], num_sampled: int) -> SumTemplate:
    """The coordinator's side of :meth:`~.base.Strategy.sum_plan`, from the global state alone.

    The plan is made for one stand-in update (the global state padded to the max rank, unit
    Fisher, one example) plus ``num_sampled − 1`` stand-in failures, so strategies that count the
    sampled clients (DP-FedAvg's denominator) see the round's number. Only the plan's keys, shapes
    and ``finish`` are kept: ``finish`` depends on the global state and strategy, not on the terms.
    """
    from fednano_ray.strategies.aggregate import max_rank, pad_to_rank
    from fednano_ray.strategies.base import ClientFailure, ClientUpdate

    rank = max_rank([global_state])
    state = pad_to_rank(global_state, rank)
    stand_in = ClientUpdate(
        "template", state, 1, {k: torch.ones_like(v) for k, v in state.items()}, {}
    )
    stand_ins = [ClientFailure("template", "stand-in")] * max(0, num_sampled - 1)
    terms, finish = strategy.sum_plan(global_state, [stand_in], stand_ins)
    keys = sorted(terms[0])
    like = {k: torch.zeros_like(terms[0][k]) for k in keys}
    return SumTemplate(keys=keys, like=like, finish=finish, rank=rank)


def client_term_vector(
    strategy, global_state: dict[str, Tensor], update, rank: int, keys: Sequence[str]
) -> np.ndarray:
    """A client's own flattened sum-plan term at ``rank`` (what it masks).

    Raises:
        ValueError: If the update does not fit the global state, or its term's keys differ from
            ``keys`` (the coordinator's :class:`SumTemplate`), e.g. a FedNano update without Fisher.
    """
    from fednano_ray.strategies.base import _check_against_global

    _check_against_global(global_state, update)
    terms, _ = strategy.sum_plan_updates(global_state, [update], rank)
    if sorted(terms[0]) != list(keys):
        raise ValueError(
            f"client {update.client_id!r}: its sum-plan term has keys {sorted(terms[0])}, the "
            f"round's plan has {list(keys)}"
        )
    return _flatten(terms[0], keys)


def client_masked_input(
    client: SecAggClient,
    strategy,
    global_state: dict[str, Tensor],
    update,
    *,
    shares: Mapping[int, bytes],
    rank: int,
    keys: Sequence[str],
    num_clients: int,
    frac_bits: int = DEFAULT_FRAC_BITS,
) -> np.ndarray:
    """Round 2 on the client: quantise its own sum-plan term and mask it (``uint64``)."""
    vector = client_term_vector(strategy, global_state, update, rank, keys)
    return client.masked_input(quantize(vector, frac_bits, num_clients), shares)


def secure_aggregate(
    strategy,
    global_state: dict[str, Tensor],
    updates: Sequence,
    failures: Sequence = (),
    *,
    frac_bits: int = DEFAULT_FRAC_BITS,
    threshold: int | None = None,
    drop_before_upload: Iterable[int] = (),
    drop_before_unmask: Iterable[int] = (),
    session: bytes = b"",
) -> tuple[dict[str, Tensor], dict[str, object]]:
    """A SecAgg round of ``strategy`` with every party in this process, through the functions a
    federated run's parties use: the server's :func:`sum_template` and
    :meth:`SumTemplate.finish_ring`, each client's :func:`client_masked_input`.

    Args:
        strategy: A strategy whose rule is a function of sums (mean, clip, DP-FedAvg, FedNano).
        global_state, updates, failures: As :meth:`~fednano_ray.strategies.base.Strategy.aggregate`
            (``failures`` count towards the sampled clients, as DP-FedAvg's denominator does).
        threshold: ``t`` (default :func:`~fednano_ray.trust.secagg.default_threshold`).
        drop_before_upload: positions in ``updates`` of clients that go offline after sharing
            keys: not summed, their pairwise masks rebuilt from the others' shares.
        drop_before_unmask: positions of clients that upload, then go offline: still summed.
        session: bytes binding the run and round.

    Returns:
        ``(new_global_state, info)``: ``info`` as a round record's ``secure_aggregation``.

    Raises:
        NotImplementedError: If the strategy cannot aggregate from sums (median, trimmed mean).
        ValueError: If an update does not fit the round's plan (e.g. FedNano without a Fisher).
        SecAggError: If too few clients remain in some round of the protocol.
    """
    n = len(updates)
    if n == 0:
        raise ValueError("secure_aggregate needs at least one update")
    t = default_threshold(n) if threshold is None else threshold
    drop_up, drop_un = set(drop_before_upload), set(drop_before_unmask)
    template = sum_template(strategy, global_state, n + len(failures))
    clients = {i + 1: SecAggClient(i + 1, session) for i in range(n)}
    server = SecAggServer(t, session)
    public = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inbox = server.route_shares({u: c.share_keys(public, t) for u, c in clients.items()})
    uploads = {
        u: client_masked_input(
            c,
            strategy,
            global_state,
            updates[u - 1],
            shares=inbox[u],
            rank=template.rank,
            keys=template.keys,
            num_clients=n,
            frac_bits=frac_bits,
        )
        for u, c in clients.items()
        if u - 1 not in drop_up
    }
    survivors, dropped = server.collect_masked(uploads)
    responses = {
        u: clients[u].unmask(survivors, dropped) for u in survivors if u - 1 not in drop_un
    }
    state = template.finish_ring(server.unmask(responses), frac_bits)

    def ids(positions: Iterable[int]) -> list[str]:
        return [str(updates[i].client_id) for i in sorted(positions)]

    info = protocol_info(
        clients=n,
        threshold=t,
        summed=ids(u - 1 for u in survivors),
        dropped_before_upload=ids(u - 1 for u in dropped),
        dropped_before_unmask=ids(u - 1 for u in survivors if u - 1 in drop_un),
        vector_length=template.length,
        frac_bits=frac_bits,
        num_masked=len(uploads),
    )
    return state, info
