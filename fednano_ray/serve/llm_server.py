"""The frozen server LLM behind the Serve app: prompt embeddings in, greedy tokens and text out.

:class:`LLMServer` is a plain class; the app wraps it with ``serve.deployment`` (DESIGN.md §3), and
tests build it directly. The ingress runs a client's NanoEdge to turn image + question into
``z'`` (T, d) and calls :meth:`LLMServer.generate` through a deployment handle.

* ``engine="hf"``: concurrent requests are merged with ``ray.serve.batch`` (``max_batch_size``,
  ``batch_wait_timeout_s``) and decoded as one left-padded batch; rows keep their own budget and
  stop tokens. Ray 2.60's ``serve.batch`` only runs inside a Serve replica (it reads the replica
  context), so outside Serve (tests, scripts) an equivalent small asyncio batcher takes its place.
* ``engine="vllm"``: every request goes straight to vLLM, whose scheduler batches concurrent
  requests (continuous batching); ``max_batch_size`` does not apply.

Example:
    >>> server = LLMServer(str(export_llm(mllm, "/tmp/llm")), engine="hf")     # doctest: +SKIP
    >>> await server.generate(z, max_new_tokens=16, stop_token_ids=None)       # doctest: +SKIP
    {'token_ids': [...], 'text': '...'}
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from fednano_ray.serve.engines import Engine, EngineInputError, HFEngine, make_engine, too_long

__all__ = ["EngineInputError", "LLMServer"]


@dataclass(frozen=True)
class _Request:
    prompt_embeds: torch.Tensor
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]


def _in_serve_replica() -> bool:
    """Tells whether this code runs inside a Ray Serve replica."""
    try:
        from ray import serve
        from ray.serve.exceptions import RayServeException
    except ImportError:  # pragma: no cover - ray[serve] is a dependency
        return False
    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


class _MicroBatcher:
    """``serve.batch`` for use outside Serve: merges concurrent calls into one list call.

    The first waiting item opens a batch; it closes after ``timeout_s`` or at ``max_batch_size``
    items, and runs while the next batch fills (one batch at a time).

    Args:
        fn: ``async fn(items) -> results`` (same length and order).
        max_batch_size: Most items per call.
        timeout_s: How long the first item waits for others.
    """

    def __init__(self, fn, max_batch_size: int, timeout_s: float) -> None:
        self._fn = fn
        self._max = max_batch_size
        self._timeout = timeout_s
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put_nowait((item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._queue.empty():
            batch = [self._queue.get_nowait()]
            deadline = loop.time() + self._timeout
            while len(batch) < self._max:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if not live:
                continue
            try:
                results = await self._fn([item for item, _ in live])
            except BaseException as e:  # handed to every caller of the batch
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
                if not isinstance(e, Exception):
                    raise
                continue
            for (_, fut), result in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(result)


class LLMServer:
    """Hosts the frozen LLM with the Hugging Face or the vLLM engine.

    Args:
        model_dir: A Hugging Face causal-LM folder with its tokenizer
            (:func:`fednano_ray.serve.export.export_llm`).
        engine: "hf" or "vllm".
        dtype: Model dtype: "float32" (exact), "bfloat16", "float16", or a ``model.precision``
            setting (``auto``, ``fp32``, ``bf16``), which the engine resolves on this replica's
            hardware.
        max_batch_size: HF engine: most requests decoded together.
        batch_wait_timeout_s: HF engine: how long a first request waits for others to join.
        engine_kwargs: Further engine arguments (vLLM: ``max_model_len``, ``kv_cache_gb``,
            ``gpu_memory_utilization``, any ``AsyncEngineArgs``; HF: ``batched``).

    Note:
        The HF batch queue belongs to one asyncio event loop (a Serve replica has exactly one); it
        is rebuilt if the server is later used from another loop.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        engine: str = "hf",
        dtype: str = "float32",
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        if engine not in ("hf", "vllm"):
            raise ValueError(f"unknown engine {engine!r}; use 'hf' or 'vllm'")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if batch_wait_timeout_s < 0:
            raise ValueError("batch_wait_timeout_s must be >= 0")
        self.model_dir = str(model_dir)
        self.engine_name = engine
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        kwargs = dict(engine_kwargs or {})
        self.engine: Engine = make_engine(engine, self.model_dir, dtype=dtype, **kwargs)
        self.hidden_size = int(self.engine.info()["hidden_size"])
        limit = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        if engine == "vllm":
            limit = int(self.engine.info()["max_model_len"])
        self.max_total_tokens: int | None = limit
        self._lock = threading.Lock()
        self._requests = 0
        self._errors = 0
        self._tokens = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._batch_sizes: Counter[int] = Counter()
        self._batcher: Any = None
        self._batcher_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- batching (HF) ------------------------------------------------------------------------

    def _batch_handler(self):
        """This instance's batch handler, bound to the running event loop.

        Inside a Serve replica it is ``ray.serve.batch``. Ray 2.60's ``serve.batch`` refuses to run
        outside a replica (its queue asks for the replica context), so tests and scripts that build
        the server directly get :class:`_MicroBatcher`, which batches the same way.
        """
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher_loop is not loop:
            if _in_serve_replica():
                from ray import serve

                self._batcher = serve.batch(
                    max_batch_size=self.max_batch_size,
                    batch_wait_timeout_s=self.batch_wait_timeout_s,
                )(self._decode_batch)
            else:
                self._batcher = _MicroBatcher(
                    self._decode_batch, self.max_batch_size, self.batch_wait_timeout_s
                )
            self._batcher_loop = loop
        return self._batcher

    async def _decode_batch(self, requests: list[_Request]) -> list[list[int]]:
        with self._lock:
            self._batch_sizes[len(requests)] += 1
        engine = self.engine
        assert isinstance(engine, HFEngine)
        return await engine.generate_rows(
            [r.prompt_embeds for r in requests],
            [r.max_new_tokens for r in requests],
            [list(r.stop_token_ids) for r in requests],
        )

    # -- API ----------------------------------------------------------------------------------

    def _prepare(
        self, prompt_embeds: Any, max_new_tokens: int, stop_token_ids: list[int] | None
    ) -> _Request:
        z = torch.as_tensor(prompt_embeds)
        if z.ndim == 3 and z.shape[0] == 1:
            z = z[0]
        if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] != self.hidden_size:
            raise ValueError(f"prompt_embeds must be (T, {self.hidden_size}); got {tuple(z.shape)}")
        if not torch.is_floating_point(z) or not bool(torch.isfinite(z).all()):
            raise ValueError("prompt_embeds must be finite floating-point values")
        max_new = int(max_new_tokens)
        if max_new < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.max_total_tokens is not None:
            if z.shape[0] >= self.max_total_tokens:
                raise too_long(int(z.shape[0]), self.max_total_tokens)
            max_new = min(max_new, self.max_total_tokens - z.shape[0])
        if stop_token_ids is None:
            eos = self.tokenizer.eos_token_id
            stops: tuple[int, ...] = () if eos is None else (int(eos),)
        else:
            stops = tuple(int(t) for t in stop_token_ids)
        return _Request(z.detach().float().contiguous(), max_new, stops)

    async def generate(
        self,
        prompt_embeds: torch.Tensor,
        max_new_tokens: int = 32,
        stop_token_ids: list[int] | None = None,
    ) -> dict:
        """Greedy-decodes one prompt.

        Args:
            prompt_embeds: (T, d) float prompt embeddings z' (a leading batch dim of 1 is accepted).
            max_new_tokens: Most tokens to generate (capped by the model's context).
            stop_token_ids: Tokens that end the answer (not returned); None means the
                tokenizer's EOS.

        Returns:
            ``{"token_ids": [...], "text": str}`` — the text without special tokens.

        Raises:
            EngineInputError: When the prompt does not fit the model's context, or the engine
                refuses the input otherwise (the caller's error: HTTP 400).
            ValueError: On malformed input (the ingress's error).
        """
        if self._closed:
            raise RuntimeError("LLMServer is shut down")
        request = self._prepare(prompt_embeds, max_new_tokens, stop_token_ids)
        with self._lock:
            self._requests += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            if self.engine_name == "hf":
                ids = await self._batch_handler()(request)
            else:
                (ids,) = await self.engine.generate(
                    [request.prompt_embeds],
                    max_new_tokens=request.max_new_tokens,
                    stop_token_ids=list(request.stop_token_ids),
                )
        except BaseException:
            with self._lock:
                self._errors += 1
            raise
        finally:
            with self._lock:
                self._in_flight -= 1
        with self._lock:
            self._tokens += len(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return {"token_ids": list(ids), "text": text}

    def stats(self) -> dict:
        """Counters since start.

        Returns:
            ``requests``, ``errors``, ``tokens_generated``, ``in_flight``, ``max_in_flight`` (most
            requests inside the server at once), and for the HF engine ``batches``,
            ``max_batch_size_seen`` and ``batch_sizes`` ({size: count}); for vLLM (its scheduler
            batches) those three are None.
        """
        with self._lock:
            hf = self.engine_name == "hf"
            return {
                "engine": self.engine_name,
                "requests": self._requests,
                "errors": self._errors,
                "tokens_generated": self._tokens,
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "batches": sum(self._batch_sizes.values()) if hf else None,
                "max_batch_size_seen": max(self._batch_sizes, default=0) if hf else None,
                "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())}
                if hf
                else None,
            }

    def info(self) -> dict:
        """Engine settings plus the server's batching settings."""
        return {
            **self.engine.info(),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "max_total_tokens": self.max_total_tokens,
            "eos_token_id": self.tokenizer.eos_token_id,
        }

    async def check_health(self) -> None:
        """Raises if the engine is unusable (Serve restarts the replica)."""
        if self._closed:
            raise RuntimeError("LLMServer is shut down")
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            await check()

    def shutdown(self) -> None:
        """Releases the engine (stops vLLM's processes); idempotent."""
        if self._closed:
            return
        self._closed = True
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()

    def __del__(self) -> None:  # Serve calls __del__ when a replica shuts down
        with contextlib.suppress(Exception):  # interpreter teardown: modules may be gone
            self.shutdown()
