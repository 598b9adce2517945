"""FedDPA-F's dual adapter: a client's global and local NanoAdapters mixed per instance.

FedDPA (Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024,
arXiv 2403.19211) gives each client two adapters of the same form: a global one, trained by
FedAvg, and a local one, trained on the client's own data with the global one frozen. At inference
an instance-wise weight ``w(x)`` mixes them::

    e(x) = (1 - w(x)) * E_global(x) + w(x) * E_local(x)

``E_*`` is the client's NanoEdge output ``z'`` (B, T, d) with that adapter, so the mix is
form-agnostic; for the linear residual forms (``lowrank``, ``slots``) it is exactly the mix of the
two residuals. The LLM sees one ``z'``, so both serving engines (HF, vLLM) get the mixed embeddings
from the ingress unchanged.

The weight (:class:`DynamicWeight`) compares a frozen, adapter-free summary of the instance
(:meth:`DualEdge.representation`) with a bounded bank of the client's training summaries: the mean
of the ``top_k`` cosine similarities, clipped to [0, 1]. During local training the weight is a
constant (``federation.feddpa_train_weight``).

The summary of a prompt is the concatenation of two unit vectors: the mean of its visual tokens
from the frozen connector (no vision adapter) and the mean of its text-token embeddings from the
frozen embedding table (prompt tokens only, never an answer's). Cosines are taken after subtracting
the bank's mean, part by part, and averaged over the two parts: raw cosines of such means are
~0.997 between any two inputs (measured on the quickstart benchmark, mostly the shared prompt
template), which would make ``w`` ~1 everywhere; centred, the quickstart's 8 clients get a mean
weight of 0.65-0.77 on their own held-out questions and 0.54-0.73 on the global test, every client
higher on its own.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fednano_ray.models.adapter import load_adapter_state
from fednano_ray.models.split import NanoEdge

__all__ = [
    "REPRESENTATION",
    "DualEdge",
    "DynamicWeight",
    "representation_dim",
    "subsample",
]

#: What the dynamic weight compares, for the run's results.json.
REPRESENTATION = (
    "(unit mean of the frozen connector's visual tokens, unit mean of the frozen embeddings of the "
    "prompt's text tokens); similarity = mean over the two parts of the cosine centred at the "
    "bank's mean; w = clip(mean of the top-k similarities to the bank, 0, 1)"
)


def representation_dim(hidden_size: int) -> int:
    """Width of one summary (visual and text halves, each ``hidden_size`` wide)."""
    return 2 * hidden_size


def subsample(n: int, max_size: int, seed: int) -> list[int]:
    """Which of ``n`` training examples go into the bank: all if ``n <= max_size``, else
    ``max_size`` of them drawn without replacement with ``seed`` (sorted: deterministic)."""
    if n <= max_size:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, max_size, replace=False))


class DynamicWeight:
    """Instance-wise weight of the local adapter from a bank of training summaries.

    A summary is ``parts`` equal-width parts (visual, text); the similarity of two summaries is the
    mean over parts of the cosine of the part, centred at the bank's mean of that part. Per part,
    so that the modality whose summaries vary more does not decide alone (on the random-weight tiny
    model the visual half would drown the text one).

    Args:
        bank: (N, D) summaries of the client's training prompts (:meth:`DualEdge.representation`).
        top_k: how many of the most similar bank entries are averaged (``federation.feddpa_top_k``;
            fewer if the bank is smaller).
        parts: how many equal-width parts a summary holds (2: :meth:`DualEdge.representation`).

    Raises:
        ValueError: if the bank is empty or not 2-D, its width not a multiple of ``parts``, or
            ``top_k`` < 1.
    """

    def __init__(self, bank: Tensor, *, top_k: int = 5, parts: int = 2) -> None:
        if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] % parts:
            raise ValueError(
                f"the bank must be a non-empty (N, D) tensor with D a multiple of {parts}, "
                f"got shape {tuple(bank.shape)}"
            )
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.bank = bank.detach().float()
        self.top_k = min(int(top_k), bank.shape[0])
        self.parts = parts
        split = self.bank.view(bank.shape[0], parts, -1)  # (N, P, D/P)
        self.center = split.mean(0)  # (P, D/P)
        self._unit_bank = F.normalize(split - self.center, dim=-1)  # (N, P, D/P)

    def __call__(self, reps: Tensor) -> Tensor:
        """(B, D) summaries -> (B,) weights in [0, 1]."""
        if reps.shape[-1] != self.bank.shape[1]:
            raise ValueError(
                f"summaries of width {reps.shape[-1]} do not match the bank's {self.bank.shape[1]}"
            )
        unit = F.normalize(reps.float().view(reps.shape[0], self.parts, -1) - self.center, dim=-1)
        sims = torch.einsum("bpd,npd->bn", unit, self._unit_bank) / self.parts  # (B, N)
        return sims.topk(self.top_k, dim=-1).values.mean(-1).clamp(0.0, 1.0)


class DualEdge(nn.Module):
    """A NanoEdge with two adapter sets of one form and rank: ``e = (1-w) E_global + w E_local``.

    Built from a client's NanoEdge (:meth:`around`); the frozen encoder, connector and embedding
    table are shared, the two adapter sets are copies. The global adapters never train; the local
    ones are :attr:`adapters` (what :func:`~fednano_ray.training.local_fit` trains by default).

    Attributes:
        weighting: a constant weight in [0, 1] (local training) or a :class:`DynamicWeight`
            (evaluation and serving).
        weight_log: if a list, every forward appends its (B,) weights (a diagnostic).
    """

    def __init__(
        self, global_edge: NanoEdge, local_edge: NanoEdge, *, weighting: float | DynamicWeight
    ) -> None:
        super().__init__()
        self.global_edge = global_edge
        self.local_edge = local_edge
        self.global_edge.adapters.requires_grad_(False)
        self.weighting = weighting
        self.weight_log: list[Tensor] | None = None

    @classmethod
    def around(cls, edge: NanoEdge, *, weighting: float | DynamicWeight = 0.5) -> DualEdge:
        """A dual edge sharing ``edge``'s frozen parts, with two copies of its adapters (``edge``
        itself is left as it is)."""

        def twin() -> NanoEdge:
            return NanoEdge(
                encoder=edge.encoder,
                connector=edge.connector,
                embed_tokens=edge.embed_tokens,
                adapters=copy.deepcopy(dict(edge.adapters.items())),
            )

        return cls(twin(), twin(), weighting=weighting)

    @property
    def adapters(self) -> nn.ModuleDict:
        """The local adapters: the trainable part."""
        return self.local_edge.adapters

    def load_states(self, global_state: dict[str, Tensor], local_state: dict[str, Tensor]) -> None:
        """Load both adapter sets (each truncated to this edge's rank, HetLoRA)."""
        load_adapter_state(self.global_edge.adapters, global_state)
        load_adapter_state(self.local_edge.adapters, local_state)

    @torch.no_grad()
    def representation(
        self, input_ids: Tensor, image_mask: Tensor, prompt_mask: Tensor, features: Tensor
    ) -> Tensor:
        """The frozen, adapter-free summary of each row's prompt, (B, 2d) (see the module doc).

        Args:
            input_ids, image_mask: (B, T) as for :meth:`NanoEdge.forward`.
            prompt_mask: (B, T) bool, True at the prompt's positions (not answers, not padding).
            features: (B, N, d_v) encoder features of the rows' images.
        """
        e = self.global_edge
        visual = e.connector(features).float().mean(1)  # (B, d), no vision adapter
        text_pos = (prompt_mask & ~image_mask).unsqueeze(-1)  # (B, T, 1)
        emb = e.embed_tokens(input_ids).float()  # (B, T, d)
        text = (emb * text_pos).sum(1) / text_pos.sum(1).clamp_min(1)  # (B, d)
        return torch.cat([F.normalize(visual, dim=-1), F.normalize(text, dim=-1)], dim=-1)

    def weights(
        self, input_ids: Tensor, image_mask: Tensor, prompt_mask: Tensor | None, features: Tensor
    ) -> Tensor:
        """The (B,) weight of the local adapter for each row."""
        if isinstance(self.weighting, DynamicWeight):
            if prompt_mask is None:
                raise ValueError(
                    "a DualEdge with a dynamic weight needs prompt_mask (the prompt's positions)"
                )
            w = self.weighting(self.representation(input_ids, image_mask, prompt_mask, features))
        else:
            w = torch.full((input_ids.shape[0],), float(self.weighting))
        if self.weight_log is not None:
            self.weight_log.append(w.detach().clone())
        return w

    def forward(
        self,
        input_ids: Tensor,
        image_mask: Tensor,
        *,
        features: Tensor | None = None,
        pixel_values: Tensor | None = None,
        prompt_mask: Tensor | None = None,
    ) -> Tensor:
        """Mixed adapted embeddings (B, T, d); arguments as :meth:`NanoEdge.forward`."""
        features = self.global_edge.features_of(features, pixel_values)  # once, for both sets
        w = self.weights(input_ids, image_mask, prompt_mask, features)
        g = self.global_edge(input_ids, image_mask, features=features)
        local = self.local_edge(input_ids, image_mask, features=features)
        w = w.to(local.dtype)[:, None, None]  # (B, 1, 1)
        return (1 - w) * g + w * local

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.local_edge.trainable_parameters()
