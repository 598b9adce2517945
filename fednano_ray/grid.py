"""``fednano-ray grid``: run a grid of experiments cell by cell, resumably, then report on them.

A grid spec (YAML, see examples/paper/grid.yaml) names a base config and groups of cells::

    base: base.yaml                 # relative to the spec file
    runs_dir: runs/paper            # relative to the working directory; --runs-dir overrides it
    seeds: [0, 1, 2]                # every cell runs once per seed ...
    seed_keys: [federation.seed]    # ... with each of these keys set to the seed
    set: [federation.rounds=4]      # optional: --set overrides of every cell
    defs: {...}                     # optional: free space for YAML anchors (&name / *name)
    groups:
      main:
        set: [data.partition=dirichlet]          # optional: overrides of every cell of the group
        axes:                                    # the cells are the product of the axes' options
          strategy: {key: federation.strategy, values: [fedavg, fednano]}
          clients:                               # an option is one override or a list of them
            - [federation.num_clients=5, tiers.0.clients=2, tiers.1.clients=3]
            - [federation.num_clients=10, tiers.0.clients=5, tiers.1.clients=5]

Overrides are ``fednano-ray train --set`` strings (``key=value``, YAML values). A cell's run
directory is named from what its overrides change in the base config (plus a short hash of that),
so the same cell listed by two groups runs once, and a rerun finds its finished cells and skips
them. Every cell's config is validated before anything runs: a typo stops the grid at once. A cell
whose only problem is an unknown ``federation.strategy`` (one not implemented yet) is reported as
failed, with the config error, and the grid goes on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fednano_ray.config import ConfigError, load_config, parse_overrides
from fednano_ray.federation import rundir
from fednano_ray.report import ReportError, build_report, flatten, load_run, run_finished

__all__ = [
    "Cell",
    "GridError",
    "GridSpec",
    "check_cells",
    "expand",
    "load_grid",
    "run_grid",
    "train_subprocess",
]

#: A runner trains one cell: (base config, overrides, run dir, resume) -> (ok, message).
Runner = Callable[[Path, list[str], Path, bool], tuple[bool, str]]

DEFAULT_RUNS_DIR = Path("runs/paper")
_STRATEGY = "federation.strategy"
# Stands in for an unknown strategy to check the rest of a cell's config.
_FALLBACK_STRATEGY = "fedavg"
_TOP_KEYS = {"base", "runs_dir", "seeds", "seed_keys", "set", "groups", "defs"}
_GROUP_KEYS = {"set", "axes", "description"}
_ABBREV = {
    "data.alpha": "a",
    "federation.num_clients": "n",
    "federation.clients_per_round": "cpr",
    "federation.seed": "s",
    "data.synth.seed": "ds",
    "adapter.r": "r",
    "adapter.modalities": "mod",
    "federation.rounds": "rounds",
    "federation.fedprox_mu": "mu",
    "federation.strategy_options.mu": "mu",
}
_TIER_ABBREV = {"adapter_rank": "rank", "local_steps": "steps", "clients": "c", "batch_size": "bs"}


class GridError(ConfigError):
    """A grid spec or cell that cannot run; the message names the file, group or cell."""


# -- the spec -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    name: str
    set: tuple[str, ...]
    # (axis name, options); an option is a tuple of overrides
    axes: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]


@dataclass(frozen=True)
class GridSpec:
    path: Path
    base: Path
    runs_dir: Path | None
    seeds: tuple[int, ...]
    seed_keys: tuple[str, ...]
    set: tuple[str, ...]
    groups: dict[str, Group]


def _yaml_value(v: Any) -> str:
    """A value as --set writes it (YAML flow style): 0.1, null, [vision, text], fedavg-lora."""
    return (
        yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    )


def _overrides(obj: Any, where: str) -> tuple[str, ...]:
    """An override string, or a (nested) list of them, as a flat tuple; checked for key=value
    form."""
    if obj is None:
        return ()
    if isinstance(obj, str):
        items = [obj]
    elif isinstance(obj, list):
        items = []
        for x in obj:
            items.extend(_overrides(x, where))
    else:
        raise GridError(f"{where}: expected key=value strings or lists of them, got {obj!r}")
    try:
        parse_overrides(items)
    except ConfigError as e:
        raise GridError(f"{where}: {e}") from None
    return tuple(items)


def _axis(options: Any, where: str) -> tuple[tuple[str, ...], ...]:
    # {key: k (or keys: [k1, k2]), values: [...]}: each value is one option, setting every key.
    if isinstance(options, dict):
        unknown = set(options) - {"key", "keys", "values"}
        keys = options.get("keys", options.get("key"))
        keys = [keys] if isinstance(keys, str) else keys
        if unknown or not keys or not isinstance(options.get("values"), list):
            raise GridError(
                f"{where}: an axis mapping needs `key` (or `keys`) and a list of `values`"
            )
        return tuple(
            _overrides([f"{k}={_yaml_value(v)}" for k in keys], where) for v in options["values"]
        )
    if not isinstance(options, list) or not options:
        raise GridError(
            f"{where}: expected a non-empty list of options or a {{key, values}} mapping"
        )
    return tuple(_overrides(o, f"{where}[{i}]") for i, o in enumerate(options))


def _check_keys(where: str, tree: dict[str, Any], allowed: set[str]) -> None:
    """A GridError naming the keys of ``tree`` that ``allowed`` does not list, and the allowed
    ones."""
    unknown = sorted(set(tree) - allowed)
    if unknown:
        raise GridError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def load_grid(path: str | Path) -> GridSpec:
    """Parse and check a grid spec file (not the cells' configs: see :func:`check_cells`)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid spec {path} does not exist (see examples/paper/grid.yaml)")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise GridError(f"{path}: the top level must be a mapping (base, seeds, groups, ...)")
    _check_keys(str(path), tree, _TOP_KEYS)
    if not tree.get("base"):
        raise GridError(f"{path}: `base` (the base config, relative to the spec) is required")
    base = (path.parent / str(tree["base"])).resolve()
    if not base.is_file():
        raise GridError(f"{path}: base config {base} does not exist")
    seeds = tree.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise GridError(f"{path}: `seeds` must be a non-empty list of integers")
    seed_keys = tree.get("seed_keys", ["federation.seed"])
    if isinstance(seed_keys, str):
        seed_keys = [seed_keys]
    if not isinstance(seed_keys, list) or not all(isinstance(k, str) for k in seed_keys):
        raise GridError(f"{path}: `seed_keys` must be a list of dotted config keys")
    groups_tree = tree.get("groups")
    if not isinstance(groups_tree, dict) or not groups_tree:
        raise GridError(f"{path}: `groups` must map group names to {{set, axes}}")
    groups = {}
    for name, g in groups_tree.items():
        where = f"{path}: groups.{name}"
        g = g or {}
        if not isinstance(g, dict):
            raise GridError(f"{where}: expected a mapping with `set` and/or `axes`")
        _check_keys(where, g, _GROUP_KEYS)
        axes_tree = g.get("axes") or {}
        if not isinstance(axes_tree, dict):
            raise GridError(f"{where}.axes: expected a mapping of axis name -> options")
        axes = tuple((str(a), _axis(opts, f"{where}.axes.{a}")) for a, opts in axes_tree.items())
        groups[str(name)] = Group(str(name), _overrides(g.get("set"), f"{where}.set"), axes)
    return GridSpec(
        path=path,
        base=base,
        runs_dir=Path(tree["runs_dir"]) if tree.get("runs_dir") else None,
        seeds=tuple(seeds),
        seed_keys=tuple(seed_keys),
        set=_overrides(tree.get("set"), f"{path}: set"),
        groups=groups,
    )


# -- cells --------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One run of the grid."""

    name: str  # its run directory's name
    overrides: tuple[str, ...]
    groups: list[str]
    seed: int
    status: str = "new"  # new | resume | finished | unavailable | invalid
    error: str | None = None
    config: dict[str, Any] | None = field(default=None, repr=False)


_MISSING = object()


def _get(tree: Any, dotted: str) -> Any:
    node = tree
    for k in dotted.split("."):
        if isinstance(node, list) and k.isdigit() and int(k) < len(node):
            node = node[int(k)]
        elif isinstance(node, dict) and k in node:
            node = node[k]
        else:
            return _MISSING
    return node


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _short(key: str) -> str:
    if key in _ABBREV:
        return _ABBREV[key]
    m = re.fullmatch(r"tiers\.(\d+)\.(\w+)", key)
    if m:
        return f"t{m[1]}{_TIER_ABBREV.get(m[2], m[2])}"
    return key.rsplit(".", 1)[-1]


def _slug_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list | tuple):
        return "+".join(_slug_value(x) for x in v)
    if isinstance(v, dict):
        return "+".join(f"{k}.{_slug_value(x)}" for k, x in sorted(v.items()))
    return str(v)


def cell_name(
    overrides: Sequence[str], base_tree: dict[str, Any], seed_keys: Sequence[str] = ()
) -> str:
    """A deterministic directory name from what the overrides change in the base config.

    Overrides that restate the base's value are dropped (the strategy and seed keys are kept), so
    the same setting spelt two ways gets one name. Readable part + 8 hex digits of a hash of the
    rest.
    """
    canon = {k: _norm(v) for k, v in parse_overrides(list(overrides))}
    canon.setdefault(_STRATEGY, _norm(_get(base_tree, _STRATEGY)))
    keep = {_STRATEGY, *seed_keys}
    canon = {k: v for k, v in canon.items() if k in keep or _get(base_tree, k) != v}
    digest = hashlib.sha1(json.dumps(sorted(canon.items()), default=str).encode()).hexdigest()[:8]
    order = sorted((k for k in canon if k not in keep), key=str) + [
        k for k in seed_keys if k in canon
    ]
    parts = [_slug_value(canon[_STRATEGY])]
    for k in order:
        v = _slug_value(canon[k])
        parts.append(f"{_short(k)}{v}" if re.match(r"[-0-9.]", v) else f"{_short(k)}-{v}")
    slug = re.sub(r"[^A-Za-z0-9.+_-]", "", "_".join(parts))[:100].strip("_.-")
    return f"{slug}-{digest}"


def _base_tree(spec: GridSpec) -> dict[str, Any]:
    try:
        return load_config(spec.base).model_dump(mode="json")
    except ConfigError as e:
        raise GridError(f"{spec.path}: the base config is invalid: {e}") from None


def expand(spec: GridSpec, only: Sequence[str] | None = None) -> list[Cell]:
    """The cells of the selected groups (all by default), in spec order; duplicates merged."""
    if only:
        unknown = [g for g in only if g not in spec.groups]
        if unknown:
            raise GridError(
                f"--only: no group named {', '.join(unknown)}; the groups are "
                f"{', '.join(spec.groups)}"
            )
    base_tree = _base_tree(spec)
    cells: dict[str, Cell] = {}
    for g in spec.groups.values():
        if only and g.name not in only:
            continue
        for combo in itertools.product(*(opts for _, opts in g.axes)):
            for seed in spec.seeds:
                overrides = (
                    *spec.set,
                    *g.set,
                    *(o for opt in combo for o in opt),
                    *(f"{k}={seed}" for k in spec.seed_keys),
                )
                name = cell_name(overrides, base_tree, spec.seed_keys)
                if name in cells:
                    if g.name not in cells[name].groups:
                        cells[name].groups.append(g.name)
                else:
                    cells[name] = Cell(name, overrides, [g.name], seed)
    return list(cells.values())


def _config_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    a, b = flatten(stored), flatten(wanted)
    return sorted(k for k in a.keys() & b.keys() if _norm(a[k]) != _norm(b[k]))


def check_cells(cells: Sequence[Cell], spec: GridSpec, runs_dir: Path) -> list[str]:
    """Validate every cell's config and find its state on disk; returns warnings.

    Raises:
        GridError: some cell's config is invalid for another reason than an unknown strategy
            (nothing has run yet); the message lists each distinct error and its cells.
    """
    warnings = []
    invalid: dict[str, list[str]] = {}
    for cell in cells:
        try:
            cell.config = load_config(spec.base, list(cell.overrides)).model_dump(mode="json")
        except ConfigError as e:
            cell.error = str(e)
            # the same cell with a known strategy: if that is valid, only the strategy is missing
            try:
                load_config(spec.base, [*cell.overrides, f"{_STRATEGY}={_FALLBACK_STRATEGY}"])
                cell.status = "unavailable"
            except ConfigError:
                cell.status = "invalid"
                invalid.setdefault(str(e), []).append(cell.name)
            continue
        run_dir = runs_dir / cell.name
        if run_finished(run_dir):
            cell.status = "finished"
            diff = _config_diff(load_run(run_dir).results["config"], cell.config)
            if diff:
                warnings.append(
                    f"{run_dir}: finished with a config that differs from the grid's in "
                    f"{', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}; "
                    "it is kept (delete it to rerun)"
                )
        elif rundir.config_path(run_dir).exists():
            cell.status = "resume"
        else:
            cell.status = "new"
    if invalid:
        n = sum(len(v) for v in invalid.values())
        lines = [f"{spec.path}: {n} of {len(cells)} cells have an invalid config; nothing was run:"]
        for msg, names in invalid.items():
            lines.append("  " + msg.replace("\n", "\n  "))
            lines.append(
                f"    in {len(names)} cell(s): "
                f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            )
        raise GridError("\n".join(lines))
    return warnings


# -- running ------------------------------------------------------------------------------------


def _error_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [
        ln for ln in lines if ln.startswith("error:") or re.match(r"\w+(Error|Exception)\b", ln)
    ]
    return (errors or lines or ["no output"])[-1][:300]


def train_subprocess(
    base: Path, overrides: list[str], run_dir: Path, resume: bool, *, address: str | None = None
) -> tuple[bool, str]:
    """Run ``python -m fednano_ray train`` for one cell; its output goes to ``run_dir/grid.log``.

    Without ``address`` each cell starts its own local Ray (``RAY_ADDRESS=local``), as ``train``
    does when no other Ray instance runs on the machine; with it, every cell joins that cluster.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"RAY_ADDRESS": "local"} if address is None else {})}
    cmd = [
        sys.executable,
        "-m",
        "fednano_ray",
        "train",
        str(base),
        "--run-dir",
        str(run_dir),
        "--tokens",
        "none",
    ]
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd.append("--resume")
    if address:
        cmd += ["--address", address]
    log = run_dir / rundir.GRID_LOG
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode
    if rc == 0:
        return True, ""
    return False, f"exit status {rc}: {_error_line(log)} (log: {log})"


def _outcome(run_dir: Path) -> str:
    s = load_run(run_dir).summary

    def pct(x: Any, ci: Any = None) -> str:
        if x is None:
            return "n/a"
        return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    # Averages are weighted by each client's test size; [lo, hi]: 95% Wilson interval
    # (fednano_ray/stats.py).
    return (
        f"avg client acc. {pct(s.get('accuracy_before'))} -> "
        f"{pct(s.get('accuracy_after'), s.get('accuracy_after_ci95'))}, "
        f"global test {pct(s.get('global_test_accuracy'), s.get('global_test_accuracy_ci95'))}, "
        f"{s.get('wall_time_s', 0):.0f} s"
    )


def run_grid(
    spec: GridSpec,
    *,
    only: Sequence[str] | None = None,
    runs_dir: str | Path | None = None,
    dry_run: bool = False,
    runner: Runner | None = None,
    report_out: str | Path | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Expand, validate, run the cells not finished yet, then report. Returns 0, or 1 if a cell
    failed.

    Raises:
        GridError: a bad spec or an invalid cell config, before anything runs.
    """
    runner = runner or train_subprocess
    runs_dir = Path(runs_dir or spec.runs_dir or DEFAULT_RUNS_DIR)
    cells = expand(spec, only)
    warnings = check_cells(cells, spec, runs_dir)
    counts = {
        s: sum(c.status == s for c in cells) for s in ("new", "resume", "finished", "unavailable")
    }
    groups = ", ".join(g for g in spec.groups if not only or g in only)
    out(
        f"grid {spec.path} ({groups}): {len(cells)} cells in {runs_dir}: {counts['new']} to run, "
        f"{counts['resume']} to resume, {counts['finished']} finished, {counts['unavailable']} "
        "with an unknown strategy"
    )
    for w in warnings:
        out(f"warning: {w}")
    width = len(str(len(cells)))
    if dry_run:
        for i, c in enumerate(cells, 1):
            note = f"  ({c.error.splitlines()[-1].strip()})" if c.error else ""
            out(
                f"[{i:>{width}}/{len(cells)}] {c.status:<11} {c.name}  "
                f"[{', '.join(c.groups)}]{note}"
            )
        out(
            "dry run: every cell's config is valid"
            + (" (but for unknown strategies)" if counts["unavailable"] else "")
        )
        return 0

    failed: list[tuple[Cell, str]] = []
    t_grid = time.perf_counter()
    for i, c in enumerate(cells, 1):
        tag = f"[{i:>{width}}/{len(cells)}] {c.name}"
        run_dir = runs_dir / c.name
        if c.status == "unavailable":
            assert c.error is not None
            out(
                f"{tag}: FAILED, config error (strategy not available):\n    "
                + c.error.replace("\n", "\n    ")
            )
            failed.append((c, c.error))
            continue
        if c.status == "finished" or run_finished(run_dir):
            out(f"{tag}: finished before, skipped")
            continue
        resume = rundir.config_path(run_dir).exists()
        out(f"{tag}: {'resuming' if resume else 'running'} ...")
        t0 = time.perf_counter()
        try:
            ok, msg = runner(spec.base, list(c.overrides), run_dir, resume)
        except Exception as e:  # noqa: BLE001 - a broken cell must not take the grid down
            ok, msg = False, f"{type(e).__name__}: {e}"
        if ok and not run_finished(run_dir):
            results = rundir.results_path(run_dir)
            ok, msg = False, f"the run ended but {results} holds no finished run"
        if ok:
            out(f"{tag}: done in {time.perf_counter() - t0:.0f} s: {_outcome(run_dir)}")
        else:
            out(f"{tag}: FAILED after {time.perf_counter() - t0:.0f} s: {msg}")
            failed.append((c, msg))

    done = [runs_dir / c.name for c in cells if run_finished(runs_dir / c.name)]
    out(
        f"grid done in {time.perf_counter() - t_grid:.0f} s: {len(done)} of {len(cells)} cells "
        f"finished, {len(failed)} failed"
    )
    for c, msg in failed:
        out(f"  failed: {c.name}: {msg.splitlines()[-1].strip() if msg else ''}")
    if done:
        try:
            path = build_report(
                done, report_out or runs_dir / "report", warn=lambda m: out(f"warning: {m}")
            )
            out(f"report: {path}")
        except ReportError as e:
            out(f"report failed: {e}")
    return 1 if failed else 0
