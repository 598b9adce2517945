"""Assemble the Serve application (the only place ``serve.deployment`` is applied) and run it.

::

    HTTP ─► Ingress (FastAPI; auth, pydantic, per-client NanoEdge, multiplexed)
         ─► LLMServer (vLLM | HF)

Three ways in:

* ``fednano-ray serve RUN_DIR`` → :func:`serve_run` (starts Ray and Serve, prints the URLs, blocks);
* ``serve run serve/fednano.yaml`` / ``serve deploy serve/fednano.yaml`` → :func:`app_builder`,
  the application builder Ray Serve calls with the config's ``args`` (``run_dir``, ``engine``);
  a new checkpoint reaches running replicas by changing the Ingress ``user_config`` there;
* Python: :func:`deploy` (declarative, so a later call with a new ``user_config`` updates the
  running replicas in place) or :func:`build_app` for ``serve.run``. ``serve.run`` of a rebuilt
  app always replaces the replicas (its code version is random), so use :func:`deploy` to push
  new checkpoints.
"""

# No ``from __future__ import annotations`` here: Serve inspects app_builder's parameter annotation
# (a pydantic model) at runtime to validate the ``args`` of ``serve run`` / the config file.

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fednano_ray.federation import rundir

APP_NAME = "fednano"
LLM_DIR = rundir.SERVE_LLM  # in the run directory: the exported server LLM (HF causal-LM folder)
#: Serve's HTTP request deadline of `fednano-ray serve` (http_options.request_timeout_s), seconds.
REQUEST_TIMEOUT_S = 120.0


class ServeArgs(BaseModel):
    """Arguments of the application builder
    (``serve run fednano_ray.serve.app:app_builder run_dir=...``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_dir: str = Field(
        description="A training run directory (config.yaml, checkpoints/, tokens.json)."
    )
    engine: Literal["hf", "vllm"] = Field("hf", description="Generation engine of the frozen LLM.")
    dtype: str = Field(
        "auto",
        description="LLM weights dtype in the engine: auto (the run's model.precision, resolved on "
        "the LLM server's node: bfloat16 only where the hardware runs it natively, else float32), "
        "float32, bfloat16, float16.",
    )
    checkpoint: str | None = Field(
        None, description="Serve this checkpoint (round_XXXX); default the newest."
    )
    ingress_replicas: int = Field(1, ge=1, description="Ingress replicas (NanoEdges run here).")
    ingress_num_cpus: float = Field(0.5, ge=0, description="Ray CPUs per ingress replica.")
    llm_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs of the LLM server replica.")
    llm_num_gpus: float | None = Field(
        None,
        ge=0,
        description="Ray GPUs of the LLM server replica "
        "(default: 1 for vllm on a GPU cluster, else 0).",
    )
    max_batch_size: int = Field(16, ge=1, description="LLM server: most requests decoded together.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="LLM server: how long to wait to fill a batch."
    )
    # Bounds against overload and slow clients (README "Limits").
    ingress_max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one ingress replica works on at once."
    )
    ingress_max_queued_requests: int = Field(
        128,
        ge=1,
        description="Requests waiting for an ingress replica; beyond it Serve answers 503.",
    )
    llm_max_queued_requests: int = Field(
        256,
        ge=1,
        description="Requests waiting for the LLM server (beyond its max_ongoing_requests); "
        "beyond it the ingress answers 503.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a request body may take to arrive in full; then 408."
    )
    generate_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds the LLM server may take to answer one request; then 503.",
    )


def export_server_llm(run_dir: str | Path) -> Path:
    """The run's frozen LLM as a HF causal-LM folder (written once into ``run_dir/serve/llm``)."""
    from fednano_ray.models.build import build_mllm
    from fednano_ray.serve.export import export_llm

    cfg = rundir.read_config(run_dir)
    return export_llm(build_mllm(cfg.model), Path(run_dir) / LLM_DIR)


def _check_run_dir(run_dir: str | Path) -> Path:
    from fednano_ray.config import ConfigError

    run_dir = Path(run_dir).expanduser().resolve()
    if not rundir.config_path(run_dir).is_file():
        raise ConfigError(
            f"{run_dir} is not a training run directory (no {rundir.CONFIG}): pass the --run-dir "
            "of `fednano-ray train`"
        )
    if rundir.read_config(run_dir).clients_hold_llm():
        # Serving runs NanoEdges in front of one frozen, shared LLM; this run's LoRA lives inside
        # it.
        raise ConfigError(
            f"{run_dir} is a federation.strategy fedavg-lora run: its LoRA is inside the LLM, "
            "which the serving engines keep frozen and shared, so it cannot be served; "
            "serve a NanoAdapter run"
        )
    return run_dir


def _llm_gpus(args: ServeArgs) -> float:
    """An explicit ``llm_num_gpus``, else one GPU for vLLM when the cluster has one (Ray hides
    GPUs from actors that did not ask for them, so vLLM would not find it)."""
    if args.llm_num_gpus is not None:
        return args.llm_num_gpus
    import ray

    if (
        args.engine == "vllm"
        and ray.is_initialized()
        and ray.cluster_resources().get("GPU", 0) >= 1
    ):
        return 1.0
    return 0.0


def build_app(
    run_dir: str | Path,
    *,
    engine: Literal["hf", "vllm"] = "hf",
    user_config: dict[str, Any] | None = None,
    llm_server_cls: type | None = None,
    **options: Any,
):
    """The Serve application of a run: ``Ingress`` bound to a handle of ``LLMServer``.

    Args:
        run_dir: the training run directory.
        engine: ``hf`` or ``vllm``.
        user_config: the Ingress ``user_config`` (``{"checkpoint": "round_0003"}`` /
            ``{"reload": n}``).
        llm_server_cls: the LLM server class (default
            :class:`fednano_ray.serve.llm_server.LLMServer`).
        **options: any other :class:`ServeArgs` field (dtype, replicas, CPUs, batching).

    Returns:
        A ``serve.Application`` for ``serve.run``.
    """
    from ray import serve

    from fednano_ray.serve.ingress import Ingress, app

    args = ServeArgs(run_dir=str(run_dir), engine=engine, **options)
    run_dir = _check_run_dir(args.run_dir)
    if llm_server_cls is None:
        from fednano_ray.serve.llm_server import LLMServer as llm_server_cls
    model_dir = export_server_llm(run_dir)
    dtype = args.dtype
    if (
        dtype == "auto"
    ):  # the run's own setting; "auto" resolves in the LLM server replica, on its hardware
        dtype = rundir.read_config(run_dir).model.precision
    llm = serve.deployment(
        llm_server_cls,
        name="LLMServer",
        ray_actor_options={"num_cpus": args.llm_num_cpus, "num_gpus": _llm_gpus(args)},
        # Enough requests in flight for the server's own batching to fill a batch.
        max_ongoing_requests=max(8, 4 * args.max_batch_size),
        max_queued_requests=args.llm_max_queued_requests,
    ).bind(
        str(model_dir),
        engine=args.engine,
        dtype=dtype,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
    )
    uc = dict(user_config or {})
    if args.checkpoint is not None:
        uc.setdefault("checkpoint", args.checkpoint)
    ingress = serve.deployment(
        serve.ingress(app)(Ingress),
        name="Ingress",
        num_replicas=args.ingress_replicas,
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
        max_ongoing_requests=args.ingress_max_ongoing_requests,
        max_queued_requests=args.ingress_max_queued_requests,
        user_config=uc,
    )
    return ingress.bind(
        str(run_dir),
        llm,
        body_timeout_s=args.body_timeout_s,
        generate_timeout_s=args.generate_timeout_s,
    )


def app_builder(args: ServeArgs):
    """Application builder for ``serve run`` / ``serve deploy``
    (``import_path: fednano_ray.serve.app:app_builder``).

    Example:
        ``serve run fednano_ray.serve.app:app_builder run_dir=runs/tiny engine=hf``
    """
    if isinstance(args, dict):  # called directly rather than by Serve
        args = ServeArgs.model_validate(args)
    return build_app(**args.model_dump())


def deploy_config(
    run_dir: str | Path,
    *,
    engine: Literal["hf", "vllm"] = "hf",
    user_config: dict[str, Any] | None = None,
    name: str = APP_NAME,
    route_prefix: str = "/",
    **options: Any,
) -> dict[str, Any]:
    """The declarative Serve config of a run (what ``serve/fednano.yaml`` holds), as a dict.

    Deploying it twice with only ``user_config`` changed is a lightweight update: Serve calls
    ``Ingress.reconfigure`` on the running replica (no restart, the LLM stays loaded), because the
    application's code version hashes the import path, args and runtime env, not the user_config.
    """
    from pydantic import ValidationError

    from fednano_ray.config import ConfigError
    from fednano_ray.serve.ingress import UserConfig

    args = ServeArgs(run_dir=str(_check_run_dir(run_dir)), engine=engine, **options)
    uc = dict(user_config or {})
    if args.checkpoint is not None:  # the deployments' user_config below overrides build_app's
        uc.setdefault("checkpoint", args.checkpoint)
    # Check here, not in the replica: a user_config the replica rejects takes the app down (503s).
    try:
        pinned = UserConfig.model_validate(uc).checkpoint
        folder = rundir.resolve_checkpoint(args.run_dir, pinned)
        if pinned is not None and folder is not None:  # a corrupt pin: refuse to deploy it
            rundir.verify_checkpoint(folder, serving=True)
    except (ValidationError, ValueError) as e:  # CorruptCheckpoint is a ValueError
        raise ConfigError(f"Ingress user_config {uc}: {e}") from e
    return {
        "applications": [
            {
                "name": name,
                "route_prefix": route_prefix,
                "import_path": "fednano_ray.serve.app:app_builder",
                "args": args.model_dump(exclude_defaults=True) | {"run_dir": args.run_dir},
                "deployments": [{"name": "Ingress", "user_config": uc}],
            }
        ]
    }


def deploy(
    run_dir: str | Path,
    *,
    engine: Literal["hf", "vllm"] = "hf",
    user_config: dict[str, Any] | None = None,
    name: str = APP_NAME,
    route_prefix: str = "/",
    timeout_s: float = 900.0,
    **options: Any,
) -> float:
    """Deploy (or update in place) the run's app declaratively on the running Serve instance.

    Call it again with the same arguments and a new ``user_config`` to switch checkpoints in the
    running replicas (``{"checkpoint": "round_0003"}``, ``{"reload": n}``). Serve must be started
    (``serve.start``); returns the seconds until the application was RUNNING.

    Raises:
        RuntimeError: if the deployment fails (the message carries Serve's reason).
        TimeoutError: if it is not running after ``timeout_s``.
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    config = ServeDeploySchema.model_validate(
        deploy_config(
            run_dir,
            engine=engine,
            user_config=user_config,
            name=name,
            route_prefix=route_prefix,
            **options,
        )
    )
    t0 = time.perf_counter()
    # The declarative path of `serve run CONFIG` / `serve deploy`: Serve has no public Python API
    # for it.
    _get_global_client().deploy_apps(config)
    while time.perf_counter() - t0 < timeout_s:
        app = serve.status().applications.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return time.perf_counter() - t0
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            why = "; ".join(f"{d}: {s.message}" for d, s in app.deployments.items() if s.message)
            raise RuntimeError(f"deploying {name!r} failed: {app.message} {why}".strip())
        time.sleep(0.2)
    raise TimeoutError(f"application {name!r} is not running after {timeout_s:.0f} s")


def serve_run(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    engine: Literal["hf", "vllm"] = "hf",
    *,
    address: str | None = None,
    block: bool = True,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    **options: Any,
) -> str:
    """Start Ray (or join ``address``) and Serve, deploy the run's app, print its URLs; block until
    Ctrl-C.

    ``request_timeout_s`` is Serve's end-to-end deadline per HTTP request (its proxy answers 408);
    the app's own ``body_timeout_s`` and ``generate_timeout_s`` (in ``options``) bound the parts
    even when a caller disables Serve's with an ``x-request-timeout-seconds: 0`` header.

    Returns:
        The base URL (when ``block`` is False).
    """
    import ray
    from ray import serve

    from fednano_ray.app import init_ray, shutdown_ray, stop_on_signals
    from fednano_ray.serve.auth import load_tokens

    run_dir = _check_run_dir(run_dir)
    ServeArgs(run_dir=str(run_dir), engine=engine, **options)  # validate before Ray starts
    export_server_llm(run_dir)  # once, here, where errors are readable
    started = address is None and not ray.is_initialized()  # a Ray instance of our own
    init_ray(address)
    # SIGTERM (systemd, docker stop, kill) shuts down like Ctrl-C does: Serve, then the Ray
    # instance started here (a joined cluster keeps running), and the command exits 0; a second
    # signal ends it at once.
    signals = contextlib.ExitStack()
    if block:
        signals.enter_context(stop_on_signals())
    url = ""
    try:  # Ctrl-C while the deployments are still starting shuts down as cleanly as later
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s},
        )
        seconds = deploy(run_dir, engine=engine, **options)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown}:{port}"
        print(f"serving {run_dir} ({engine} engine), deployed in {seconds:.1f} s", file=sys.stderr)
        print(
            f"  API:  {url}/v1/clients/<client_id>/answer, {url}/v1/chat/completions",
            flush=True,
        )
        print(f"  docs: {url}/docs", flush=True)
        if not load_tokens(run_dir):
            print(
                f"  no client has a token yet: issue one with "
                f"`fednano-ray token {run_dir} CLIENT_ID`",
                file=sys.stderr,
            )
        if not block:
            return url
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr, flush=True)
    finally:
        signals.close()  # a signal that came leaves the default handlers: a second one ends us
        if block:
            try:
                serve.shutdown()
            finally:
                shutdown_ray(started=started)
    return url
