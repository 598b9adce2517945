"""The layout of a run directory: the one place that spells its file and folder names.

::

    RUN_DIR/
      config.yaml                     the resolved config (written when the run starts)
      results.json                    rounds, summary, accounting (rewritten after every checkpoint)
      tokens.json                     serving tokens' hashes (fednano-ray token)
      grid.log                        the run's output under fednano-ray grid
      serve/llm/                      the exported server LLM (fednano-ray serve)
      checkpoints/
        round_0000/ ... round_10000/  one per round (at least 4 digits, ordered by number)
          adapters.safetensors        the global adapters
          clients/                    present once clients keep state of their own
            client_00003.safetensors       a client's personal (or FedDPA-F local) adapters
            client_00003.bank.safetensors  FedDPA-F: the client's bank of prompt summaries
          optimizer_states.pt         clients' AdamW moments (train.optimizer_state=keep)
          strategy_state.safetensors  the strategy's own state, if any (fedavgm's server momentum)
          state.json                  written last: its presence marks the checkpoint complete;
                                      it holds the sha256 of every other file and its own

Every file is written atomically (a temporary file in the same folder, fsync'd, then renamed over
the target), so a killed run leaves either the old file or the new one, never half of one. A
checkpoint is read only after its files check out against state.json (:func:`read_checkpoint`,
:func:`verify_checkpoint`); a complete checkpoint whose files do not is corrupt
(:class:`CorruptCheckpoint`), and :func:`newest_valid_checkpoint` passes over it to the one before
(``--resume`` and serving fall back; a pinned checkpoint is never replaced). Checkpoints written
before checksums existed are still read: their files must parse. Nothing here imports Ray, and
torch / safetensors / the config are imported only where they are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from torch import Tensor

    from fednano_ray.config import Config

__all__ = [
    "ADAPTERS",
    "CHECKPOINTS",
    "CHECKPOINT_NAME",
    "CLIENTS",
    "CONFIG",
    "CONFIG_UNSET",
    "GRID_LOG",
    "OPTIMIZER_STATES",
    "REPORT",
    "RESULTS",
    "RESUMABLE_CHANGES",
    "SERVE_LLM",
    "STATE",
    "STRATEGY_STATE",
    "TOKENS",
    "Checkpoint",
    "CorruptCheckpoint",
    "RoundRecord",
    "RunResults",
    "RunSummary",
    "adapters_path",
    "atomic_write",
    "checkpoint_round",
    "client_adapters_path",
    "client_bank_path",
    "client_name",
    "config_changes",
    "config_overrides",
    "config_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_bank",
    "load_checkpoint_tensors",
    "load_results",
    "newest_valid_checkpoint",
    "parse_results",
    "read_checkpoint",
    "read_checkpoint_file",
    "read_checkpoint_state",
    "read_config",
    "read_results",
    "record_config_override",
    "resolve_checkpoint",
    "results_path",
    "round_dir",
    "round_name",
    "save_bank",
    "verify_checkpoint",
    "write_checkpoint",
    "write_config",
    "write_results",
]

# -- names -----------------------------------------------------------------------------------------

CONFIG = "config.yaml"
RESULTS = "results.json"
TOKENS = "tokens.json"
GRID_LOG = "grid.log"
SERVE_LLM = "serve/llm"  # a HF causal-LM folder
CHECKPOINTS = "checkpoints"
ADAPTERS = "adapters.safetensors"
CLIENTS = "clients"
OPTIMIZER_STATES = "optimizer_states.pt"
STRATEGY_STATE = "strategy_state.safetensors"
STATE = "state.json"
#: ``fednano-ray report``'s Markdown file (in the report folder, never in a run directory).
REPORT = "report.md"
_ROUND = "round_"
#: A checkpoint folder's name: ``round_`` and the round number, zero-padded to at least 4 digits.
CHECKPOINT_NAME = rf"^{_ROUND}(\d{{4,}})$"
_CHECKPOINT_NAME = re.compile(CHECKPOINT_NAME)
_Loaded = TypeVar("_Loaded")
#: state.json's keys for the sha256 of each other file (by its name in the folder) and of itself.
FILES = "files"
STATE_SHA256 = "sha256"
#: What only --resume reads: serving checks a checkpoint without them.
TRAINING_ONLY = frozenset({OPTIMIZER_STATES, STRATEGY_STATE})

log = logging.getLogger(__name__)


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def results_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESULTS


def round_name(rnd: int) -> str:
    """``round_0003``; ``round_10000`` past 9999."""
    return f"{_ROUND}{rnd:04d}"


def checkpoint_round(name: str) -> int | None:
    """The round of a checkpoint folder's name (``round_0003`` -> 3); None for any other name."""
    m = _CHECKPOINT_NAME.match(name)
    return int(m.group(1)) if m else None


def round_dir(run_dir: str | Path, rnd: int) -> Path:
    """``run_dir/checkpoints/round_XXXX``: the checkpoint of round ``rnd``."""
    return Path(run_dir) / CHECKPOINTS / round_name(rnd)


def adapters_path(folder: str | Path) -> Path:
    """The global adapters of the checkpoint ``folder``."""
    return Path(folder) / ADAPTERS


def client_name(client_id: int) -> str:
    """``client_00003``: a client's files' stem, and the name its served model starts with."""
    return f"client_{client_id:05d}"


def client_adapters_path(folder: str | Path, client_id: int) -> Path:
    """A client's own adapters in a checkpoint ``folder``: ``clients/client_XXXXX.safetensors``."""
    return Path(folder) / CLIENTS / f"{client_name(client_id)}.safetensors"


def client_bank_path(folder: str | Path, client_id: int) -> Path:
    """A FedDPA-F client's bank in the checkpoint ``folder``, beside its (local) adapters."""
    return Path(folder) / CLIENTS / f"{client_name(client_id)}.bank.safetensors"


# -- finding checkpoints ---------------------------------------------------------------------------


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run (``state.json`` present), oldest round first.

    Ordered by round number, not by name: ``round_10000`` comes after ``round_9999``.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = []
    for p in root.iterdir():
        rnd = checkpoint_round(p.name)
        if rnd is not None and (p / STATE).is_file():
            done.append((rnd, p))
    return [p for _, p in sorted(done)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run; None before its first."""
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def resolve_checkpoint(run_dir: str | Path, name: str | None) -> Path | None:
    """The checkpoint ``name`` (must be complete), or the newest for None; None before round 1.

    Raises:
        ValueError: if ``name`` is missing or incomplete (no state.json), listing the complete ones.
    """
    if name is None:
        return latest_checkpoint(run_dir)
    ckpt = Path(run_dir) / CHECKPOINTS / name
    if checkpoint_round(name) is None or not (ckpt / STATE).is_file():
        have = [p.name for p in list_checkpoints(run_dir)] or "none"
        raise ValueError(
            f"checkpoint {name} of {run_dir} is missing or incomplete; complete ones: {have}"
        )
    return ckpt


# -- atomic writes ---------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Write ``path`` all at once: yields a binary file in its folder, fsync'd and renamed over
    ``path`` when the block ends; on an exception ``path`` is left as it was and nothing remains."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns its sha256."""
    with atomic_write(path) as f:
        f.write(data)
    return _sha256(data)


def _write_text(path: Path, text: str) -> str:
    return _write_bytes(path, text.encode())


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> str:
    from safetensors.torch import save

    return _write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}))


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _clear_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files a killed process left in ``folder`` (:func:`atomic_write`'s,
    named after their writer's pid; this process's own are left alone)."""
    mine = f".{os.getpid()}."
    for sub in (folder, folder / CLIENTS):
        for tmp in sub.glob(".*.tmp") if sub.is_dir() else ():
            if mine not in tmp.name:
                tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (before state.json marks the checkpoint complete)."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsync'd
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- config and results ----------------------------------------------------------------------------


def write_config(run_dir: str | Path, cfg: Config) -> Path:
    """Write the run's resolved config (``config.yaml``)."""
    from fednano_ray.config import dump_config

    path = config_path(run_dir)
    _write_text(path, dump_config(cfg))
    return path


def read_config(run_dir: str | Path) -> Config:
    """The run's config, validated (raises :class:`~fednano_ray.config.ConfigError`)."""
    from fednano_ray.config import load_config

    return load_config(config_path(run_dir))


class FailureRecord(BaseModel):
    """A client that did not count in a round: crashed, stalled past the deadline, or rejected."""

    model_config = ConfigDict(extra="forbid")
    client_id: str
    reason: str


class RoundRecord(BaseModel):
    """One round of ``results.json``'s ``rounds``: who was sampled, who reported, what moved.

    The fields every round has are typed here; an evaluated round adds its accuracies
    (``avg_accuracy``, ``accuracy``, ``global_test_accuracy``, their intervals), a DP round
    ``dp_epsilon`` and the rest, a SecAgg round ``secure_aggregation``: they are kept as extras.
    """

    model_config = ConfigDict(extra="allow")
    round: int = Field(ge=0)
    clients: list[int]
    completed: list[int]
    failures: list[FailureRecord]
    loss: float | None = Field(description="mean training loss of the clients that reported")
    client_loss: dict[str, float]
    placement: dict[str, str | None] = Field(description="client id -> the node its fit ran on")
    bytes_down: int = Field(ge=0)
    bytes_up: int = Field(ge=0)
    aggregated: bool = Field(description="False when the quorum was not met (the adapters stayed)")
    note: str | None = None
    wall_time_s: float = Field(ge=0)


class RunSummary(BaseModel):
    """``results.json``'s ``summary``: filled as the run goes (``accuracy_before`` at its start,
    the rest by ``Federation.finish``). Only what decides a run's state is typed; accuracies per
    client, intervals, gains, the personalisation and the trust figures are kept as extras."""

    model_config = ConfigDict(extra="allow")
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    global_test_accuracy: float | None = None
    strategy: str | None = None
    rounds: int | None = Field(None, ge=0)
    bytes_up: int | None = Field(None, ge=0)
    bytes_down: int | None = Field(None, ge=0)
    failures: int | None = Field(None, ge=0)
    wall_time_s: float | None = Field(None, ge=0)

    @property
    def finished(self) -> bool:
        """``Federation.finish`` ran: a checkpointed, unfinished run has no final wall time."""
        return {"accuracy_after", "wall_time_s"} <= self.model_fields_set


class RunResults(BaseModel):
    """The whole ``results.json``."""

    model_config = ConfigDict(extra="allow")
    config: dict[str, Any]
    rounds: list[RoundRecord]
    summary: RunSummary
    strategy: dict[str, Any] = Field(default_factory=dict)
    accounting: dict[str, Any] = Field(default_factory=dict)
    coordinator_node: str | None = None
    runtime: dict[str, Any] = Field(default_factory=dict)


def parse_results(data: Any, source: str | Path = "results.json") -> RunResults:
    """``data`` validated as a results file.

    Raises:
        ValueError: naming ``source`` and each field that is missing or of the wrong type.
    """
    try:
        return RunResults.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in err.errors()[:5]
        )
        raise ValueError(f"{source}: not a fednano-ray results file ({problems})") from None


def write_results(run_dir: str | Path, results: dict[str, Any]) -> Path:
    """Replace ``results.json`` (indented JSON), after checking it is one (:class:`RunResults`)."""
    path = results_path(run_dir)
    parse_results(results, path)
    _clear_stale_temporaries(Path(run_dir))
    _write_text(path, json.dumps(results, indent=2))
    return path


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """``results.json`` as written (use :func:`load_results` for a validated one)."""
    return json.loads(results_path(run_dir).read_text())


def load_results(run_dir: str | Path) -> RunResults:
    """``results.json`` validated (:class:`RunResults`).

    Raises:
        ValueError: naming the file when it is missing, not JSON, or not a results file.
    """
    path = results_path(run_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{path}: not found; pass a run directory `fednano-ray train --run-dir DIR` wrote"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return parse_results(data, path)


# -- checkpoints -----------------------------------------------------------------------------------


def save_bank(path: str | Path, bank: Tensor) -> str:
    """A FedDPA-F bank (rows of prompt summaries) as float32 safetensors; returns its sha256."""
    return _save_tensors(Path(path), {"bank": bank.detach().float()})


def load_bank(path: str | Path) -> Tensor:
    return _load_tensors(Path(path))["bank"]


@dataclass
class Checkpoint:
    """What a checkpoint holds: enough for ``--resume`` to continue the run exactly.

    Attributes:
        round: the round it was taken after.
        global_state: the global adapters.
        client_states: per client, its own adapters (personal, or FedDPA-F's local ones).
        client_banks: per FedDPA-F client, its bank of prompt summaries.
        optimizer_states: per client, its AdamW moments (``train.optimizer_state=keep``).
        strategy_state: the strategy's own state (``Strategy.state_dict``; fedavgm's momentum).
        rounds: the run's round records so far (as ``results.json`` has them).
        summary: the run's summary so far.
    """

    round: int
    global_state: dict[str, Tensor]
    client_states: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    client_banks: dict[int, Tensor] = field(default_factory=dict)
    optimizer_states: dict[int, dict[str, Any]] = field(default_factory=dict)
    strategy_state: dict[str, Tensor] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class CorruptCheckpoint(ValueError):
    """A complete checkpoint (its state.json is there) whose files do not check out: a file missing,
    unreadable, unparseable, or not the bytes state.json's sha256 says.

    The message names the checkpoint and the file relative to ``checkpoints/`` (e.g.
    ``round_0003/adapters.safetensors``), never an absolute path, so it can be shown to anyone.

    Attributes:
        checkpoint: the checkpoint's folder name (``round_0003``).
        file: the bad file, relative to ``checkpoints/`` (``round_0003/adapters.safetensors``).
        problem: what is wrong with it.
    """

    def __init__(self, folder: str | Path, name: str, problem: str) -> None:
        self.checkpoint = Path(folder).name
        self.file = f"{self.checkpoint}/{name}"
        self.problem = problem
        super().__init__(f"checkpoint {self.checkpoint} is corrupt: {self.file} {problem}")


def _state_sha256(state: dict[str, Any]) -> str:
    """The sha256 state.json keeps of itself: of its other keys as canonical JSON."""
    body = {k: v for k, v in state.items() if k != STATE_SHA256}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_checkpoint(run_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``checkpoints/round_XXXX`` (replacing its files if it exists); returns the folder.

    ``state.json`` goes last, after every other file is durable: a checkpoint with it is complete.
    It records the sha256 of each file written (``files``, by name in the folder) and of itself
    (``sha256``), which :func:`read_checkpoint` checks.
    """
    folder = round_dir(run_dir, ckpt.round)
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(folder)
    files: dict[str, str] = {ADAPTERS: _save_tensors(adapters_path(folder), ckpt.global_state)}
    if ckpt.client_states:
        (folder / CLIENTS).mkdir(exist_ok=True)
        for c, s in ckpt.client_states.items():
            files[_relative(client_adapters_path(folder, c), folder)] = _save_tensors(
                client_adapters_path(folder, c), s
            )
        for c, bank in ckpt.client_banks.items():
            files[_relative(client_bank_path(folder, c), folder)] = save_bank(
                client_bank_path(folder, c), bank
            )
        _fsync_dir(folder / CLIENTS)
    if ckpt.optimizer_states:
        import torch

        buf = io.BytesIO()
        torch.save(ckpt.optimizer_states, buf)
        files[OPTIMIZER_STATES] = _write_bytes(folder / OPTIMIZER_STATES, buf.getvalue())
    if ckpt.strategy_state:
        files[STRATEGY_STATE] = _save_tensors(folder / STRATEGY_STATE, ckpt.strategy_state)
    _fsync_dir(folder)
    state: dict[str, Any] = {
        "round": ckpt.round,
        "rounds": ckpt.rounds,
        "summary": ckpt.summary,
        "client_ids": sorted(ckpt.client_states),
        FILES: dict(sorted(files.items())),
    }
    state = json.loads(json.dumps(state))  # as it reads back (string keys), so the sha256 matches
    state[STATE_SHA256] = _state_sha256(state)
    _write_text(folder / STATE, json.dumps(state))
    _fsync_dir(folder)
    return folder


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _problem(e: BaseException) -> str:
    """An exception as a short reason, without the paths it may carry."""
    if isinstance(e, FileNotFoundError):
        return "is missing"
    if isinstance(e, OSError):
        return f"cannot be read ({type(e).__name__}: {e.strerror or 'I/O error'})"
    return f"cannot be parsed ({type(e).__name__}; truncated or overwritten?)"


def read_checkpoint_state(folder: str | Path) -> dict[str, Any]:
    """A complete checkpoint's state.json, checked: valid JSON, its own sha256, and a sha256 for
    each file it names (checkpoints written before checksums have neither and are taken as they
    are).

    Raises:
        CorruptCheckpoint: naming state.json and what is wrong with it.
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(folder, STATE, _problem(e)) from None
    missing = (
        [k for k in ("round", "rounds", "summary", "client_ids") if k not in state]
        if isinstance(state, dict)
        else ["(not an object)"]
    )
    if missing:
        raise CorruptCheckpoint(folder, STATE, f"lacks {', '.join(missing)}")
    if STATE_SHA256 in state and state[STATE_SHA256] != _state_sha256(state):
        raise CorruptCheckpoint(folder, STATE, "does not match its own sha256 (modified?)")
    if state["round"] != checkpoint_round(folder.name):
        raise CorruptCheckpoint(folder, STATE, f"is round {state['round']}'s, not this folder's")
    if FILES in state:
        need = [ADAPTERS] + [
            _relative(client_adapters_path(folder, c), folder) for c in state["client_ids"]
        ]
        unlisted = [n for n in need if n not in state[FILES]]
        if unlisted:
            raise CorruptCheckpoint(folder, STATE, f"has no sha256 of {', '.join(unlisted)}")
    return state


def read_checkpoint_file(folder: str | Path, name: str, state: dict[str, Any]) -> bytes:
    """The bytes of the checkpoint file ``name`` (relative to ``folder``), checked against the
    sha256 ``state`` (:func:`read_checkpoint_state`) records for it.

    Raises:
        CorruptCheckpoint: the file is missing, unreadable, unlisted or not the bytes recorded.
    """
    folder = Path(folder)
    try:
        data = (folder / name).read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(folder, name, _problem(e)) from None
    files = state.get(FILES)
    if files is None:  # written before checksums: taken as it is (it must still parse)
        return data
    if name not in files:
        raise CorruptCheckpoint(folder, name, "has no sha256 in state.json")
    if _sha256(data) != files[name]:
        raise CorruptCheckpoint(
            folder,
            name,
            f"does not match its sha256 in state.json (expected {files[name][:12]}..., "
            f"found {_sha256(data)[:12]}...; truncated or modified)",
        )
    return data


def load_checkpoint_tensors(
    folder: str | Path, name: str, state: dict[str, Any]
) -> dict[str, Tensor]:
    """A checkpoint's safetensors file ``name``, checked (:func:`read_checkpoint_file`), parsed.

    Raises:
        CorruptCheckpoint: it does not check out or does not parse.
    """
    from safetensors.torch import load

    data = read_checkpoint_file(folder, name, state)
    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - safetensors' errors are not one class
        raise CorruptCheckpoint(folder, name, _problem(e)) from None


def _load_optimizer_states(folder: Path, state: dict[str, Any]) -> dict[int, dict[str, Any]]:
    import torch

    data = read_checkpoint_file(folder, OPTIMIZER_STATES, state)
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and torch errors
        raise CorruptCheckpoint(folder, OPTIMIZER_STATES, _problem(e)) from None


def _checkpoint_files(folder: Path, state: dict[str, Any], serving: bool) -> list[str]:
    """The files of a checkpoint that matter (serving: all but the training-only ones)."""
    if FILES in state:
        names = list(state[FILES])
    else:  # before checksums: the files the folder has
        names = [ADAPTERS] + [
            _relative(p, folder)
            for p in (
                *(client_adapters_path(folder, c) for c in state["client_ids"]),
                *(client_bank_path(folder, c) for c in state["client_ids"]),
                folder / OPTIMIZER_STATES,
                folder / STRATEGY_STATE,
            )
            if p.is_file()
        ]
    return [n for n in names if not (serving and n in TRAINING_ONLY)]


def verify_checkpoint(folder: str | Path, *, serving: bool = False) -> dict[str, Any]:
    """Check every file of a complete checkpoint (``serving``: all but what only --resume reads);
    returns its state.json.

    Raises:
        CorruptCheckpoint: naming the first file that does not check out.
    """
    folder = Path(folder)
    state = read_checkpoint_state(folder)
    for name in _checkpoint_files(folder, state, serving):
        if name == OPTIMIZER_STATES:
            _load_optimizer_states(folder, state)
        else:
            load_checkpoint_tensors(folder, name, state)
    return state


def newest_loadable_checkpoint(
    run_dir: str | Path, load: Callable[[Path], _Loaded]
) -> tuple[Path | None, _Loaded | None, list[CorruptCheckpoint]]:
    """Walk the complete checkpoints newest first until ``load`` (which checks the files against
    state.json, e.g. :func:`verify_checkpoint` or :func:`read_checkpoint`) succeeds.

    Returns:
        ``(folder, loaded, skipped)``: the checkpoint and what ``load`` returned (None, None when
        none checks out or there is none) and, newest first, the corrupt ones passed over. The
        caller warns about ``skipped``; ``folder`` None with ``skipped`` non-empty means every
        checkpoint is corrupt.
    """
    skipped: list[CorruptCheckpoint] = []
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            return folder, load(folder), skipped
        except CorruptCheckpoint as e:
            skipped.append(e)
    return None, None, skipped


def newest_valid_checkpoint(
    run_dir: str | Path, *, serving: bool = False
) -> tuple[Path | None, dict[str, Any] | None, list[CorruptCheckpoint]]:
    """The newest complete checkpoint whose files check out (:func:`verify_checkpoint`), with its
    state.json and the corrupt ones passed over (as :func:`newest_loadable_checkpoint`)."""
    return newest_loadable_checkpoint(run_dir, lambda f: verify_checkpoint(f, serving=serving))


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Load a complete checkpoint folder (as :func:`write_checkpoint` wrote it), every file checked
    against state.json's sha256 first.

    Raises:
        CorruptCheckpoint: naming the first file that does not check out.
    """
    folder = Path(folder)
    state = read_checkpoint_state(folder)
    names = set(_checkpoint_files(folder, state, serving=False))
    ids = state["client_ids"]

    def tensors(path: Path) -> dict[str, Tensor]:
        return load_checkpoint_tensors(folder, _relative(path, folder), state)

    banks = {c: client_bank_path(folder, c) for c in ids}
    return Checkpoint(
        round=state["round"],
        global_state=tensors(adapters_path(folder)),
        client_states={c: tensors(client_adapters_path(folder, c)) for c in ids},
        client_banks={
            c: tensors(p)["bank"] for c, p in banks.items() if _relative(p, folder) in names
        },
        optimizer_states=(
            _load_optimizer_states(folder, state) if OPTIMIZER_STATES in names else {}
        ),
        strategy_state=tensors(folder / STRATEGY_STATE) if STRATEGY_STATE in names else {},
        rounds=state["rounds"],
        summary=state["summary"],
    )


# -- --resume: what a config change may alter --------------------------------------------------

#: Config keys --resume may change: they decide how fast, where and how often the run is checked,
#: never what it computes. ``tiers[*]`` stands for any tier; a key matches its prefixes too
#: (``serve`` covers ``serve.port``). federation.rounds may grow, not shrink
#: (:func:`config_changes`).
RESUMABLE_CHANGES = (
    "federation.rounds",
    "federation.deadline_s",
    "federation.evaluate_every",
    "federation.mode",
    "tiers[*].num_cpus",
    "tiers[*].num_gpus",
    "tiers[*].resources",
    "tiers[*].pool_size",
    "train.eval_batch_size",
    "train.max_batch_size",
    "train.batch_wait_ms",
    "train.trainer_num_cpus",
    "train.trainer_num_gpus",
    "train.trainer_threads",
    "serve",
)
#: A key one side of :func:`config_changes` lacks.
CONFIG_UNSET = "<unset>"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys (``tiers[0].name``, ``federation.strategy_options.mu``) of a config dump."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def _resumable(key: str) -> bool:
    general = re.sub(r"\[\d+\]", "[*]", key)
    return any(general == k or general.startswith((f"{k}.", f"{k}[")) for k in RESUMABLE_CHANGES)


def config_changes(old: Config, new: Config) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """What ``new`` changes of ``old`` (the run's config.yaml), split by what --resume may change.

    Returns:
        ``(refused, allowed)``: per dotted key that alters what the run computes, its old and new
        value (``"<unset>"`` where one side lacks it), in key order; and the keys that change
        harmlessly (:data:`RESUMABLE_CHANGES`).
    """
    a, b = (_flatten(c.model_dump(mode="json")) for c in (old, new))
    refused: dict[str, tuple[Any, Any]] = {}
    allowed: list[str] = []
    for key in sorted(a.keys() | b.keys()):
        was, now = a.get(key, CONFIG_UNSET), b.get(key, CONFIG_UNSET)
        if was == now:
            continue
        shrinks = key == "federation.rounds" and isinstance(was, int) and now < was
        if _resumable(key) and not shrinks:
            allowed.append(key)
        else:
            refused[key] = (was, now)
    return refused, allowed


def record_config_override(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` (a forced --resume's config changes) to results.json's
    ``config_overrides``, which every later rewrite of results.json keeps
    (:func:`config_overrides`). A run without a readable results.json yet gets a minimal one."""
    try:
        results = read_results(run_dir)
        parse_results(results)
    except (OSError, ValueError):
        results = {"config": {}, "rounds": [], "summary": {}}
    results.setdefault("config_overrides", []).append(record)
    write_results(run_dir, results)


def config_overrides(run_dir: str | Path) -> list[dict[str, Any]]:
    """results.json's ``config_overrides`` (what forced resumes changed), or [] (none, or no
    readable results.json)."""
    try:
        found = read_results(run_dir).get("config_overrides", [])
    except (OSError, ValueError, AttributeError):
        return []
    return list(found) if isinstance(found, list) else []
