"""Secure aggregation: Shamir sharing, fixed point, the SecAgg protocol with dropouts, and
strategies (FedAvg, Fisher merging, clipping, DP-FedAvg) aggregated from masked sums only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fednano_ray.strategies import (
    DPFedAvg,
    FedAvg,
    FedNano,
    Median,
    NormClip,
    fisher_merge,
    pad_to_rank,
)
from fednano_ray.strategies.aggregate import normalize_fisher
from fednano_ray.strategies.base import ClientUpdate
from fednano_ray.trust.secagg import (
    PRIME,
    SecAggClient,
    SecAggError,
    SecAggServer,
    default_threshold,
    dequantize,
    prg,
    quantize,
    secure_sum,
    shamir_reconstruct,
    shamir_split,
)
from fednano_ray.trust.secagg_plan import client_masked_input, secure_aggregate, sum_template

FRAC = 32
QUANTUM = 2.0**-FRAC

# -------------------------------------------------------------------------------------- Shamir


def seeded(seed: int):
    """A fixed noise source, so two paths of one DP mechanism can be compared exactly."""
    return lambda: torch.Generator().manual_seed(seed)


def test_shamir_reconstructs_a_hand_made_polynomial() -> None:
    """f(x) = 7 + 3x + 5x²: f(1) = 15, f(2) = 33, f(3) = 61; any 3 points give f(0) = 7."""
    assert shamir_reconstruct([(1, 15), (2, 33), (3, 61)]) == 7
    assert shamir_reconstruct([(3, 61), (1, 15), (2, 33)]) == 7
    # f(4) = 7 + 12 + 80 = 99: a different triple, the same secret.
    assert shamir_reconstruct([(2, 33), (4, 99), (1, 15)]) == 7


def test_shamir_any_threshold_subset_rebuilds_and_fewer_do_not() -> None:
    secret = int.from_bytes(b"\x42" * 32, "big")
    shares = shamir_split(secret, num_shares=7, threshold=4)
    assert [x for x, _ in shares] == list(range(1, 8))
    for subset in ([0, 1, 2, 3], [6, 2, 4, 0], [1, 3, 5, 6], list(range(7))):
        assert shamir_reconstruct(shares[i] for i in subset) == secret
    assert shamir_reconstruct(shares[:3]) != secret  # t - 1 shares: a random field element
    assert all(0 <= y < PRIME for _, y in shares)
    with pytest.raises(ValueError, match="threshold"):
        shamir_split(secret, num_shares=3, threshold=4)
    with pytest.raises(ValueError, match="distinct"):
        shamir_reconstruct([(1, 2), (1, 3)])


# ------------------------------------------------------------------------------- fixed point, PRG


def test_quantize_round_trip_and_limits() -> None:
    x = np.array([0.0, 1.5, -2.25, 1e-9, -123.456789])
    back = dequantize(quantize(x, FRAC), FRAC)
    assert np.abs(back - x).max() <= QUANTUM / 2
    assert quantize(np.array([-1.0]), FRAC)[0] == np.uint64(2**64 - 2**32)  # two's complement
    with pytest.raises(ValueError, match="too large .* 4 clients .* lower frac_bits"):
        quantize(np.array([2.0**29]), FRAC, num_clients=4)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([np.nan]), FRAC)


def test_prg_is_deterministic_per_seed() -> None:
    a, b = prg(b"\x01" * 32, 1000), prg(b"\x01" * 32, 1000)
    assert a.dtype == np.uint64 and np.array_equal(a, b)
    assert not np.array_equal(a, prg(b"\x02" * 32, 1000))
    assert np.array_equal(prg(b"\x01" * 32, 10), a[:10])


# -------------------------------------------------------------------------------- the protocol


def vectors(n: int, size: int = 2000, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=0.1, size=size) for _ in range(n)]


def test_secure_sum_equals_the_plain_sum_without_dropouts() -> None:
    vs = vectors(5)
    result = secure_sum(vs)
    assert result.survivors == [0, 1, 2, 3, 4] and result.dropped == [] and result.threshold == 3
    assert np.abs(result.total - np.sum(vs, axis=0)).max() <= 5 * QUANTUM / 2


def test_secure_sum_survives_dropouts_after_masking() -> None:
    """Clients 1 and 4 share keys (so others mask against them) and then never upload: the sum
    is over the others, their leftover pairwise masks removed with their Shamir-shared keys.
    Client 0 uploads and then misses the unmasking round: it is summed, its self-mask rebuilt."""
    vs = vectors(7, seed=1)
    result = secure_sum(vs, drop_before_upload=[1, 4], drop_before_unmask=[0])
    assert result.survivors == [0, 2, 3, 5, 6] and result.dropped == [1, 4] and result.silent == [0]
    expected = np.sum([vs[i] for i in result.survivors], axis=0)
    assert np.abs(result.total - expected).max() <= 7 * QUANTUM / 2


def test_too_many_dropouts_cannot_be_unmasked() -> None:
    """Threshold 4 of 6: with only 3 answers in the unmasking round the masks stay on."""
    with pytest.raises(
        SecAggError, match="only 3 clients answered the unmasking round; threshold is 4"
    ):
        secure_sum(vectors(6), drop_before_upload=[1, 2], drop_before_unmask=[0])
    with pytest.raises(SecAggError, match="only 2 masked inputs arrived"):
        secure_sum(vectors(4), threshold=3, drop_before_upload=[0, 1])


def test_a_masked_vector_reveals_nothing_obvious() -> None:
    """What the server sees of one client is uniform on Z_2^64: half its bits are set, its top
    byte is flat, it is ~2^31 away from the client's values (which are below 1) and uncorrelated."""
    vs = vectors(4, size=20000, seed=2)
    result = secure_sum(vs)
    y = result.masked[0]
    x_q = quantize(vs[0], FRAC)
    bits = np.unpackbits(y.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 0.005
    top = np.bincount((y >> np.uint64(56)).astype(np.int64), minlength=256)
    chi2 = float(((top - y.size / 256) ** 2 / (y.size / 256)).sum())
    assert chi2 < 350  # 255 degrees of freedom: mean 255, sd ~22.6
    as_float = dequantize(y, FRAC)
    assert np.median(np.abs(as_float - vs[0])) > 2.0**28
    assert abs(np.corrcoef(as_float, vs[0])[0, 1]) < 0.05
    assert np.mean(y == x_q) < 1e-3
    # Fresh keys every run: the same input is masked differently.
    assert not np.array_equal(secure_sum(vs).masked[0], y)


def test_a_client_never_reveals_both_secrets_of_one_peer() -> None:
    """If the server claims client 2 both survived and dropped, the client refuses to answer."""
    clients = {u: SecAggClient(u, b"s") for u in (1, 2, 3)}
    server = SecAggServer(2, b"s")
    keys = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inbox = server.route_shares({u: c.share_keys(keys, 2) for u, c in clients.items()})
    for u, c in clients.items():
        c.masked_input(np.zeros(4, dtype=np.uint64), inbox[u])
    with pytest.raises(SecAggError, match=r"both shares of \[2\]"):
        clients[1].unmask(survivors={1, 2, 3}, dropped={2})


def test_a_tampered_share_fails_authentication() -> None:
    clients = {u: SecAggClient(u, b"s") for u in (1, 2)}
    server = SecAggServer(2, b"s")
    keys = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inbox = server.route_shares({u: c.share_keys(keys, 2) for u, c in clients.items()})
    blob = bytearray(inbox[1][2])
    blob[-1] ^= 1
    clients[1].masked_input(np.zeros(4, dtype=np.uint64), {2: bytes(blob)})
    with pytest.raises(SecAggError, match="from client 2 failed authentication"):
        clients[1].unmask(survivors={1, 2}, dropped=set())


# ------------------------------------------------------------------------------------ strategies


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def het_round(seed: int = 0, fisher: bool = True):
    """A rank-4 global adapter (d = 16) and 5 clients of ranks 2, 4, 4, 2, 4 with example counts
    and Fisher of varied scale (some entries exactly 0, as lora_A has in round 0)."""
    gen = torch.Generator().manual_seed(seed)
    d = 16
    glob = {
        "v.lora_A": torch.randn(4, d, generator=gen),
        "v.lora_B": torch.randn(d, 4, generator=gen),
    }
    updates = []
    for i, (r, n) in enumerate(zip((2, 4, 4, 2, 4), (12, 40, 7, 25, 3), strict=True)):
        state = {
            "v.lora_A": f32(glob["v.lora_A"][:r] + 0.1 * torch.randn(r, d, generator=gen)),
            "v.lora_B": f32(glob["v.lora_B"][:, :r] + 0.1 * torch.randn(d, r, generator=gen)),
        }
        fish = None
        if fisher:
            fish = {k: torch.rand(v.shape, generator=gen) * 10.0 ** (-i) for k, v in state.items()}
            fish["v.lora_A"][0] = 0.0  # a row with no Fisher on this client
        updates.append(ClientUpdate(str(i), state, n, fisher=fish))
    return glob, updates


def assert_states_close(a, b, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def test_secure_fedavg_equals_fedavg_with_heterogeneous_ranks() -> None:
    glob, updates = het_round(fisher=False)
    state, info = secure_aggregate(FedAvg(), glob, updates)
    assert_states_close(state, FedAvg().aggregate(glob, updates, []), atol=1e-6)
    assert info["clients"] == 5 and info["summed"] == ["0", "1", "2", "3", "4"]
    assert info["vector_length"] == 2 * 4 * 16 + 1  # the padded adapter plus Σ n_i


def test_fisher_merging_under_secure_aggregation_equals_fisher_merge() -> None:
    """FedNano needs only Σ n(F + eps)θ and Σ n(F + eps): summed securely (as n F θ, n F, n θ and
    n, so eps stays exact under fixed point) they give fisher_merge's result, ranks padded as
    fisher_sums pads them, rows no client holds falling back to the global state."""
    glob, updates = het_round()
    eps = 1e-8
    state, _ = secure_aggregate(FedNano(eps=eps), glob, updates)
    expected = fisher_merge(
        [(u.state, u.num_examples, normalize_fisher(u.fisher)) for u in updates],
        eps,
        rank=4,
        fallback=pad_to_rank(glob, 4),
    )
    assert_states_close(state, expected, atol=1e-5)
    # The plain rule without the share cap (SecAgg cannot apply it: it sees only sums).
    plain = FedNano(eps=eps, max_share=1.0).aggregate(glob, updates, [])
    assert_states_close(state, plain, atol=1e-5)


def test_fisher_merging_survives_a_dropout_after_masking() -> None:
    """Client 1 (the one with the largest weight) drops after key sharing: the result is the
    Fisher merge of the other four."""
    glob, updates = het_round(seed=1)
    state, info = secure_aggregate(FedNano(), glob, updates, drop_before_upload=[1])
    assert info["dropped_before_upload"] == ["1"]
    rest = [u for u in updates if u.client_id != "1"]
    expected = fisher_merge(
        [(u.state, u.num_examples, normalize_fisher(u.fisher)) for u in rest],
        1e-8,
        rank=4,
        fallback=pad_to_rank(glob, 4),
    )
    assert_states_close(state, expected, atol=1e-5)


def test_fednano_without_fisher_is_refused_under_secure_aggregation() -> None:
    """The round's plan (built from the global state alone) has FedNano's Fisher terms, so a
    client without a Fisher cannot mask a term that fits it: an error naming the client, as on the
    actors (the plain rule falls back to FedAvg instead, with a warning)."""
    glob, updates = het_round(fisher=False)
    with pytest.raises(ValueError, match=r"client '0': its sum-plan term has keys"):
        secure_aggregate(FedNano(), glob, updates)


def test_clipping_and_dp_under_secure_aggregation_match_the_plain_rules() -> None:
    """Clipping happens on the client's side before masking; DP noise is added to the unmasked
    sum with the round's seed, so it matches the plain DP-FedAvg of the same round."""
    glob, updates = het_round(fisher=False)
    clip = NormClip(clip_norm=0.5)
    state, _ = secure_aggregate(clip, glob, updates)
    assert_states_close(state, clip.aggregate(glob, updates, []), atol=1e-6)
    dp = DPFedAvg(clip_norm=0.5, noise_multiplier=1.0, noise_generator=seeded(1))
    dp.begin_round(2)
    state, _ = secure_aggregate(dp, glob, updates)
    assert_states_close(state, dp.aggregate(glob, updates, []), atol=1e-6)


def test_median_cannot_run_under_secure_aggregation() -> None:
    glob, updates = het_round(fisher=False)
    with pytest.raises(NotImplementedError, match="secure aggregation"):
        secure_aggregate(Median(), glob, updates)


@pytest.mark.parametrize("name", ["fedavg", "fednano", "dp"])
def test_separate_parties_mask_their_own_terms_and_match_the_plain_rule(name: str) -> None:
    """The actor path's split: each client masks its own sum-plan term (client_masked_input), the
    server builds the plan from the global state alone (sum_template) and only sees uint64 masked
    vectors. Client 1 drops after sharing keys, client 3 uploads but skips unmasking: the result
    is the plain rule over clients 0, 2, 3, 4."""
    glob, updates = het_round(seed=2, fisher=name == "fednano")

    def make():
        if name == "dp":
            s = DPFedAvg(clip_norm=0.5, noise_multiplier=1.0, noise_generator=seeded(1))
            s.begin_round(3)
            return s
        # Without the share cap, which secure aggregation cannot apply.
        return FedNano(max_share=1.0) if name == "fednano" else FedAvg()

    n, session = len(updates), b"round 3"
    t = default_threshold(n)
    strategy = make()
    template = sum_template(strategy, glob, n)
    clients = {u: SecAggClient(u, session) for u in range(1, n + 1)}
    server = SecAggServer(t, session)
    keys = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inbox = server.route_shares({u: c.share_keys(keys, t) for u, c in clients.items()})
    uploads = {
        u: client_masked_input(
            c,
            make(),
            glob,
            updates[u - 1],
            shares=inbox[u],
            rank=template.rank,
            keys=template.keys,
            num_clients=n,
        )
        for u, c in clients.items()
        if u != 2  # client "1" drops before upload
    }
    assert all(y.dtype == np.uint64 and y.size == template.length for y in uploads.values())
    survivors, dropped = server.collect_masked(uploads)
    responses = {u: clients[u].unmask(survivors, dropped) for u in survivors if u != 4}
    state = template.finish_ring(server.unmask(responses), FRAC)

    rest = [u for u in updates if u.client_id != "1"]
    plain = make()
    expected = plain.aggregate(glob, rest, [object()])  # DP counts the dropped client as sampled
    assert_states_close(state, expected, atol=1e-5)
