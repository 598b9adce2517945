"""Per-client bearer tokens for the Serve app: issued once, only a hash kept on disk.

A token is ``fnr_`` + ``secrets.token_urlsafe(32)``: 256 bits from the OS CSPRNG. The run
directory keeps ``tokens.json`` (mode 0600) with, per client,
``sha256(domain || client_id || token)``.

Why a plain SHA-256 and not scrypt/PBKDF2: slow, salted KDFs exist to make *guessing* a
low-entropy secret (a password) expensive. Our tokens are not chosen by people; they are 256-bit
random strings, so a leaked ``tokens.json`` cannot be inverted by brute force at any hash speed
(2^256 candidates), and every token is unique, so precomputed tables and salts buy nothing. A KDF
would instead cost tens of milliseconds of CPU on *every request* (verification is on the hot
path) and make the ingress easy to DoS. The client id and a version tag are hashed in (domain
separation), so a hash copied to another client's entry does not verify there. This is the scheme
GitHub and PyPI use for API tokens.

Verification is constant-time: the presented token is always hashed and compared with
``hmac.compare_digest`` against the client's hash, or against a dummy hash when the client has no
token (or does not exist), so neither the answer nor its timing says whether a client exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from fednano_ray.federation import rundir

TOKEN_PREFIX = "fnr_"
TOKENS_FILE = rundir.TOKENS
_SCHEME = "sha256-v1"
_DOMAIN = b"fednano-ray/serve-token/v1\x00"
# Compared against when a client has no token, so that path does the same work as a real check.
_DUMMY_HASH = hashlib.sha256(b"fednano-ray/no-such-client").hexdigest()


class TokenError(ValueError):
    """A token cannot be issued or the token file is unusable; the message says what to do."""


def hash_token(client_id: int, token: str) -> str:
    """Hex SHA-256 of a token bound to its client (see the module docstring for why SHA-256)."""
    h = hashlib.sha256(_DOMAIN)
    h.update(str(int(client_id)).encode() + b"\x00")
    h.update(token.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def tokens_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / TOKENS_FILE


def load_tokens(run_dir: str | Path) -> dict[int, str]:
    """``{client_id: hash}`` from ``run_dir/tokens.json`` (empty when no token was issued yet).

    Raises:
        TokenError: if the file exists but is not a token file of this version.
    """
    path = tokens_path(run_dir)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("scheme") != _SCHEME:
            raise TokenError(
                f"{path}: unknown token scheme {data.get('scheme')!r} (expected {_SCHEME!r})"
            )
        return {int(c): str(v["hash"]) for c, v in data["clients"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, TokenError):
            raise
        raise TokenError(
            f"{path} is not a valid token file ({e}); delete it and reissue the tokens"
        ) from e


def _write_tokens(run_dir: Path, entries: Mapping[int, dict[str, str]]) -> None:
    """Atomically replace tokens.json; the file is created 0600 (never world-readable, not even
    briefly)."""
    path = tokens_path(run_dir)
    tmp = path.with_name(f".{TOKENS_FILE}.{os.getpid()}.tmp")
    body = json.dumps(
        {"scheme": _SCHEME, "clients": {str(c): entries[c] for c in sorted(entries)}}, indent=1
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask and ignored for an existing file
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if fd != -1:
            os.close(fd)
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise issuers (two ``fednano-ray token`` at once must not lose a token)."""
    fd = os.open(run_dir / f".{TOKENS_FILE}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_entries(run_dir: Path) -> dict[int, dict[str, str]]:
    path = tokens_path(run_dir)
    if not path.exists():
        return {}
    load_tokens(run_dir)  # validates
    return {int(c): v for c, v in json.loads(path.read_text())["clients"].items()}


def _new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _check_run_dir(run_dir: str | Path, client_id: int, num_clients: int | None) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TokenError(
            f"run directory {run_dir} does not exist (pass the --run-dir of a training run)"
        )
    if num_clients is None and rundir.config_path(run_dir).exists():
        num_clients = rundir.read_config(run_dir).federation.num_clients
    if client_id < 0 or (num_clients is not None and client_id >= num_clients):
        hi = f"0..{num_clients - 1}" if num_clients else "a non-negative integer"
        raise TokenError(f"client id {client_id} is not a client of this run (use {hi})")
    return run_dir


def issue_token(
    run_dir: str | Path, client_id: int, rotate: bool = False, *, num_clients: int | None = None
) -> str:
    """Create a client's serving token, store only its hash, and return the token (shown once).

    Args:
        run_dir: the training run directory (holds config.yaml; tokens.json goes next to it).
        client_id: 0..num_clients-1.
        rotate: replace an existing token (the old one stops working at once: the ingress
            re-reads tokens.json when it changes).
        num_clients: bound for ``client_id`` (default: read from ``run_dir/config.yaml``).

    Raises:
        TokenError: unknown client, or the client already has a token and ``rotate`` is False.
    """
    run_dir = _check_run_dir(run_dir, int(client_id), num_clients)
    with _locked(run_dir):
        entries = _read_entries(run_dir)
        if client_id in entries and not rotate:
            raise TokenError(
                f"client {client_id} already has a token "
                f"(issued {entries[client_id].get('created', '?')}); "
                "tokens are shown only once: pass --rotate to replace it "
                "(the old token stops working)"
            )
        token = _new_token()
        entries[int(client_id)] = {
            "hash": hash_token(client_id, token),
            "created": datetime.now(UTC).isoformat(),
        }
        _write_tokens(run_dir, entries)
    return token


def issue_all(run_dir: str | Path, num_clients: int, *, rotate: bool = False) -> dict[int, str]:
    """Tokens for clients 0..num_clients-1 in one write (training time); returns
    ``{client_id: token}``.

    Raises:
        TokenError: if any of them already has a token and ``rotate`` is False.
    """
    run_dir = _check_run_dir(run_dir, 0, num_clients)
    with _locked(run_dir):
        entries = _read_entries(run_dir)
        taken = sorted(c for c in range(num_clients) if c in entries)
        if taken and not rotate:
            raise TokenError(
                f"clients {taken} already have tokens: pass rotate=True (--rotate) to replace them"
            )
        now = datetime.now(UTC).isoformat()
        tokens = {c: _new_token() for c in range(num_clients)}
        entries.update({c: {"hash": hash_token(c, t), "created": now} for c, t in tokens.items()})
        _write_tokens(run_dir, entries)
    return tokens


def verify(
    run_dir_tokens: str | Path | Mapping[int, str], client_id: int | None, presented: str
) -> bool:
    """True iff ``presented`` is ``client_id``'s current token; constant-time in every case.

    Args:
        run_dir_tokens: a run directory, or the ``{client_id: hash}`` map of :func:`load_tokens`.
        client_id: the client the request is for (None: not a client, always False).
        presented: the bearer token from the request.
    """
    hashes = run_dir_tokens if isinstance(run_dir_tokens, Mapping) else load_tokens(run_dir_tokens)
    cid = -1 if client_id is None else int(client_id)
    stored = hashes.get(cid)
    expected = stored if stored is not None else _DUMMY_HASH
    ok = hmac.compare_digest(hash_token(cid, presented).encode(), expected.encode())
    return ok and stored is not None


def client_of(hashes: Mapping[int, str], presented: str) -> int | None:
    """The client whose current token ``presented`` is, or None.

    For requests that name their client only inside the body (chat completions' ``model``): the
    ingress checks that the token is *some* client's before it reads the body. The hash binds the
    client id, so this hashes the token once per client (about a microsecond each) and compares
    against every entry, without stopping at a match: the time depends on the number of clients,
    not on whether or which client matched.
    """
    found: int | None = None
    for cid, stored in hashes.items():
        if hmac.compare_digest(hash_token(cid, presented).encode(), stored.encode()):
            found = cid
    return found


class TokenStore:
    """The token hashes of a run, re-read when ``tokens.json`` changes (issue/rotate while
    serving)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = tokens_path(run_dir)
        self._stamp: tuple[int, int] | None = None
        self._hashes: dict[int, str] = {}

    def hashes(self) -> dict[int, str]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            self._stamp, self._hashes = None, {}
            return self._hashes
        if stamp != self._stamp:
            self._hashes = load_tokens(self.path.parent)
            self._stamp = stamp
        return self._hashes

    def verify(self, client_id: int | None, presented: str) -> bool:
        return verify(self.hashes(), client_id, presented)

    def client_of(self, presented: str) -> int | None:
        """The client whose current token ``presented`` is, else None (see :func:`client_of`)."""
        return client_of(self.hashes(), presented)
