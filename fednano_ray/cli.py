"""``fednano-ray`` command line (also ``python -m fednano_ray``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from fednano_ray.config import Config, ConfigError, load_config
from fednano_ray.federation import rundir
from fednano_ray.units import format_bytes

TABLE_MAX_CLIENTS = (
    24  # more clients than this: the table lists the first TABLE_HEAD_CLIENTS and a spread
)
TABLE_HEAD_CLIENTS = 10


def _acc_ci(acc: float | None, ci: Any = None, n: float | None = None) -> str:
    """``0.386 [0.33, 0.44]``: an accuracy and its 95% interval (computed from ``n`` when not
    recorded)."""
    if acc is None or math.isnan(acc):
        return "n/a"
    if ci is None and n:
        from fednano_ray.stats import wilson_interval

        ci = wilson_interval(acc * n, n)
    return f"{acc:.3f}" if ci is None else f"{acc:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _gain(g: Any) -> str:
    """``+0.052 [+0.01, +0.09]``: a paired accuracy difference and its 95% interval."""
    if not g:
        return "n/a"
    mean, (lo, hi), _ = g
    return f"{mean:+.3f} [{lo:+.2f}, {hi:+.2f}]"


def summary_table(results: dict[str, Any]) -> str:
    """The end-of-run table: per-client accuracy before/after with test size n and 95% Wilson
    intervals, the test-size-weighted average, global test accuracy, bytes, storage."""
    s = results["summary"]
    before = s.get("accuracy_before_per_client", {})
    after = s.get("accuracy_after_per_client", {})
    ns = s.get("accuracy_n_per_client", {})
    before_ci = s.get("accuracy_before_per_client_ci95", {})
    after_ci = s.get("accuracy_after_per_client_ci95", {})
    clients = sorted(after, key=int)
    total_n = sum(ns.get(c, 0) for c in clients) or None
    nw = max(4, len(str(total_n or "")))
    cw = 18  # "0.386 [0.33, 0.44]"
    personal = s.get("accuracy_personalized_per_client")  # federation.personalize_steps
    personal_ci = s.get("accuracy_personalized_per_client_ci95", {})
    head = (
        f"{'client':>8} | {'n':>{nw}} | {'before':^{cw}} | "
        f"{'after (global)' if personal else 'after':^{cw}}"
    )
    if personal:
        head += f" | {'personalised':^{cw}}"
    head = head.rstrip()
    rule = "-" * len(head)
    lines = [head, rule]
    shown = clients if len(clients) <= TABLE_MAX_CLIENTS else clients[:TABLE_HEAD_CLIENTS]
    for c in shown:
        n = ns.get(c)
        lines.append(
            f"{c:>8} | {n if n is not None else '?':>{nw}} | "
            f"{_acc_ci(before.get(c), before_ci.get(c), n):<{cw}} | "
            f"{_acc_ci(after[c], after_ci.get(c), n):<{cw if personal else 0}}"
            + (f" | {_acc_ci(personal.get(c), personal_ci.get(c), n)}" if personal else "")
        )
    if len(shown) < len(clients):
        import statistics

        vals = [after[c] for c in clients]
        lines.append(
            f"{'...':>8}   {len(clients) - len(shown)} more clients (all in {rundir.RESULTS}); "
            f"after: min {min(vals):.3f}, "
            f"median {statistics.median(vals):.3f}, max {max(vals):.3f}"
        )
    lines.append(rule)
    avg_after = _acc_ci(s["accuracy_after"], s.get("accuracy_after_ci95"), total_n)
    lines.append(
        f"{'average':>8} | {total_n if total_n is not None else '':>{nw}} | "
        f"{_acc_ci(s['accuracy_before'], s.get('accuracy_before_ci95'), total_n):<{cw}} | "
        f"{avg_after:<{cw if personal else 0}}"
        + (
            " | "
            f"{_acc_ci(s['accuracy_personalized'], s.get('accuracy_personalized_ci95'), total_n)}"
            if personal
            else ""
        )
        + ((" weighted by test size" if personal else "  weighted by test size") if total_n else "")
    )
    lines.append(
        "n: held-out questions; [lo, hi]: 95% Wilson interval (the average's: all questions pooled)"
    )
    for name, label in (("after", "after - before"), ("personalized", "personalised - before")):
        held, glob = s.get(f"accuracy_gain_{name}"), s.get(f"global_test_gain_{name}")
        if held or glob:
            lines.append(
                f"{label + ',':<22} paired 95%: held-out {_gain(held)}"
                + (f"; global test {_gain(glob)}" if glob else "")
            )
    lines.append("")
    lines.append(
        f"strategy                   {s['strategy']} ({s['rounds']} rounds, "
        f"{s['failures']} client failures)"
    )
    gn = s.get("global_test_n")
    glob_before = _acc_ci(
        s.get("global_test_accuracy_before"), s.get("global_test_accuracy_before_ci95"), gn
    )
    lines.append(
        "global test accuracy       "
        f"{glob_before}"
        f" -> {_acc_ci(s['global_test_accuracy'], s.get('global_test_accuracy_ci95'), gn)}"
        + (f"  (n={gn})" if gn else "")
    )
    if personal:
        glob_personal = _acc_ci(
            s.get("global_test_accuracy_personalized"),
            s.get("global_test_accuracy_personalized_ci95"),
            gn,
        )
        lines.append(f"  with personal adapters   {glob_personal}  (each client's own, averaged)")
    by_before, by_after = (
        s.get("global_test_by_category_before") or {},
        s.get("global_test_by_category") or {},
    )
    if by_after:  # what the adapters learned, question type by question type
        cat_n = s.get("global_test_n_by_category") or {}
        lines.append("global test by category     before -> after")
        for cat in sorted(by_after):
            n = cat_n.get(cat)
            lines.append(
                f"  {cat:<12} {f'n={n}' if n else '':>6}   "
                f"{_acc_ci(by_before.get(cat), None, n):<{cw}} -> "
                f"{_acc_ci(by_after[cat], None, n)}"
            )
    if s.get("chance_accuracy") is not None:
        lines.append(f"chance (uniform guess)     {s['chance_accuracy']:.3f}")
    lines.append(
        f"adapters sent up / down    {format_bytes(s['bytes_up'])} / "
        f"{format_bytes(s['bytes_down'])} in total"
    )
    # fedavg-lora: every client trains its own full MLLM, so no activations cross the network.
    no_split = (
        " (no split step: each client holds the whole MLLM)"
        if s.get("adapter_kind") == "llm_lora"
        else ""
    )
    lines.append(
        f"split-step activations     {format_bytes(s['step_bytes_up'])} up + "
        f"{format_bytes(s['step_bytes_down'])} down "
        f"per step{no_split}"
    )
    lines.append(
        f"client storage             {format_bytes(s['client_bytes'])} of "
        f"{format_bytes(s['total_bytes'])} "
        f"({100 * s['client_storage_fraction']:.1f}% of the full MLLM)"
    )
    lines.append(f"wall time                  {s['wall_time_s']:.0f} s")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)  # validated before Ray starts
    run_dir = Path(
        args.run_dir or Path("runs") / f"{Path(args.config).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    if args.resume and not rundir.config_path(run_dir).exists():
        raise ConfigError(
            f"--resume: {run_dir} holds no run (no {rundir.CONFIG}); "
            "pass the --run-dir of the run to continue"
        )
    if args.force_config_change and not args.resume:
        raise ConfigError("--force-config-change only applies to --resume")
    if args.resume:  # a config change the run cannot take is refused before Ray starts
        from fednano_ray.app import check_resume_config

        check_resume_config(cfg, run_dir, force=args.force_config_change)
    # Inside `ray job submit` Ray sets RAY_ADDRESS: join that cluster; otherwise start a
    # private one.
    address = args.address or (
        os.environ.get("RAY_ADDRESS") if os.environ.get("RAY_ADDRESS") != "local" else None
    )
    if address is None:
        from fednano_ray.app import check_resources

        check_resources(cfg, {"CPU": float(os.cpu_count() or 1), **_local_resources(cfg)})
    from fednano_ray.app import init_ray, interrupting_signal, shutdown_ray, stop_on_signals, train

    init_ray(address, **({"num_cpus": _local_cpus(cfg)} if address is None else {}))
    # SIGTERM (a scheduler, docker stop, kill) and Ctrl-C: the round in flight is abandoned, the
    # last completed round's checkpoint stands, and the Ray instance started here goes down with
    # the command (a second signal ends it at once). Exit status 128 + the signal's number (143,
    # 130), as a shell reports a command a signal ended: the run is resumable, not finished.
    try:
        with stop_on_signals():
            print(f"run directory: {run_dir}", file=sys.stderr)
            results = train(
                cfg, run_dir, resume=args.resume, force_config_change=args.force_config_change
            )
    except KeyboardInterrupt as e:  # a TrainingInterrupted, or a signal before the run began
        signum = interrupting_signal(e)
        print(_interrupted(args, run_dir, signum, e), file=sys.stderr, flush=True)
        return 128 + signum
    finally:
        shutdown_ray(started=address is None)
    print(summary_table(results))
    print(f"\nresults: {rundir.results_path(run_dir)}")
    _issue_tokens(run_dir, cfg.federation.num_clients, args.tokens)
    return 0


def _interrupted(args: argparse.Namespace, run_dir: Path, signum: int, e: BaseException) -> str:
    """What ``fednano-ray train`` says when a signal stops it: where the run stands, and the
    command that continues it."""
    import shlex
    import signal

    from fednano_ray.app import TrainingInterrupted

    name = signal.Signals(signum).name
    # A TrainingInterrupted names it; a signal before the run began leaves the newest as it was.
    if isinstance(e, TrainingInterrupted):
        settled, checkpoint = True, e.checkpoint
    else:
        settled, checkpoint = False, rundir.latest_checkpoint(run_dir)
    if checkpoint is not None:
        where = f"{checkpoint} (rounds 0-{rundir.checkpoint_round(checkpoint.name)}) stands" + (
            ", results.json matches it; the round in flight was abandoned" if settled else ""
        )
    else:
        where = "no round had completed, there is no checkpoint yet"
    again = ["fednano-ray", "train", args.config, "--run-dir", str(run_dir)]
    if rundir.config_path(run_dir).is_file():
        again.append("--resume")
    for kv in args.set:
        again += ["--set", kv]
    if args.address:
        again += ["--address", args.address]
    if args.tokens != "auto":
        again += ["--tokens", args.tokens]
    return f"\ninterrupted ({name}): {where}\ncontinue with: {shlex.join(again)}"


def _issue_tokens(run_dir: Path, num_clients: int, mode: str) -> None:
    """Create each client's serving token at training time: shown once, only hashes are kept."""
    from fednano_ray.serve.auth import issue_all, load_tokens, tokens_path

    if mode == "none" or (mode == "auto" and num_clients > 64):
        print(
            "no serving tokens issued; create one per client with "
            f"`fednano-ray token {run_dir} CLIENT_ID`"
        )
        return
    if load_tokens(run_dir):
        return  # a resumed run keeps the tokens it already has
    tokens = issue_all(run_dir, num_clients)
    print(f"\nserving tokens (shown once; only their hashes are kept in {tokens_path(run_dir)}):")
    for cid, tok in sorted(tokens.items()):
        print(f"  client {cid}: {tok}")


def _local_resources(cfg: Config) -> dict[str, float]:
    return {"GPU": 0.0}


def _local_cpus(cfg: Config) -> int:
    return int(os.cpu_count() or 1)


def cmd_inspect(args: argparse.Namespace) -> int:
    from fednano_ray.accounting import inspect_config

    cfg = load_config(args.config, args.set)
    out = inspect_config(cfg)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:28} {v}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from fednano_ray.data.synth import generate

    root = generate(
        args.out_dir,
        num_train=args.num_train,
        num_test=args.num_test,
        image_size=args.image_size,
        seed=args.seed,
        difficulty=args.difficulty,
    )
    info = json.loads((Path(root) / "info.json").read_text())
    print(
        json.dumps(
            {
                "root": str(root),
                **{k: info[k] for k in info if k in ("generator", "difficulty", "splits")},
            },
            indent=2,
        )
    )
    return 0


def _benchmarks_dir() -> Path:
    for cand in (Path.cwd() / "benchmarks", Path(__file__).resolve().parents[1] / "benchmarks"):
        if cand.is_dir():
            return cand
    raise ConfigError("no benchmarks/ folder found: run from the fednano-ray checkout")


def cmd_align(args: argparse.Namespace) -> int:
    from fednano_ray.models.nano import align_nano

    cfg = load_config(args.config, args.set)
    try:
        record = align_nano(cfg.model, out=args.out, force=args.force)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(json.dumps(record, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    folder = _benchmarks_dir()
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    if args.name not in names:
        raise ConfigError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}")
    sys.argv = [f"fednano-ray bench {args.name}", *args.args]
    runpy.run_path(str(folder / f"{args.name}.py"), run_name="__main__")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fednano_ray.config import ServeConfig
    from fednano_ray.serve.app import serve_run

    # The run's serve section gives the defaults (a folder without config.yaml fails in
    # serve_run, clearly).
    path = rundir.config_path(args.run_dir)
    section = rundir.read_config(args.run_dir).serve if path.is_file() else ServeConfig()
    serve_run(
        args.run_dir,
        host=args.host or section.host,
        port=args.port or section.port,
        engine=args.engine or section.engine,
        address=args.address,
    )
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from fednano_ray.serve.auth import TokenError, issue_token, tokens_path

    try:
        token = issue_token(args.run_dir, args.client_id, rotate=args.rotate)
    except TokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(token)  # the only time it is shown; only its hash is stored
    print(
        f"token of client {args.client_id}: only its hash is kept in {tokens_path(args.run_dir)}; "
        "store it now, it cannot be shown again",
        file=sys.stderr,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fednano_ray.report import build_report

    path = build_report(args.run_dirs, args.out)
    print(f"report: {path}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from functools import partial

    from fednano_ray.grid import load_grid, run_grid, train_subprocess

    spec = load_grid(args.spec)
    return run_grid(
        spec,
        only=args.only,
        runs_dir=args.runs_dir,
        dry_run=args.dry_run,
        report_out=args.report_out,
        runner=partial(train_subprocess, address=args.address),
    )


class _HelpConfig(argparse.Action):
    """``--help-config``: like ``--help``, it prints and exits before the positional arguments
    are checked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from fednano_ray.config import describe_config

        print(describe_config())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fednano-ray", description="Federated tuning of multimodal LLMs with FedNano on Ray."
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run a federated training job")
    t.add_argument("config", help="YAML config (see examples/quickstart.yaml)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key",
    )
    t.add_argument("--run-dir", help="output directory (default runs/<config>-<time>)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its last checkpoint that checks out (a corrupt "
        "newer one is passed over with a warning); a config that changes what the run computes "
        "is refused",
    )
    t.add_argument(
        "--force-config-change",
        action="store_true",
        help="with --resume: continue although the config changes what the run computes "
        "(strategy, data, model, seed, ranks, ...); the changes are recorded in results.json",
    )
    t.add_argument("--address", help="join an existing Ray cluster (auto or ray://host:port)")
    t.add_argument(
        "--tokens",
        choices=["auto", "all", "none"],
        default="auto",
        help=(
            "issue each client's serving token at the end (auto: when there are at most 64 clients)"
        ),
    )
    t.add_argument(
        "--help-config",
        action=_HelpConfig,
        help="list every config key with its default and meaning, then exit",
    )
    t.set_defaults(func=cmd_train)

    a = sub.add_parser(
        "align",
        help=(
            "align the nano model's connector (LLaVA stages 1 and 2) once and cache it; "
            "the default config's ships"
        ),
    )
    a.add_argument("config", nargs="?", default="examples/quickstart.yaml")
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key",
    )
    a.add_argument(
        "--out",
        help="also write the connector and its checksummed record here (fednano_ray/assets ships)",
    )
    a.add_argument(
        "--force",
        action="store_true",
        help="align again even if a cached or shipped connector matches",
    )
    a.set_defaults(func=cmd_align)

    i = sub.add_parser("inspect", help="parameter/byte accounting of NanoEdge vs. the full MLLM")
    i.add_argument("config")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the offline synthetic VQA benchmark")
    s.add_argument("out_dir")
    s.add_argument("--num-train", type=int, default=2000)
    s.add_argument("--num-test", type=int, default=400)
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--difficulty",
        choices=["easy", "hard"],
        default="easy",
        help=(
            "easy: one object per question; hard: scenes of 2-5 objects that need attribute binding"
        ),
    )
    s.set_defaults(func=cmd_data_synth)
    b = sub.add_parser("bench", help="run a benchmark under benchmarks/ (figures, not tests)")
    b.add_argument("name", help="benchmark name, e.g. scale")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("serve", help="serve a run's personalised models over HTTP (Ray Serve)")
    v.add_argument("run_dir", help="a training run directory (--run-dir of `train`)")
    v.add_argument(
        "--engine",
        choices=["vllm", "hf"],
        help="generation engine of the frozen LLM (default: the run's serve.engine, hf)",
    )
    v.add_argument(
        "--host", help="bind address (default: the run's serve.host, 127.0.0.1: loopback only)"
    )
    v.add_argument("--port", type=int, help="HTTP port (default: the run's serve.port, 8000)")
    v.add_argument("--address", help="join an existing Ray cluster (auto or ray://host:port)")
    v.set_defaults(func=cmd_serve)

    k = sub.add_parser(
        "token", help="issue a client's serving token (printed once; only its hash is kept)"
    )
    k.add_argument("run_dir", help="a training run directory")
    k.add_argument("client_id", type=int, help="client id, 0..num_clients-1")
    k.add_argument("--rotate", action="store_true", help="replace the client's existing token")
    k.set_defaults(func=cmd_token)

    r = sub.add_parser(
        "report", help="Markdown table and plots over runs: mean ± std over seeds per setting"
    )
    r.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help=f"run directories (each with a {rundir.RESULTS})",
    )
    r.add_argument(
        "--out",
        default="report",
        help=f"output folder for {rundir.REPORT} and its PNGs (default ./report)",
    )
    r.set_defaults(func=cmd_report)

    g = sub.add_parser(
        "grid",
        help="run a grid of experiments (e.g. examples/paper/grid.yaml), resumably, then report",
    )
    g.add_argument("spec", help="grid spec YAML: base config, seeds, groups of --set overrides")
    g.add_argument("--only", nargs="+", metavar="GROUP", help="run only these groups of the spec")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="validate every cell's config and list the cells; run nothing",
    )
    g.add_argument(
        "--runs-dir",
        help="folder of the cells' run directories (default: the spec's runs_dir, or runs/paper)",
    )
    g.add_argument("--report-out", help="folder of the final report (default RUNS_DIR/report)")
    g.add_argument(
        "--address", help="join an existing Ray cluster for every cell (auto or ray://host:port)"
    )
    g.set_defaults(func=cmd_grid)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # domain errors from deep inside still get one readable line
        from fednano_ray.data.dataset import DatasetError

        if isinstance(e, DatasetError | FileNotFoundError | ValueError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
