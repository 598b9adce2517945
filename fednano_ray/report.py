"""``fednano-ray report``: one Markdown table and a few plots over many runs.

Runs are grouped by *setting*: every config key except the seeds (``federation.seed``,
``data.synth.seed``) and keys that only place work on machines (CPUs, pools, ports, deadlines).
Each group's metrics are the mean and the sample standard deviation (ddof=1) over its runs, i.e.
over seeds. Columns for strategy, Dirichlet alpha and client count are always shown; any other key
that differs between the runs (adapter rank, tier ranks, modalities, local steps, ...) gets a
column.

Usage::

    fednano-ray report runs/paper/* --out report
    build_report(["runs/a", "runs/b"], "report")   # -> report/report.md (+ PNGs beside it)
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednano_ray.federation import rundir
from fednano_ray.units import format_bytes

__all__ = [
    "ReportError",
    "Run",
    "build_report",
    "load_run",
    "run_finished",
]

#: Config keys that tell seeds apart, not settings.
SEED_KEYS = ("federation.seed", "data.synth.seed")
#: Keys that only place or pace work (resources, serving, deadlines): never a setting.
_PLACEMENT = re.compile(
    r"^(serve\..*|federation\.(deadline_s|mode)|tiers\.\d+\.(num_cpus|num_gpus|resources.*|pool_size)"
    r"|train\.(trainer_num_cpus|trainer_num_gpus|trainer_threads|max_batch_size|batch_wait_ms|eval_batch_size))$"
)
#: Keys folded into the derived columns below (ranks, local steps, modalities) or always shown.
_FOLDED = re.compile(
    r"^(adapter\.(r|modalities)|tiers\.\d+\.(adapter_rank|local_steps)|federation\.(strategy|num_clients)|data\.alpha)$"
)
#: Keys that follow the number of clients in a grid; hidden when num_clients determines them.
_FOLLOW_CLIENTS = re.compile(r"^(federation\.clients_per_round|tiers\.\d+\.clients)$")
#: Row and legend order of the strategies (others follow alphabetically).
STRATEGY_ORDER = ("local", "centralized", "fedavg", "fedprox", "fednano", "feddpa-f", "fedavg-lora")
_NA = "n/a"


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names the path."""


# -- loading ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run directory's results.json, with its config flattened to dotted keys."""

    path: Path
    results: dict[str, Any]
    flat: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        return self.results.get("summary") or {}

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return [r for r in self.results.get("rounds") or [] if isinstance(r, dict)]

    @property
    def strategy(self) -> str:
        return str(self.flat.get("federation.strategy") or self.summary.get("strategy") or "?")

    @property
    def seed(self) -> str:
        return "/".join(str(self.flat[k]) for k in SEED_KEYS if k in self.flat)

    @property
    def finished(self) -> bool:
        return _finished_summary(self.summary)


def _finished_summary(summary: Any) -> bool:
    return isinstance(summary, dict) and rundir.RunSummary.model_validate(summary).finished


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "t": [{"x": 2}]}`` -> ``{"a.b": 1, "t.0.x": 2}``; lists of scalars stay
    lists."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = tuple(tree) if isinstance(tree, list) else tree
    return out


def load_run(run_dir: str | Path) -> Run:
    """Read ``run_dir/results.json``.

    Raises:
        ReportError: naming the path, when the folder or file is missing or is not a results file.
    """
    run_dir = Path(run_dir)
    path = rundir.results_path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise ReportError(
            f"{path}: not found; pass run directories written by `fednano-ray train --run-dir DIR`"
        )
    try:
        results = json.loads(path.read_text())
        rundir.parse_results(results, path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    except ValueError as e:
        raise ReportError(str(e)) from None
    return Run(path=run_dir, results=results, flat=flatten(results["config"]))


def run_finished(run_dir: str | Path) -> bool:
    """True if ``run_dir/results.json`` holds a finished run (False when missing, unreadable or
    partial)."""
    try:
        return load_run(run_dir).finished
    except ReportError:
        return False


# -- statistics ---------------------------------------------------------------------------------


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (ddof=1; None for fewer than 2 values) and count of the non-missing
    values."""
    xs = [
        float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))
    ]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def fmt_pct(values: Sequence[float | None], n: int) -> str:
    """Accuracies (fractions) as ``"31.5 ± 2.0"`` percent; ``n/a`` when none; ``(n=k)`` when some
    missing."""
    m, s, k = mean_std(values)
    if m is None:
        return _NA
    text = f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s is not None else "")
    return text + (f" (n={k})" if k != n else "")


def fmt_bytes(n: float | None) -> str:
    return _NA if n is None else format_bytes(n)


def _mean(values: Iterable[float | None]) -> float | None:
    return mean_std(values)[0]


# -- per-run metrics ----------------------------------------------------------------------------


def round_bytes(run: Run) -> float | None:
    """Adapter bytes communicated per round, up + down, averaged over the run's rounds."""
    rs = [r for r in run.rounds if "bytes_up" in r or "bytes_down" in r]
    if rs:
        return statistics.fmean((r.get("bytes_up") or 0) + (r.get("bytes_down") or 0) for r in rs)
    s = run.summary
    if s.get("rounds") and ("bytes_up" in s or "bytes_down" in s):
        return ((s.get("bytes_up") or 0) + (s.get("bytes_down") or 0)) / s["rounds"]
    return None


def _acct(run: Run, key: str) -> Any:
    v = run.summary.get(key)
    return v if v is not None else (run.results.get("accounting") or {}).get(key)


def step_bytes(run: Run) -> float | None:
    up, down = _acct(run, "step_bytes_up"), _acct(run, "step_bytes_down")
    return None if up is None and down is None else (up or 0) + (down or 0)


def accuracy_curve(run: Run) -> list[tuple[int, float]]:
    """(rounds completed, average client accuracy): 0 = before training, then every evaluation
    round."""
    pts: list[tuple[int, float]] = []
    if run.summary.get("accuracy_before") is not None:
        pts.append((0, float(run.summary["accuracy_before"])))
    for r in run.rounds:
        if r.get("avg_accuracy") is not None and "round" in r:
            pts.append((int(r["round"]) + 1, float(r["avg_accuracy"])))
    # No evaluation round recorded: the final summary's accuracy after the last round.
    if len(pts) <= 1 and run.summary.get("accuracy_after") is not None:
        pts.append(
            (
                int(run.summary.get("rounds") or len(run.rounds)),
                float(run.summary["accuracy_after"]),
            )
        )
    return pts


def bytes_curve(run: Run) -> list[tuple[float, float]]:
    """(cumulative adapter bytes up + down, average client accuracy) at each evaluation round."""
    pts: list[tuple[float, float]] = []
    total = 0.0
    for r in run.rounds:
        total += (r.get("bytes_up") or 0) + (r.get("bytes_down") or 0)
        if r.get("avg_accuracy") is not None:
            pts.append((total, float(r["avg_accuracy"])))
    if not pts and run.summary.get("accuracy_after") is not None:
        s = run.summary
        pts.append(
            (
                (s.get("bytes_up") or 0) + (s.get("bytes_down") or 0) or total,
                float(s["accuracy_after"]),
            )
        )
    return pts


# -- settings -----------------------------------------------------------------------------------


def _compact(values: Sequence[Any]) -> str:
    """Per-tier values as ``4/8``; a single value when every tier has the same."""
    vals = [str(v) for v in values]
    return vals[0] if len(set(vals)) == 1 else "/".join(vals)


def _tiers(flat: dict[str, Any]) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in flat if k.startswith("tiers.")})


def derived(run: Run) -> dict[str, Any]:
    """The named columns: strategy, alpha, clients, ranks, local steps, modalities."""
    f = run.flat
    tiers = _tiers(f)
    r = f.get("adapter.r")
    mods = f.get("adapter.modalities")
    return {
        "strategy": run.strategy,
        "alpha": f.get("data.alpha"),
        "clients": f.get("federation.num_clients"),
        "ranks": _compact([f.get(f"tiers.{i}.adapter_rank") or r for i in tiers]) if tiers else r,
        "local steps": _compact([f.get(f"tiers.{i}.local_steps") for i in tiers])
        if tiers
        else None,
        "modalities": "+".join(mods) if isinstance(mods, tuple | list) else mods,
    }


_HEADERS = {"strategy": "strategy", "alpha": "Dirichlet α", "clients": "clients"}
_PRIMARY = ("strategy", "alpha", "clients")


@dataclass
class Group:
    setting: dict[str, Any]  # every displayed column -> value
    runs: list[Run]


def _sort_value(v: Any) -> tuple[int, Any]:
    if isinstance(v, bool) or v is None:
        return (2, str(v))
    if isinstance(v, int | float):
        return (0, v)
    return (1, str(v))


def _strategy_rank(name: str) -> tuple[int, str]:
    return (STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else len(STRATEGY_ORDER), name)


def group_runs(runs: Sequence[Run]) -> tuple[list[Group], list[str]]:
    """Group runs that differ only in their seeds. Returns the groups (sorted) and the displayed
    columns."""
    common = set.intersection(*(set(r.flat) for r in runs)) if runs else set()
    keys = sorted(k for k in common if k not in SEED_KEYS and not _PLACEMENT.match(k))
    diff_keys = [
        k
        for k in keys
        if len({json.dumps(r.flat[k], sort_keys=True, default=str) for r in runs}) > 1
    ]
    ders = {id(r): derived(r) for r in runs}
    derived_cols = [
        c
        for c in ("ranks", "local steps", "modalities")
        if len({str(ders[id(r)][c]) for r in runs}) > 1
    ]
    generic = [k for k in diff_keys if not _FOLDED.match(k)]
    # Keys set with num_clients (clients per round, tier sizes) get a column only when they vary
    # alone.
    shown_generic = []
    for k in generic:
        if _FOLLOW_CLIENTS.match(k):
            by_n: dict[Any, set[str]] = {}
            for r in runs:
                by_n.setdefault(r.flat.get("federation.num_clients"), set()).add(
                    json.dumps(r.flat[k], default=str)
                )
            if all(len(v) == 1 for v in by_n.values()):
                continue
        shown_generic.append(k)
    columns = [*_PRIMARY, *derived_cols, *shown_generic]

    groups: dict[str, Group] = {}
    for r in runs:
        ident = json.dumps([r.flat[k] for k in keys], default=str) + r.strategy
        if ident not in groups:
            d = ders[id(r)]
            setting = {c: d[c] if c in d else r.flat[c] for c in columns}
            groups[ident] = Group(setting, [])
        groups[ident].runs.append(r)
    rest = [c for c in columns if c not in _PRIMARY]

    def order(g: Group) -> tuple:
        s = g.setting
        return (
            _sort_value(s["alpha"]),
            _sort_value(s["clients"]),
            tuple(_sort_value(s[c]) for c in rest),
            _strategy_rank(str(s["strategy"])),
        )

    return sorted(groups.values(), key=order), columns


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, tuple | list):
        v = "+".join(map(str, v))
    return str(v).replace("|", "\\|")


def _header(col: str) -> str:
    return _HEADERS.get(col, col)


def _setting_title(setting: dict[str, Any], columns: Sequence[str]) -> str:
    parts = []
    if setting.get("alpha") is not None:
        parts.append(f"Dirichlet α={setting['alpha']}")
    if setting.get("clients") is not None:
        parts.append(f"{setting['clients']} clients")
    for c in columns:
        if c not in _PRIMARY:  # shorter names in plot titles: data.synth.num_test -> synth.num_test
            name = c if c.startswith("tiers.") else ".".join(_header(c).split(".")[-2:])
            parts.append(f"{name}={_cell(setting[c])}")
    return ", ".join(parts)


# -- table --------------------------------------------------------------------------------------


def results_table(groups: Sequence[Group], columns: Sequence[str]) -> str:
    head = [_header(c) for c in columns] + [
        "n",
        "avg client acc. after (%)",
        "global test acc. (%)",
        "client storage (% of full MLLM)",
        "adapter bytes / round (up+down)",
        "activations / split step (up+down)",
        "wall time (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g in groups:
        rs, n = g.runs, len(g.runs)
        storage = _mean(_acct(r, "client_bytes") for r in rs)
        frac = _mean(_acct(r, "client_storage_fraction") for r in rs)
        storage_txt = (
            _NA
            if storage is None
            else fmt_bytes(storage) + (f" ({100 * frac:.1f}%)" if frac is not None else "")
        )
        wall = _mean(r.summary.get("wall_time_s") for r in rs)
        row = [_cell(g.setting[c]) for c in columns] + [
            str(n),
            fmt_pct([r.summary.get("accuracy_after") for r in rs], n),
            fmt_pct([r.summary.get("global_test_accuracy") for r in rs], n),
            storage_txt,
            fmt_bytes(_mean(round_bytes(r) for r in rs)),
            fmt_bytes(_mean(step_bytes(r) for r in rs)),
            _NA if wall is None else f"{wall:.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------------

_PER_FIGURE = 6


def _panels(groups: Sequence[Group], columns: Sequence[str]) -> list[tuple[str, list[Group]]]:
    """Groups that differ only in strategy share a panel (one line per strategy)."""
    panels: dict[str, list[Group]] = {}
    for g in groups:
        panels.setdefault(_setting_title(g.setting, columns), []).append(g)
    return list(panels.items())


def _colour(strategy: str, all_strategies: Sequence[str]):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return cmap(sorted(all_strategies, key=_strategy_rank).index(strategy) % 10)


def _mean_curve(curves: Sequence[Sequence[tuple[float, float]]], by_index: bool):
    """Average curves point-wise: by x value (rounds) or by position (cumulative bytes differ
    slightly)."""
    import numpy as np

    buckets: dict[Any, list[tuple[float, float]]] = {}
    for c in curves:
        for i, (x, y) in enumerate(c):
            buckets.setdefault(i if by_index else x, []).append((x, y))
    keys = sorted(buckets)
    xs = np.array([statistics.fmean(p[0] for p in buckets[k]) for k in keys])
    ys = np.array([statistics.fmean(p[1] for p in buckets[k]) for k in keys])
    sd = np.array(
        [statistics.stdev([p[1] for p in buckets[k]]) if len(buckets[k]) > 1 else 0.0 for k in keys]
    )
    return xs, ys, sd


def _plot(groups, columns, out: Path, stem: str, kind: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(groups, columns)
    strategies = sorted({str(g.setting["strategy"]) for g in groups}, key=_strategy_rank)
    written = []
    pages = [panels[i : i + _PER_FIGURE] for i in range(0, len(panels), _PER_FIGURE)]
    for page_no, page in enumerate(pages, 1):
        ncols = min(3, len(page))
        nrows = math.ceil(len(page) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
        for ax in axes.flat[len(page) :]:
            ax.set_visible(False)
        for ax, (title, gs) in zip(axes.flat, page, strict=False):
            log_x = False
            chance = _mean(r.summary.get("chance_accuracy") for g in gs for r in g.runs)
            for g in gs:
                strat = str(g.setting["strategy"])
                colour = _colour(strat, strategies)
                label = f"{strat} (n={len(g.runs)})"
                if kind == "round":
                    curves = [accuracy_curve(r) for r in g.runs]
                    curves = [c for c in curves if c]
                    if not curves:
                        continue
                    xs, ys, sd = _mean_curve(curves, by_index=False)
                    ax.plot(xs, 100 * ys, marker="o", color=colour, label=label)
                    ax.fill_between(
                        xs, 100 * (ys - sd), 100 * (ys + sd), color=colour, alpha=0.15, linewidth=0
                    )
                else:
                    curves = [bytes_curve(r) for r in g.runs]
                    curves = [c for c in curves if c]
                    if not curves:
                        continue
                    xs, ys, sd = _mean_curve(curves, by_index=True)
                    keep = xs > 0
                    if keep.any():
                        log_x = True
                        ax.plot(xs[keep], 100 * ys[keep], marker="o", color=colour, label=label)
                        ax.fill_between(
                            xs[keep],
                            100 * (ys[keep] - sd[keep]),
                            100 * (ys[keep] + sd[keep]),
                            color=colour,
                            alpha=0.15,
                            linewidth=0,
                        )
                    else:  # nothing communicated (e.g. local): its final accuracy as a level
                        ax.axhline(
                            100 * ys[-1], color=colour, linestyle="--", label=f"{label}, 0 B sent"
                        )
            if chance is not None:
                ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1, label="chance")
            ax.set_title(textwrap.fill(title, 55), fontsize=9)
            ax.set_ylabel("avg client accuracy (%)")
            ax.grid(True, alpha=0.3)
            if kind == "round":
                ax.set_xlabel("communication rounds completed (0 = before training)")
                ax.xaxis.get_major_locator().set_params(integer=True)
            else:
                ax.set_xlabel("cumulative adapter bytes sent, up + down (B, log scale)")
                if log_x:
                    ax.set_xscale("log")
            if ax.lines:
                ax.legend(fontsize=8, loc="best")
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no evaluations recorded",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
        what = (
            "Average client accuracy vs communication round"
            if kind == "round"
            else "Average client accuracy vs adapter bytes communicated"
        )
        page_txt = f" (page {page_no}/{len(pages)})" if len(pages) > 1 else ""
        fig.suptitle(f"{what}: mean ± std over seeds{page_txt}", fontsize=12)
        fig.tight_layout()
        path = out / (f"{stem}.png" if len(pages) == 1 else f"{stem}_{page_no}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# -- the report ---------------------------------------------------------------------------------

_NOTES = """\
- **avg client acc. after**: accuracy on each client's own held-out split, averaged over clients \
weighted by their test sizes (all held-out questions pooled), after the last round.
- **global test acc.**: accuracy on the shared test set after the last round (for personalised \
strategies, the mean over the clients' models); n/a when not recorded.
- **[lo, hi]** in the runs list: the 95% Wilson interval of a run's accuracy on its questions \
(pooled over clients: it ignores the variance between clients); the ± above is the spread over \
seeds.
- **client storage**: bytes a client holds (encoder, connector, embeddings, adapters) and their \
share of the whole MLLM.
- **adapter bytes / round**: adapters (and Fisher, for fednano) sent up plus down in one round, \
over all sampled clients, averaged over rounds.
- **activations / split step**: hidden states and gradients crossing the client/server split in \
one training step.""".splitlines()


def _label(g: Group, columns: Sequence[str]) -> str:
    rest = _setting_title(g.setting, columns)
    return f"{g.setting.get('strategy')}" + (f" ({rest})" if rest else "")


def _held_out(run: Run, which: str) -> dict[str, str]:
    """Per-client "1"/"0" answers on the held-out questions: before (pretrained) or after (last
    evaluation)."""
    if which == "before":
        return dict(run.summary.get("correct_before") or {})
    evals = [r for r in run.rounds if r.get("correct")]
    return dict(evals[-1]["correct"]) if evals else {}


def _pooled_pairs(
    pairs: Iterable[tuple[dict[str, str], dict[str, str]]],
) -> tuple[list[str], list[str]]:
    """The answer strings of the clients both sides scored on the same questions, pooled over
    runs."""
    a_all, b_all = [], []
    for a, b in pairs:
        for c in sorted(set(a) & set(b)):
            if a[c] and len(a[c]) == len(b[c]):
                a_all.append(a[c])
                b_all.append(b[c])
    return a_all, b_all


def _fmt_gain(g: tuple[float, list[float], int] | None) -> str:
    if g is None:
        return _NA
    mean, (lo, hi), n = g
    return f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (n={n})"


#: Settings compared pairwise in the paired section at most (k settings give k(k-1)/2 rows).
PAIRED_MAX_SETTINGS = 8


def paired_section(groups: Sequence[Group], columns: Sequence[str]) -> list[str]:
    """Markdown: paired accuracy differences question by question, pooled over seeds (95%
    intervals).

    Each setting against the pretrained model (held-out and global test), then every two settings
    against each other on the runs they share a seed with (same seed: same partition and held-out
    questions). Runs from before per-question answers were recorded are left out.
    """
    from fednano_ray.stats import paired_difference

    md = [
        "## Paired differences",
        "",
        (
            "Accuracy differences in points, question by question on the same questions, pooled "
            "over the seeds (and clients) of each setting, with the 95% interval of the mean "
            "paired difference (`fednano_ray.stats.paired_difference`). Pairing removes what the "
            "two sides share, so these intervals are much narrower than the two accuracies' own "
            "intervals suggest."
        ),
        "",
        "| setting | seeds | held-out: after − before | global test: after − before |",
        "|---|---|---|---|",
    ]
    for g in groups:
        held = paired_difference(
            *_pooled_pairs((_held_out(r, "before"), _held_out(r, "after")) for r in g.runs)
        )
        gb, ga = [], []
        for r in g.runs:
            before = r.summary.get("global_test_correct_before") or ""
            evals = [x for x in r.rounds if x.get("global_test_correct")]
            for a in evals[-1]["global_test_correct"] if evals else []:
                if before and len(a) == len(before):
                    gb.append(before)
                    ga.append(a)
        glob = paired_difference(gb, ga)
        md.append(
            f"| {_label(g, columns)} | {len(g.runs)} | {_fmt_gain(held)} | {_fmt_gain(glob)} |"
        )
    if 1 < len(groups) <= PAIRED_MAX_SETTINGS:
        md += [
            "",
            "| setting A | setting B | seeds | held-out: A − B after the last round |",
            "|---|---|---|---|",
        ]
        for i, ga_ in enumerate(groups):
            for gb_ in groups[i + 1 :]:
                by_seed = {r.seed: r for r in gb_.runs}
                shared = [(r, by_seed[r.seed]) for r in ga_.runs if r.seed in by_seed]
                if not shared:
                    continue
                b_side, a_side = _pooled_pairs(
                    (_held_out(rb, "after"), _held_out(ra, "after")) for ra, rb in shared
                )
                md.append(
                    f"| {_label(ga_, columns)} | {_label(gb_, columns)} | {len(shared)} | "
                    f"{_fmt_gain(paired_difference(b_side, a_side))} |"
                )
    return md


def _ci_pct(ci: Sequence[float] | None) -> str:
    """`` [33.1, 44.2]``: a recorded 95% interval in percent, or nothing (runs from before
    intervals)."""
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""


def build_report(run_dirs: Sequence[str | Path], out: str | Path = "report", *, warn=None) -> Path:
    """Write ``out/report.md`` and its PNG plots for the finished runs among ``run_dirs``.

    Raises:
        ReportError: a run directory without a readable results.json, or no finished run at all.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if not run_dirs:
        raise ReportError("no run directories given")
    seen: dict[Path, Run] = {}
    for d in run_dirs:
        if (Path(d) / rundir.REPORT).is_file() and not rundir.results_path(d).exists():
            # A report's own folder: `fednano-ray grid` writes RUNS_DIR/report, which RUNS_DIR/*/
            # matches.
            warn(f"{d}: a report folder, not a run directory; skipped")
            continue
        run = load_run(d)
        seen.setdefault(Path(d).resolve(), run)
    runs = list(seen.values())
    unfinished = [r for r in runs if not r.finished]
    for r in unfinished:
        warn(f"{r.path}: the run has not finished (no final summary); left out of the report")
    runs = [r for r in runs if r.finished]
    if not runs:
        raise ReportError(
            "none of the runs has finished: " + ", ".join(str(r.path) for r in unfinished)
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups, columns = group_runs(runs)
    round_pngs = _plot(groups, columns, out, "accuracy_vs_round", "round")
    bytes_pngs = _plot(groups, columns, out, "accuracy_vs_bytes", "bytes")

    md = [
        "# FedNano-Ray report",
        "",
        (
            f"{len(runs)} finished runs in {len(groups)} settings. Each row is one setting; its "
            "numbers are the mean ± sample standard deviation (ddof=1) over its n runs (seeds: "
            "`federation.seed`, `data.synth.seed`); a single run shows its value alone, and "
            "`(n=k)` marks a metric only k of the n runs recorded."
        ),
        "",
        "## Results",
        "",
        results_table(groups, columns),
        "",
        *_NOTES,
        "",
        *paired_section(groups, columns),
        "",
        "## Plots",
        "",
    ]
    for title, pngs in (
        ("Accuracy vs round", round_pngs),
        ("Accuracy vs bytes communicated", bytes_pngs),
    ):
        md.append(f"### {title}")
        md.append("")
        for p in pngs:
            md.append(f"![{title}]({p.name})")
            md.append("")
    md += [
        "## Runs",
        "",
        (
            "| run | strategy | seed | rounds | avg client acc. before → after (%) [95% interval]"
            " | global test acc. (%) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for g in groups:
        for r in sorted(g.runs, key=lambda r: r.seed):
            s = r.summary
            md.append(
                f"| `{r.path}` | {r.strategy} | {r.seed or '—'} | "
                f"{s.get('rounds', len(r.rounds))} | "
                f"{fmt_pct([s.get('accuracy_before')], 1)} → "
                f"{fmt_pct([s.get('accuracy_after')], 1)}"
                f"{_ci_pct(s.get('accuracy_after_ci95'))} | "
                f"{fmt_pct([s.get('global_test_accuracy')], 1)}"
                f"{_ci_pct(s.get('global_test_accuracy_ci95'))} |"
            )
    if unfinished:
        md += ["", "Left out (not finished): " + ", ".join(f"`{r.path}`" for r in unfinished)]
    path = out / rundir.REPORT
    path.write_text("\n".join(md) + "\n")
    return path
