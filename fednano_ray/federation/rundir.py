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
          state.json                  written last: its presence marks the checkpoint complete

Every file is written atomically (a temporary file in the same folder, fsync'd, then renamed over
the target), so a killed run leaves either the old file or the new one, never half of one. Nothing
here imports Ray, and torch / safetensors / the config are imported only where they are used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

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
    "GRID_LOG",
    "OPTIMIZER_STATES",
    "REPORT",
    "RESULTS",
    "SERVE_LLM",
    "STATE",
    "STRATEGY_STATE",
    "TOKENS",
    "Checkpoint",
    "RoundRecord",
    "RunResults",
    "RunSummary",
    "adapters_path",
    "atomic_write",
    "checkpoint_round",
    "client_adapters_path",
    "client_bank_path",
    "client_name",
    "config_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_bank",
    "load_results",
    "parse_results",
    "read_checkpoint",
    "read_config",
    "read_results",
    "resolve_checkpoint",
    "results_path",
    "round_dir",
    "round_name",
    "save_bank",
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


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode())


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save

    with atomic_write(path) as f:
        f.write(save({k: v.contiguous() for k, v in tensors.items()}))


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


def save_bank(path: str | Path, bank: Tensor) -> None:
    """A FedDPA-F bank (rows of prompt summaries) as float32 safetensors."""
    _save_tensors(Path(path), {"bank": bank.detach().float()})


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


def write_checkpoint(run_dir: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``checkpoints/round_XXXX`` (replacing its files if it exists); returns the folder.

    ``state.json`` goes last, after every other file is durable: a checkpoint with it is complete.
    """
    folder = round_dir(run_dir, ckpt.round)
    folder.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(folder)
    _save_tensors(adapters_path(folder), ckpt.global_state)
    if ckpt.client_states:
        (folder / CLIENTS).mkdir(exist_ok=True)
        for c, s in ckpt.client_states.items():
            _save_tensors(client_adapters_path(folder, c), s)
        for c, bank in ckpt.client_banks.items():
            save_bank(client_bank_path(folder, c), bank)
        _fsync_dir(folder / CLIENTS)
    if ckpt.optimizer_states:
        import torch

        with atomic_write(folder / OPTIMIZER_STATES) as f:
            torch.save(ckpt.optimizer_states, f)
    if ckpt.strategy_state:
        _save_tensors(folder / STRATEGY_STATE, ckpt.strategy_state)
    _fsync_dir(folder)
    state = {
        "round": ckpt.round,
        "rounds": ckpt.rounds,
        "summary": ckpt.summary,
        "client_ids": sorted(ckpt.client_states),
    }
    _write_text(folder / STATE, json.dumps(state))
    _fsync_dir(folder)
    return folder


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Load a complete checkpoint folder (as :func:`write_checkpoint` wrote it)."""
    folder = Path(folder)
    state = json.loads((folder / STATE).read_text())
    ids = state["client_ids"]
    banks = {c: client_bank_path(folder, c) for c in ids}
    optimizer_states: dict[int, dict[str, Any]] = {}
    if (folder / OPTIMIZER_STATES).exists():
        import torch

        optimizer_states = torch.load(folder / OPTIMIZER_STATES, weights_only=True)
    strategy = folder / STRATEGY_STATE
    return Checkpoint(
        round=state["round"],
        global_state=_load_tensors(adapters_path(folder)),
        client_states={c: _load_tensors(client_adapters_path(folder, c)) for c in ids},
        client_banks={c: load_bank(p) for c, p in banks.items() if p.is_file()},
        optimizer_states=optimizer_states,
        strategy_state=_load_tensors(strategy) if strategy.exists() else {},
        rounds=state["rounds"],
        summary=state["summary"],
    )
