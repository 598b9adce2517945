"""Assemble the Ray app (the only place ``ray.remote`` is applied) and drive a training run."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fednano_ray.config import Config, ConfigError
from fednano_ray.federation import rundir


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Fail before any actor starts when a tier can never be placed on this cluster.

    Raises:
        ConfigError: naming the tier key, what it asks for and what the cluster has.
    """
    trainer = not cfg.clients_hold_llm()  # fedavg-lora starts no LLM trainer
    need_cpu = cfg.train.trainer_num_cpus if trainer else 0.0
    for i, t in enumerate(cfg.tiers):
        actors = t.clients if cfg.federation.mode == "deployment" else min(t.pool_size, t.clients)
        need_cpu += t.num_cpus * actors
        if t.num_gpus > available.get("GPU", 0.0):
            raise ConfigError(
                f"tiers[{i}].num_gpus = {t.num_gpus:g} ({t.name}) but the cluster has "
                f"{available.get('GPU', 0.0):g} GPUs: "
                "lower it, or run on a cluster with GPUs (--address)"
            )
        for res, amount in t.resources.items():
            if amount > available.get(res, 0.0):
                raise ConfigError(
                    f"tiers[{i}].resources.{res} = {amount:g} ({t.name}) but the cluster offers "
                    f"{available.get(res, 0.0):g}: "
                    f"start nodes with --resources='{{\"{res}\": N}}' "
                    "(see cluster.yaml) or remove it"
                )
    if trainer and cfg.train.trainer_num_gpus > available.get("GPU", 0.0):
        raise ConfigError(
            f"train.trainer_num_gpus = {cfg.train.trainer_num_gpus:g} but the cluster has no GPU"
        )
    if need_cpu > available.get("CPU", 0.0) + 1e-9:
        raise ConfigError(
            f"the trainer and client actors need {need_cpu:g} CPUs but the cluster has "
            f"{available.get('CPU', 0.0):g}: "
            "lower tiers[*].num_cpus or tiers[*].pool_size (fractions such as 0.5 are fine) or "
            "train.trainer_num_cpus"
        )


def actor_classes() -> dict[str, Any]:
    import ray

    from fednano_ray.actors.client import ClientActor
    from fednano_ray.actors.coordinator import Coordinator
    from fednano_ray.actors.llm_trainer import LLMTrainer

    return {
        "client": ray.remote(ClientActor),
        "trainer": ray.remote(LLMTrainer),
        "coordinator": ray.remote(Coordinator),
    }


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Start a private local Ray instance (``address`` None), or join the cluster at ``address``.

    ``address=None`` means ``"local"``: a new instance even when ``ray start`` already runs one on
    this machine (plain ``ray.init()`` would join that one and then refuse ``num_cpus``). Only entry
    points call this.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None:
        # Ray's token authentication stays on (Ray 2.60's default; RAY_AUTH_MODE=disabled opts out
        # at the caller's own risk): every call into this cluster needs ~/.ray/auth_token.
        ray.init(address="local", include_dashboard=False, log_to_driver=True, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    protect_ray_token()


def protect_ray_token() -> Path | None:
    """Make Ray's token file (``~/.ray/auth_token``, which Ray 2.60 writes world-readable) readable
    by its owner only: it is the key to the whole cluster. Returns the file, or None without one
    (or when it is not ours to change)."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if path.is_file() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError:  # another user's file, a read-only home: leave it, Ray still works
        return None
    return path if path.is_file() else None


def ray_auth_mode() -> str:
    """``token`` or ``disabled``: whether this process's Ray calls need the cluster token."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return "token" if is_token_auth_enabled() else "disabled"
    except ImportError:  # a Ray without token authentication
        return "disabled"


def head_node_id() -> str:
    """The Ray head node's id (it advertises ``node:__internal_head__``); the driver's node if none
    does."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


#: The flag of ``fednano-ray train --resume`` that resumes despite config changes
#: (:func:`check_resume_config`).
FORCE_CONFIG_CHANGE = "--force-config-change"

log = logging.getLogger(__name__)


def _warn(message: str) -> None:
    """A warning in the log and, once, on stderr (logging prints it there itself when nothing
    is configured to handle it)."""
    log.warning(message)
    if log.hasHandlers():
        print(f"warning: {message}", file=sys.stderr)


def _show(value: Any) -> str:
    return value if value == rundir.CONFIG_UNSET else repr(value)


def _change(key: str, old: Any, new: Any) -> str:
    """``key: old → new``, as the resume errors and warnings list a config change."""
    return f"{key}: {_show(old)} → {_show(new)}"


def check_resume_config(
    cfg: Config, run_dir: str | Path, *, force: bool = False
) -> dict[str, tuple[Any, Any]]:
    """Compare ``cfg`` with the run's ``config.yaml`` before ``--resume`` continues it.

    Changes that only decide how fast, where or how often the run is checked
    (:data:`.rundir.RESUMABLE_CHANGES`: more rounds, the deadline, evaluate_every, resources,
    serving) pass; any other would make one run of two configs and is refused unless ``force``.

    Returns:
        the refused changes that ``force`` lets through (key -> (old, new)); {} when the run has no
        config.yaml yet.

    Raises:
        ConfigError: without ``force``, naming each changed key, old -> new, and the flag.
    """
    path = rundir.config_path(run_dir)
    if not path.is_file():
        return {}
    refused, _ = rundir.config_changes(rundir.read_config(run_dir), cfg)
    if refused and not force:
        lines = "".join(f"\n  {_change(k, a, b)}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"--resume: the config changes what the run in {run_dir} computes "
            f"(its {rundir.CONFIG} says otherwise):{lines}\n"
            "resuming would mix two configs in one run: start a new --run-dir, or pass "
            f"{FORCE_CONFIG_CHANGE} to resume with these changes "
            "(recorded in results.json's config_overrides)"
        )
    return refused


def prepare_resume(cfg: Config, run_dir: str | Path, *, force_config_change: bool = False) -> None:
    """What ``--resume`` checks before any actor starts: the config (:func:`check_resume_config`)
    and the checkpoints (a corrupt newest one is passed over, with a warning on stderr, for the
    newest that checks out; the coordinator's :meth:`~.rounds.Federation.restore` does the same).
    A forced config change is warned about and recorded in results.json's ``config_overrides``.

    Raises:
        ConfigError: a refused config change, or no checkpoint of the run checks out.
    """
    changes = check_resume_config(cfg, run_dir, force=force_config_change)
    folder, _, skipped = rundir.newest_valid_checkpoint(run_dir)
    for e in skipped:
        _warn(
            f"--resume: {e}; "
            + (
                f"falling back to {folder.name} (continuing at round {_next_round(folder)})"
                if folder is not None
                else "no checkpoint before it checks out"
            )
        )
    if skipped and folder is None:
        raise ConfigError(
            f"--resume: no checkpoint of {run_dir} checks out (each is listed above); "
            f"start a new --run-dir, or move {rundir.CHECKPOINTS}/ aside to start this run again"
        )
    if changes:
        _warn(
            f"--resume with {FORCE_CONFIG_CHANGE}: the run continues under a changed config "
            f"({', '.join(_change(k, a, b) for k, (a, b) in changes.items())}); "
            "recorded in results.json's config_overrides"
        )
        record = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "resumed_from": folder.name if folder is not None else None,
            "forced_by": FORCE_CONFIG_CHANGE,
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
        }
        last = (rundir.config_overrides(run_dir) or [{}])[-1]
        # The same changes again from the same checkpoint: a retry of a resume that never
        # started (config.yaml, which the coordinator rewrites, still has the old values).
        if (last.get("changes"), last.get("resumed_from")) != (
            record["changes"],
            record["resumed_from"],
        ):
            rundir.record_config_override(run_dir, record)


def _next_round(folder: Path) -> int:
    rnd = rundir.checkpoint_round(folder.name)
    return rnd + 1 if rnd is not None else 0


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force_config_change: bool = False,
    client_class: type | None = None,
    progress: bool = True,
    stop_after_round: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federated training run on the connected Ray cluster; returns results.json.

    Args:
        client_class: the client actor's class (default
            :class:`~fednano_ray.actors.client.ClientActor`; a subclass keeps its constructor and
            methods, e.g. tests/_chaos.py's fault injectors).
        stop_after_round: end after this round without finishing (simulates a killed run).
        force_config_change: with ``resume``, continue although the config changes what the run
            computes (:func:`check_resume_config`; recorded in results.json).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    if not resume and rundir.results_path(run_dir).exists():
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume to continue it "
            "or choose another --run-dir"
        )
    if resume:
        prepare_resume(cfg, run_dir, force_config_change=force_config_change)
    check_resources(cfg, ray.cluster_resources())
    classes = actor_classes()
    if client_class is not None:
        classes["client"] = ray.remote(client_class)
    t0 = time.perf_counter()
    # The coordinator owns the run: pin it to the head node, never to a client node that may be
    # removed mid-run (tests/actors/test_federation.py removes one). It needs no CPU, so it always
    # fits.
    on_head = NodeAffinitySchedulingStrategy(node_id=head_node_id(), soft=False)
    coord = bar = None
    # Ctrl-C, or SIGTERM under stop_on_signals (fednano-ray train), at any point of the run: the
    # round in flight is abandoned, the newest complete checkpoint stands (TrainingInterrupted).
    try:
        coord = (
            classes["coordinator"]
            .options(max_concurrency=4, num_cpus=0, scheduling_strategy=on_head)
            .remote(
                cfg,
                str(run_dir),
                resume=resume,
                actor_classes={k: classes[k] for k in ("client", "trainer")},
            )
        )
        info = ray.get(coord.begin.remote())
        fed = cfg.federation
        bar = tqdm(
            total=fed.rounds,
            initial=info["next_round"],
            desc="rounds",
            unit="round",
            disable=not progress,
            file=sys.stderr,
        )
        for rnd in range(info["next_round"], fed.rounds):
            ref = coord.run_round.remote(rnd)
            while True:
                ready, _ = ray.wait([ref], timeout=1.0)
                if ready:
                    break
                p = ray.get(coord.get_progress.remote())
                if p["round"] == rnd:
                    bar.set_postfix_str(f"round {rnd}: {p['done']}/{p['total']} clients")
            rec = ray.get(ref)
            post = {
                "loss": f"{rec['loss']:.3f}" if rec["loss"] is not None else "-",
                "failed": len(rec["failures"]),
            }
            if (
                rec.get("avg_accuracy") is not None
            ):  # None when no client could be scored (eval failures)
                post["acc"] = f"{rec['avg_accuracy']:.3f}"
            bar.set_postfix(post)
            bar.update(1)
            if stop_after_round is not None and rnd >= stop_after_round:
                bar.close()
                results = ray.get(coord.write_results.remote())
                ray.kill(coord)  # as if the run were killed here: only the checkpoints remain
                return results
        bar.close()
        if fed.personalize_steps:
            if progress and cfg.method().dual_adapter:
                print(
                    f"{fed.strategy} local phase: every client trains a local adapter for "
                    f"{fed.personalize_steps} steps beside the frozen global one",
                    file=sys.stderr,
                )
            elif progress:
                print(
                    "personalising: every client fine-tunes the global adapters for "
                    f"{fed.personalize_steps} steps",
                    file=sys.stderr,
                )
            ray.get(coord.personalize.remote())
        results = ray.get(coord.finish.remote(time.perf_counter() - t0))
        results["trainer_stats"] = ray.get(coord.trainer_stats.remote())
    except KeyboardInterrupt as e:
        if bar is not None:
            bar.close()
        _abandon(coord)
        newest = settle_interrupted_run(run_dir)
        raise TrainingInterrupted(interrupting_signal(e), run_dir, newest) from None
    ray.kill(coord)
    return results


# -- stopping: signals, an interrupted run, the Ray instance a command started --------------------


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived under :func:`stop_on_signals`; ``signum`` says which. A
    KeyboardInterrupt, so every Ctrl-C path (``except KeyboardInterrupt``, ``finally``) takes it."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)


_last_signal: int | None = None  # the signal stop_on_signals' handler took last


def interrupting_signal(e: KeyboardInterrupt) -> int:
    """The signal behind ``e``: an :class:`Interrupted`'s own, else the one stop_on_signals took
    (``ray.get`` and ``ray.wait`` turn whatever a signal handler raises in them into a plain
    KeyboardInterrupt), else SIGINT (Python's own Ctrl-C)."""
    if isinstance(e, Interrupted):
        return e.signum
    return _last_signal if _last_signal is not None else int(signal.SIGINT)


class TrainingInterrupted(Interrupted):
    """:func:`train` stopped by a signal (or Ctrl-C): the round in flight was abandoned and the run
    stands at its newest complete ``checkpoint`` (None before the first round ended), which its
    results.json matches (:func:`settle_interrupted_run`); ``--resume`` continues at
    ``next_round``."""

    def __init__(self, signum: int, run_dir: str | Path, checkpoint: Path | None) -> None:
        super().__init__(signum)
        self.run_dir = Path(run_dir)
        self.checkpoint = checkpoint
        rnd = rundir.checkpoint_round(checkpoint.name) if checkpoint is not None else None
        self.next_round = rnd + 1 if rnd is not None else 0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM (a scheduler, ``docker stop``, ``kill``) and SIGINT (Ctrl-C) raise
    :class:`Interrupted` in the main thread, so the ``except``/``finally`` blocks that checkpoint
    and shut Ray down run: Python's default SIGTERM, and Ray's (``ray.init`` installs one, which
    Ray's C++ core then replaces with one that aborts), end the process without them.

    Enter it after ``ray.init``. The first signal puts both back to the system's default, so a
    second one ends the process at once instead of waiting for the shutdown (nothing is left half
    written: every run-directory file is written atomically). Leaving the block without a signal
    restores the handlers it found.
    """
    global _last_signal
    watched = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in watched}
    caught = False
    _last_signal = None

    def handler(signum: int, frame: Any) -> None:
        global _last_signal
        nonlocal caught
        caught = True
        _last_signal = signum
        for s in watched:
            signal.signal(s, signal.SIG_DFL)
        raise Interrupted(signum)

    for s in watched:
        signal.signal(s, handler)
    try:
        yield
    finally:
        if not caught:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)


def shutdown_ray(*, started: bool, timeout_s: float = 30.0) -> None:
    """Leave Ray. ``started`` (this process's :func:`init_ray` started the instance, no
    ``address``): stop it too, and wait until its daemons and workers (gcs_server, raylet, the
    dashboard and runtime-env agents, actors: all this process's descendants) are gone, killing
    any still there after ``timeout_s``, so that none outlives the command. A cluster that was
    joined keeps running."""
    import ray

    procs: list[Any] = []
    if started:
        import psutil  # a dependency (of Ray, too)

        with contextlib.suppress(psutil.Error):  # /proc unreadable: ray.shutdown alone
            procs = psutil.Process().children(recursive=True)
    try:
        ray.shutdown()
    finally:
        if procs:
            _, alive = psutil.wait_procs(procs, timeout=timeout_s)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(alive, timeout=5)


def _abandon(coord: Any) -> None:
    """Kill the coordinator, and the round in flight with it, and wait until Ray reports it dead,
    so that it writes nothing more to the run directory."""
    if coord is None:
        return
    import ray

    try:
        ray.kill(coord, no_restart=True)
        ray.wait([coord.get_progress.remote()], timeout=30)  # fails once the actor is dead
    except Exception as e:  # noqa: BLE001 - the cluster may be going down already (Ctrl-C
        # reaches every process of the terminal): ray.shutdown is next either way
        log.debug("stopping the coordinator: %s", e)


def settle_interrupted_run(run_dir: str | Path) -> Path | None:
    """Leave a run whose coordinator was stopped mid-round as ``--resume`` wants it: remove the
    checkpoint folders left incomplete (no state.json) after the newest complete one, and give
    results.json that checkpoint's rounds and summary (the coordinator writes a checkpoint, then
    results.json: a kill between the two leaves results.json a round behind). A finished
    results.json, and a checkpoint that does not check out (``--resume`` passes over it), are left
    as they are.

    Returns:
        the newest complete checkpoint, None before the first.
    """
    run_dir = Path(run_dir)
    newest = rundir.latest_checkpoint(run_dir)
    last = rundir.checkpoint_round(newest.name) if newest is not None else None
    root = run_dir / rundir.CHECKPOINTS
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        rnd = rundir.checkpoint_round(folder.name)
        late = rnd is not None and (last is None or rnd > last)
        if late and not (folder / rundir.STATE).exists():
            shutil.rmtree(folder, ignore_errors=True)
    if newest is None or not rundir.results_path(run_dir).is_file():
        return newest
    try:
        state = rundir.read_checkpoint_state(newest)
        results = rundir.read_results(run_dir)
        finished = rundir.parse_results(results).summary.finished
    except (OSError, ValueError):  # CorruptCheckpoint is a ValueError
        return newest
    if not finished and (results["rounds"], results["summary"]) != (
        state["rounds"],
        state["summary"],
    ):
        results.update(rounds=state["rounds"], summary=state["summary"])
        rundir.write_results(run_dir, results)
    return newest
