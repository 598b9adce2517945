"""Secure aggregation in the style of SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", CCS; semi-honest variant, without the consistency-check
round and signatures of the actively secure one).

The server learns the sum of the clients' vectors and nothing else about any one of them, and the
sum survives clients that drop out after the masks were set up. Protocol, for clients ``1..n``
with threshold ``t``:

0. *AdvertiseKeys.* Each client ``u`` makes two X25519 key pairs: ``c_u`` (to encrypt what it
   sends to other clients through the server) and ``s_u`` (to agree pairwise mask seeds). The
   server forwards the public keys to everyone (``U1``: clients that advertised, ``|U1| >= t``).
1. *ShareKeys.* ``u`` draws a 32-byte self-mask seed ``b_u`` and splits ``b_u`` and its private key
   ``s_u^SK`` into Shamir shares over the prime field ``GF(2^521 − 1)`` with threshold ``t``, one
   share per client of ``U1``. Each share is AES-GCM encrypted under ``HKDF(X25519(c_u, c_v))``,
   so the server, which relays them, cannot read them. ``U2``: clients that shared.
2. *MaskedInputCollection.* ``u`` quantises its float vector to fixed point in the ring
   ``Z_{2^64}`` and uploads ``y_u = x_u + PRG(b_u) + Σ_{v∈U2, u<v} PRG(s_uv) − Σ_{v∈U2, u>v}
   PRG(s_uv)``, where ``s_uv = HKDF(X25519(s_u, s_v))`` and ``PRG`` is AES-256-CTR. ``U3``: clients
   that uploaded (``|U3| >= t``). A masked vector is uniformly distributed on its own.
3. *Unmasking.* Each client of ``U3`` still online sends, for every ``v ∈ U2 \\ U3`` (dropped
   before upload) its share of ``s_v^SK``, and for every ``v ∈ U3`` its share of ``b_v``, never
   both for one client. With ``>= t`` answers the server rebuilds the dropped clients' keys (and
   with them the pairwise masks left in the sum) and the survivors' self-masks, and subtracts
   them: ``Σ y_u − masks = Σ_{u∈U3} x_u``. Clients of ``U3`` that drop out *now* are still summed.

Fixed point: a float ``x`` becomes ``round(x · 2^frac_bits)`` in two's complement mod ``2^64``, so
the sum is exact in the ring and the only error is rounding, at most ``n · 2^-(frac_bits+1)`` per
coordinate. The decoded sum must stay below ``2^(63 − frac_bits)`` in magnitude: each client's
values are checked against ``2^(63 − frac_bits) / n``.

:func:`secure_sum` runs the whole protocol among in-process parties on plain vectors. What a
strategy sums and how a client masks its own term is :mod:`fednano_ray.trust.secagg_plan`: in a
federated run (``trust.secure_aggregation``) each client keeps its own :class:`SecAggClient` and
masks its own sum-plan term, and the coordinator only relays keys and encrypted shares, receives
masked vectors and turns the unmasked sum into the new global state.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "DEFAULT_FRAC_BITS",
    "PRIME",
    "SecAggClient",
    "SecAggError",
    "SecAggResult",
    "SecAggServer",
    "default_threshold",
    "dequantize",
    "prg",
    "quantize",
    "secure_sum",
    "shamir_reconstruct",
    "shamir_split",
]

#: What every party of this repository's protocol runs uses (the ring resolution).
DEFAULT_FRAC_BITS = 32

#: The Shamir field: the Mersenne prime 2^521 − 1, larger than any 32-byte secret.
PRIME = 2**521 - 1
_SHARE_BYTES = 66  # ceil(521 / 8)
RING_BITS = 64


class SecAggError(RuntimeError):
    """The protocol cannot finish (too few clients, a tampered message); the message says why."""


# --------------------------------------------------------------------------------------------------
# Shamir secret sharing over GF(PRIME)
# --------------------------------------------------------------------------------------------------


def shamir_split(secret: int, num_shares: int, threshold: int) -> list[tuple[int, int]]:
    """Split ``secret`` into ``num_shares`` shares, any ``threshold`` of which rebuild it.

    The shares are points ``(x, f(x))`` for ``x = 1..num_shares`` of a random polynomial ``f`` of
    degree ``threshold − 1`` over ``GF(PRIME)`` with ``f(0) = secret``. Fewer than ``threshold``
    shares reveal nothing about ``secret``.

    Args:
        secret: An integer in ``[0, PRIME)``.
        num_shares: How many shares (>= ``threshold``).
        threshold: How many shares rebuild the secret (>= 1).

    Returns:
        ``[(x, y), ...]`` with ``x = 1..num_shares``.

    Raises:
        ValueError: On a secret outside the field or an impossible threshold.
    """
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be in [0, 2^521 - 1)")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"need 1 <= threshold <= num_shares, got {threshold} and {num_shares}")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def shamir_reconstruct(shares: Iterable[tuple[int, int]]) -> int:
    """The secret ``f(0)`` by Lagrange interpolation through ``shares``.

    With at least ``threshold`` distinct shares of one split the result is the secret; with fewer
    it is a meaningless field element (callers count shares first).

    Raises:
        ValueError: On no shares or a repeated or zero x-coordinate.
    """
    points = list(shares)
    xs = [x % PRIME for x, _ in points]
    if not points or len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError("need at least one share, with distinct non-zero x-coordinates")
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    return secret


# --------------------------------------------------------------------------------------------------
# Fixed point and the PRG
# --------------------------------------------------------------------------------------------------


def quantize(values: np.ndarray, frac_bits: int, num_clients: int = 1) -> np.ndarray:
    """Floats to fixed point in ``Z_{2^64}``: ``round(x · 2^frac_bits)`` in two's complement.

    Args:
        values: Finite floats.
        frac_bits: Fractional bits (1..52): the resolution is ``2^-frac_bits``.
        num_clients: How many such vectors will be summed; bounds ``|x|`` so the sum cannot wrap.

    Returns:
        A ``uint64`` array.

    Raises:
        ValueError: On non-finite values or a value too large for the ring, naming the limit.
    """
    if not 1 <= frac_bits <= 52:
        raise ValueError(f"frac_bits must be in [1, 52], got {frac_bits}")
    x = np.asarray(values, dtype=np.float64)
    if x.size and not np.isfinite(x).all():
        raise ValueError(
            f"cannot quantise {int((~np.isfinite(x)).sum())} non-finite values (NaN/Inf)"
        )
    limit = 2.0 ** (RING_BITS - 1 - frac_bits) / max(1, num_clients)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak >= limit:
        raise ValueError(
            f"value {peak:.4g} is too large for secure aggregation of {num_clients} clients with "
            f"{frac_bits} fractional bits (limit {limit:.4g}); lower frac_bits"
        )
    return np.rint(x * 2.0**frac_bits).astype(np.int64).view(np.uint64)


def dequantize(values: np.ndarray, frac_bits: int) -> np.ndarray:
    """Fixed point in ``Z_{2^64}`` (two's complement) back to float64."""
    return np.asarray(values, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**frac_bits


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudorandom ``uint64`` from a 32-byte seed (AES-256-CTR keystream)."""
    if len(seed) != 32:
        raise ValueError(f"PRG seed must be 32 bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * length)), dtype=np.uint64).copy()


def _kdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 of the X25519 shared secret."""
    return _kdf(private.exchange(X25519PublicKey.from_public_bytes(peer_public)), info)


def default_threshold(num_clients: int) -> int:
    """A majority, ``floor(n / 2) + 1``: the server needs over half of the clients to unmask."""
    return num_clients // 2 + 1


# --------------------------------------------------------------------------------------------------
# The parties
# --------------------------------------------------------------------------------------------------


class SecAggClient:
    """One client's side of the protocol.

    Args:
        index: The client's id in the protocol, 1..n (also its Shamir x-coordinate).
        session: Bytes binding keys and messages to one run and round (e.g. ``b"round 3"``).
    """

    def __init__(self, index: int, session: bytes = b"") -> None:
        if index < 1:
            raise ValueError(f"client index must be >= 1, got {index}")
        self.index = index
        self.session = session
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._self_seed = os.urandom(32)
        self._public: dict[int, tuple[bytes, bytes]] = {}
        self._inbox: dict[int, bytes] = {}
        self._u2: set[int] = set()

    def advertise_keys(self) -> tuple[bytes, bytes]:
        """Round 0: the public keys ``(c_u^PK, s_u^PK)``."""
        return (
            self._c_key.public_key().public_bytes_raw(),
            self._s_key.public_key().public_bytes_raw(),
        )

    def _channel(self, peer: int) -> AESGCM:
        info = b"fednano-secagg channel|" + self.session
        return AESGCM(_agree(self._c_key, self._public[peer][0], info))

    def _aad(self, sender: int, receiver: int) -> bytes:
        return self.session + b"|%d|%d" % (sender, receiver)

    def share_keys(
        self, public_keys: Mapping[int, tuple[bytes, bytes]], threshold: int
    ) -> dict[int, bytes]:
        """Round 1: encrypted Shamir shares of ``s_u^SK`` and ``b_u``, one per client of ``U1``.

        Args:
            public_keys: ``{v: (c_v^PK, s_v^PK)}`` for every client of ``U1`` (this one included).
            threshold: ``t``.

        Returns:
            ``{v: ciphertext}`` for every other client ``v`` (the server relays them).
        """
        if self.index not in public_keys:
            raise SecAggError(f"client {self.index}: its own keys are missing from U1")
        if len(public_keys) < threshold:
            raise SecAggError(
                f"client {self.index}: |U1| = {len(public_keys)} < threshold {threshold}"
            )
        self._public = dict(public_keys)
        members = sorted(public_keys)
        n = max(members)
        s_secret = int.from_bytes(self._s_key.private_bytes_raw(), "big")
        b_secret = int.from_bytes(self._self_seed, "big")
        s_shares = dict(shamir_split(s_secret, n, threshold))
        b_shares = dict(shamir_split(b_secret, n, threshold))
        out: dict[int, bytes] = {}
        for v in members:
            payload = s_shares[v].to_bytes(_SHARE_BYTES, "big") + b_shares[v].to_bytes(
                _SHARE_BYTES, "big"
            )
            nonce = os.urandom(12)
            ciphertext = nonce + self._channel(v).encrypt(nonce, payload, self._aad(self.index, v))
            if v == self.index:
                self._inbox[v] = ciphertext  # keeps its own share, as if sent to itself
            else:
                out[v] = ciphertext
        return out

    def masked_input(self, vector: np.ndarray, shares_for_me: Mapping[int, bytes]) -> np.ndarray:
        """Round 2: ``y_u``, the quantised vector plus self-mask and pairwise masks.

        Args:
            vector: The client's input in ``Z_{2^64}`` (``uint64``, from :func:`quantize`).
            shares_for_me: ``{v: ciphertext}`` from every other client of ``U2``.

        Returns:
            The masked vector (``uint64``).
        """
        self._inbox.update(shares_for_me)
        self._u2 = set(self._inbox)
        x = np.asarray(vector, dtype=np.uint64)
        y = x + prg(self._self_seed, x.size)
        for v in sorted(self._u2 - {self.index}):
            mask = prg(self._pair_seed(v), x.size)
            y = y + mask if self.index < v else y - mask  # uint64 arithmetic wraps mod 2^64
        return y

    def _pair_seed(self, v: int) -> bytes:
        return _agree(self._s_key, self._public[v][1], b"fednano-secagg mask|" + self.session)

    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> dict[str, dict[int, int]]:
        """Round 3: shares of ``b_v`` for survivors and of ``s_v^SK`` for dropped clients.

        Args:
            survivors: ``U3``, the clients whose masked input the server received.
            dropped: ``U2 \\ U3``, clients that shared keys but never uploaded.

        Returns:
            ``{"b": {v: y}, "s": {v: y}}``: this client's share values (its x is its index).

        Raises:
            SecAggError: If the sets overlap (the server would learn both secrets of one client),
                name an unknown client, or a share fails to decrypt.
        """
        survivors, dropped = set(survivors), set(dropped)
        both = sorted(survivors & dropped)
        if both:
            raise SecAggError(f"client {self.index}: the server asks for both shares of {both}")
        unknown = (survivors | dropped) - self._u2
        if unknown:
            raise SecAggError(f"client {self.index}: clients {sorted(unknown)} are not in U2")
        out: dict[str, dict[int, int]] = {"b": {}, "s": {}}
        for v in sorted(survivors | dropped):
            blob = self._inbox[v]
            try:
                payload = self._channel(v).decrypt(blob[:12], blob[12:], self._aad(v, self.index))
            except InvalidTag:
                raise SecAggError(
                    f"client {self.index}: the share from client {v} failed authentication"
                ) from None
            s_share = int.from_bytes(payload[:_SHARE_BYTES], "big")
            b_share = int.from_bytes(payload[_SHARE_BYTES:], "big")
            if v in survivors:
                out["b"][v] = b_share
            else:
                out["s"][v] = s_share
        return out


CIPHERTEXT_BYTES = 12 + 2 * _SHARE_BYTES + 16  # nonce, the two shares, AES-GCM's tag


def _bad_key_pair(pair: Any) -> str | None:
    """Why ``pair`` is not two X25519 public keys, or None."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        return "secagg public keys must be a pair (c_pk, s_pk)"
    for key in pair:
        if not isinstance(key, bytes) or len(key) != 32:
            return "secagg public keys must be 32-byte X25519 keys"
        try:  # a low-order point makes every peer's key agreement fail: catch it here
            X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
        except ValueError as err:
            return f"secagg public key is not a usable X25519 key ({err})"
    return None


class SecAggServer:
    """The server's side: relays messages, sums masked inputs, removes the masks.

    Args:
        threshold: ``t``, the least number of clients each round needs.
        session: As :class:`SecAggClient`.
    """

    def __init__(self, threshold: int, session: bytes = b"") -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.threshold = threshold
        self.session = session
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}
        self.masked: dict[int, np.ndarray] = {}
        self.u2: set[int] = set()

    # -- screening what clients send: a malformed message fails its sender, not the round --------

    @staticmethod
    def screen_keys(
        keys: Mapping[int, Any],
    ) -> tuple[dict[int, tuple[bytes, bytes]], dict[int, str]]:
        """Round 0's advertised keys split into well-formed ones and ``{u: reason}``: each must be
        two distinct 32-byte X25519 public keys, used by no other client."""
        valid: dict[int, tuple[bytes, bytes]] = {}
        rejected: dict[int, str] = {}
        seen: dict[bytes, int] = {}
        for u, pair in sorted(keys.items()):
            reason = _bad_key_pair(pair)
            if reason is None:
                dup = next((seen[k] for k in pair if k in seen), None)
                if dup is not None or pair[0] == pair[1]:
                    reason = "secagg public keys reuse a key" + (
                        f" of client index {dup}" if dup is not None else ""
                    )
            if reason is None:
                valid[u] = (bytes(pair[0]), bytes(pair[1]))
                seen.update({bytes(k): u for k in pair})
            else:
                rejected[u] = reason
        return valid, rejected

    @staticmethod
    def screen_shares(
        sent: Mapping[int, Any], members: Iterable[int]
    ) -> tuple[dict[int, dict[int, bytes]], dict[int, str]]:
        """Round 1's shares split into well-formed ones and ``{u: reason}``: a sender must send one
        ciphertext of the protocol's length to every other member of ``U1``, and nothing else."""
        members = set(members)
        valid: dict[int, dict[int, bytes]] = {}
        rejected: dict[int, str] = {}
        for u, shares in sorted(sent.items()):
            want = members - {u}
            if not isinstance(shares, Mapping):
                rejected[u] = f"secagg shares are a {type(shares).__name__}, not a mapping"
            elif set(shares) != want:
                rejected[u] = (
                    f"secagg shares go to {sorted(shares, key=str)}, not to the other members "
                    f"{sorted(want)}"
                )
            elif not all(
                isinstance(ct, bytes) and len(ct) == CIPHERTEXT_BYTES for ct in shares.values()
            ):
                rejected[u] = f"secagg shares must be {CIPHERTEXT_BYTES}-byte ciphertexts"
            else:
                valid[u] = dict(shares)
        return valid, rejected

    @staticmethod
    def screen_masked(
        masked: Mapping[int, Any], length: int
    ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Round 2's uploads split into ``uint64`` vectors of ``length`` and ``{u: reason}``."""
        valid: dict[int, np.ndarray] = {}
        rejected: dict[int, str] = {}
        for u, y in sorted(masked.items()):
            if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.shape != (length,):
                what = (
                    f"{y.dtype} array of shape {y.shape}"
                    if isinstance(y, np.ndarray)
                    else type(y).__name__
                )
                rejected[u] = f"secagg masked upload is a {what}, not uint64 of length {length}"
            else:
                valid[u] = y
        return valid, rejected

    @staticmethod
    def screen_responses(
        responses: Mapping[int, Any], survivors: Iterable[int], dropped: Iterable[int]
    ) -> tuple[dict[int, dict[str, dict[int, int]]], dict[int, str]]:
        """Round 3's answers split into well-formed ones and ``{u: reason}``: ``{"b": {v: y}}``
        for exactly the survivors and ``{"s": {v: y}}`` for exactly the dropped, ``0 <= y < p``."""
        want = {"b": set(survivors), "s": set(dropped)}
        valid: dict[int, dict[str, dict[int, int]]] = {}
        rejected: dict[int, str] = {}
        for u, r in sorted(responses.items()):
            ok = (
                isinstance(r, Mapping)
                and set(r) == {"b", "s"}
                and all(
                    isinstance(r[k], Mapping)
                    and set(r[k]) == want[k]
                    and all(
                        isinstance(y, int) and not isinstance(y, bool) and 0 <= y < PRIME
                        for y in r[k].values()
                    )
                    for k in want
                )
            )
            if ok:
                valid[u] = {k: dict(r[k]) for k in want}
            else:
                rejected[u] = (
                    "secagg unmask answer is malformed (needs b-shares of exactly the survivors "
                    "and s-shares of exactly the dropped, each an integer below the field prime)"
                )
        return valid, rejected

    def collect_keys(
        self, keys: Mapping[int, tuple[bytes, bytes]]
    ) -> dict[int, tuple[bytes, bytes]]:
        """Round 0: the public keys to send to every client of ``U1``."""
        if len(keys) < self.threshold:
            raise SecAggError(
                f"only {len(keys)} clients advertised keys; threshold is {self.threshold}"
            )
        self.public_keys = dict(keys)
        return dict(keys)

    def route_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Round 1: ``{u: {v: ct}}`` from senders to ``{v: {u: ct}}`` for receivers (``U2``)."""
        if len(sent) < self.threshold:
            raise SecAggError(
                f"only {len(sent)} clients shared keys; threshold is {self.threshold}"
            )
        self.u2 = set(sent)
        inbox: dict[int, dict[int, bytes]] = {v: {} for v in self.u2}
        for u, messages in sent.items():
            for v, ciphertext in messages.items():
                if v in self.u2:
                    inbox[v][u] = ciphertext
        return inbox

    def collect_masked(self, masked: Mapping[int, np.ndarray]) -> tuple[set[int], set[int]]:
        """Round 2: store ``y_u``; returns ``(U3, U2 \\ U3)`` to send to the clients."""
        if len(masked) < self.threshold:
            raise SecAggError(
                f"only {len(masked)} masked inputs arrived; threshold is {self.threshold}"
            )
        self.masked = {u: np.asarray(y, dtype=np.uint64) for u, y in masked.items()}
        survivors = set(self.masked)
        return survivors, self.u2 - survivors

    def unmask(self, responses: Mapping[int, Mapping[str, Mapping[int, int]]]) -> np.ndarray:
        """Round 3: ``Σ_{u∈U3} x_u`` in ``Z_{2^64}`` from ``>= t`` clients' shares.

        Raises:
            SecAggError: If fewer than ``t`` clients answered.
        """
        if len(responses) < self.threshold:
            raise SecAggError(
                f"only {len(responses)} clients answered the unmasking round; threshold is "
                f"{self.threshold}, so the masks cannot be removed"
            )
        survivors = sorted(self.masked)
        dropped = sorted(self.u2 - set(survivors))
        length = next(iter(self.masked.values())).size
        total = np.zeros(length, dtype=np.uint64)
        for y in self.masked.values():
            total += y
        for u in survivors:  # self-masks of everyone whose input is in the sum
            b_u = shamir_reconstruct((v, r["b"][u]) for v, r in responses.items())
            total -= prg(b_u.to_bytes(32, "big"), length)
        for v in dropped:  # pairwise masks the survivors added with clients that never uploaded
            s_v = shamir_reconstruct((w, r["s"][v]) for w, r in responses.items())
            key = X25519PrivateKey.from_private_bytes(s_v.to_bytes(32, "big"))
            for u in survivors:
                seed = _agree(key, self.public_keys[u][1], b"fednano-secagg mask|" + self.session)
                mask = prg(seed, length)
                total = total - mask if u < v else total + mask
        return total


# --------------------------------------------------------------------------------------------------
# Whole protocol, in process
# --------------------------------------------------------------------------------------------------


@dataclass
class SecAggResult:
    """What :func:`secure_sum` returns.

    Attributes:
        total: The float64 sum of the survivors' vectors (decoded from the ring).
        survivors: Positions (0-based) of the vectors in the sum.
        dropped: Positions of clients that shared keys but never uploaded (not in the sum).
        silent: Positions of clients that uploaded but skipped the unmasking round (in the sum).
        threshold: ``t``.
        masked: What the server saw: position -> masked ``uint64`` vector.
    """

    total: np.ndarray
    survivors: list[int]
    dropped: list[int]
    silent: list[int]
    threshold: int
    masked: dict[int, np.ndarray] = field(repr=False)


def secure_sum(
    vectors: Sequence[np.ndarray],
    *,
    frac_bits: int = 32,
    threshold: int | None = None,
    drop_before_upload: Iterable[int] = (),
    drop_before_unmask: Iterable[int] = (),
    session: bytes = b"",
) -> SecAggResult:
    """Run SecAgg among ``len(vectors)`` in-process clients and return the unmasked sum.

    Args:
        vectors: One float vector per client, all of one length.
        frac_bits: Fixed-point fractional bits (see :func:`quantize`).
        threshold: ``t`` (default :func:`default_threshold`).
        drop_before_upload: Positions of clients that go offline after sharing keys, before
            uploading: excluded from the sum, their pairwise masks removed via their shared keys.
        drop_before_unmask: Positions of clients that upload but go offline before unmasking:
            included in the sum, their self-masks removed via their shared seeds.
        session: Bytes binding the run and round.

    Returns:
        The :class:`SecAggResult`.

    Raises:
        ValueError: On no vectors, vectors of different lengths, or values the ring cannot hold.
        SecAggError: If too few clients remain in some round.
    """
    n = len(vectors)
    if n == 0:
        raise ValueError("secure_sum needs at least one vector")
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in vectors]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"vectors must have one length, got {sorted({a.size for a in arrays})}")
    t = default_threshold(n) if threshold is None else threshold
    drop_up, drop_un = set(drop_before_upload), set(drop_before_unmask)
    clients = {i + 1: SecAggClient(i + 1, session) for i in range(n)}
    server = SecAggServer(t, session)

    keys = server.collect_keys({u: c.advertise_keys() for u, c in clients.items()})
    inbox = server.route_shares({u: c.share_keys(keys, t) for u, c in clients.items()})
    uploads = {
        u: c.masked_input(quantize(arrays[u - 1], frac_bits, n), inbox[u])
        for u, c in clients.items()
        if u - 1 not in drop_up
    }
    survivors, dropped = server.collect_masked(uploads)
    responses = {
        u: clients[u].unmask(survivors, dropped) for u in survivors if u - 1 not in drop_un
    }
    total = dequantize(server.unmask(responses), frac_bits)
    return SecAggResult(
        total=total,
        survivors=sorted(u - 1 for u in survivors),
        dropped=sorted(u - 1 for u in dropped),
        silent=sorted(u - 1 for u in survivors if u - 1 in drop_un),
        threshold=t,
        masked={u - 1: y for u, y in server.masked.items()},
    )
