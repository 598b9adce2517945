"""Split a multimodal LLM into a client-side NanoEdge and a frozen server-side LLM.

::

    client (NanoEdge)                                            server (ServerLLM, frozen)
    image ─► encoder ─► connector ─► NanoAdapter["vision"] ─┐
                                                              ├─► z' ──► decoder ─► lm_head ─► loss
    text  ─► embed_tokens ─────────► NanoAdapter["text"]  ─┘   ◄── dL/dz' (grads to inputs only)

Every model kind (``nano``, ``hf`` LLaVA, ``tiny``) is first described as :class:`MLLMParts`, then
:func:`split_mllm` turns any of them into the pair. The split step is exact: the adapter gradients
from ``edge → server.loss_and_grad → edge backward`` equal those of the monolithic model
(``tests/models/test_split.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fednano_ray.models.adapter import AdapterDims, adapter_form, connector_layers

IGNORE_INDEX = -100


@dataclass
class MLLMParts:
    """The five pieces of a LLaVA-style MLLM.

    Attributes:
        encoder: images (B, 3, H, W) -> features (B, N, d_v); frozen.
        connector: (B, N, d_v) -> (B, N, d); frozen (pretrained).
        embed_tokens: the LLM's token embedding table (vocab, d); frozen.
        decoder: the LLM body; called as ``decoder(inputs_embeds=..., attention_mask=...)`` and
            returning ``last_hidden_state`` (B, T, d).
        lm_head: (B, T, d) -> logits (B, T, vocab).
    """

    encoder: nn.Module
    connector: nn.Module
    embed_tokens: nn.Embedding
    decoder: nn.Module
    lm_head: nn.Module

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.weight.shape[1]


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class NanoEdge(nn.Module):
    """What a client holds: frozen encoder, connector and embedding table, plus NanoAdapters.

    The edge turns a batch into the adapted embeddings ``z'`` the server LLM consumes. Image
    positions in ``input_ids`` are marked by ``image_mask``; the connector's visual tokens (after
    the vision adapter) are scattered there, in order, exactly as LLaVA merges image features.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        connector: nn.Module,
        embed_tokens: nn.Embedding,
        adapters: dict[str, nn.Module],
    ) -> None:
        super().__init__()
        self.encoder = _freeze(encoder)
        self.connector = _freeze(connector)
        self.embed_tokens = _freeze(embed_tokens)
        self.adapters = nn.ModuleDict(adapters)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Frozen encoder features (B, N, d_v); cache these when the encoder is frozen."""
        with torch.no_grad():
            return self.encoder(pixel_values)

    def features_of(self, features: Tensor | None, pixel_values: Tensor | None) -> Tensor:
        """The encoder features of a forward call: ``features`` as given, else ``pixel_values``
        encoded now (an error naming both if neither is given)."""
        if features is not None:
            return features
        if pixel_values is None:
            raise ValueError(
                "an edge's forward needs features (encoder features) or pixel_values (images)"
            )
        return self.encode_images(pixel_values)

    def visual_tokens(self, features: Tensor) -> Tensor:
        """Connector + vision adapter: (B, N, d_v) -> (B, N, d).

        A vision adapter acts on the connector's output tokens, or (``adapter.kind: connector``,
        ``acts_on_connector``) inside the connector, which then runs with gradients to its inputs.
        """
        adapter = self.adapters["vision"] if "vision" in self.adapters else None  # noqa: SIM401 (no ModuleDict.get)
        if adapter is not None and getattr(adapter, "acts_on_connector", False):
            return adapter.through(self.connector, features)
        with torch.no_grad():
            v = self.connector(features)
        return v if adapter is None else adapter(v)

    def forward(
        self,
        input_ids: Tensor,
        image_mask: Tensor,
        *,
        features: Tensor | None = None,
        pixel_values: Tensor | None = None,
        prompt_mask: Tensor | None = None,
    ) -> Tensor:
        """Adapted embeddings z' (B, T, d).

        Args:
            input_ids: (B, T) token ids; ids under ``image_mask`` are placeholders.
            image_mask: (B, T) bool, True at the visual-token positions of each row.
            features: (B, N, d_v) precomputed encoder features, or
            pixel_values: (B, 3, H, W) images to encode now.
            prompt_mask: (B, T) bool, True at the prompt's positions. Unused here; training,
                evaluation and serving pass it to every edge, and FedDPA-F's
                :class:`~fednano_ray.models.dual.DualEdge` summarises the prompt with it.
        """
        del prompt_mask
        with torch.no_grad():
            z = self.embed_tokens(input_ids)  # (B, T, d)
        if "text" in self.adapters:
            z = self.adapters["text"](z)
        v = self.visual_tokens(self.features_of(features, pixel_values))  # (B, N, d)
        n_slots = int(image_mask.sum())
        if n_slots != v.shape[0] * v.shape[1]:
            raise ValueError(
                f"image_mask marks {n_slots} positions but the images give "
                f"{v.shape[0] * v.shape[1]} tokens"
            )
        mask = image_mask.unsqueeze(-1).expand_as(z)
        return z.masked_scatter(mask, v.to(z.dtype))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapters.parameters() if p.requires_grad]


class ServerLLM(nn.Module):
    """The frozen LLM on the server: forward and backward to its inputs only.

    (``fedavg-lora`` clients hold their own copy with PEFT LoRA in the decoder: there the backward
    also fills the LoRA parameters' gradients.)

    Rows may come from different clients: ``groups`` (B,) names the client of each row and the
    loss of each group is the mean over that group's label tokens, so merging requests from many
    clients into one padded batch gives every client exactly the gradient it would get alone.
    """

    def __init__(
        self, decoder: nn.Module, lm_head: nn.Module, *, autocast_bf16: bool = False
    ) -> None:
        super().__init__()
        self.decoder = _freeze(decoder)
        self.lm_head = _freeze(lm_head)
        self.autocast_bf16 = autocast_bf16

    @property
    def hidden_size(self) -> int:
        return self.lm_head.weight.shape[1]

    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(
                "cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16
            )
        return nullcontext()

    def _token_logprobs(
        self, z: Tensor, attention_mask: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-token log-prob of the next label, only at labelled positions.

        Returns (logp (M,), row (M,)) for the M positions whose shifted label is not IGNORE_INDEX.
        """
        with self._autocast():
            hidden = self.decoder(inputs_embeds=z, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        sel = targets != IGNORE_INDEX
        rows = torch.nonzero(sel, as_tuple=True)[0]
        h = hidden[:, :-1][sel]  # (M, d): run the vocab projection only where it is scored
        with self._autocast():
            logits = self.lm_head(h)
        logp = -F.cross_entropy(logits.float(), targets[sel], reduction="none")
        return logp, rows

    def loss_and_grad(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        groups: Tensor | None = None,
        num_groups: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The split step on the server.

        Args:
            inputs_embeds: (B, T, d) adapted embeddings z' from the clients.
            attention_mask: (B, T) 1 for real tokens (right padding).
            labels: (B, T) target ids, IGNORE_INDEX where no loss is taken.
            groups: (B,) group (client) index of each row; default all 0.
            num_groups: number of groups (default max(groups)+1).

        Returns:
            (losses (G,), dL/dz' (B, T, d)) where L = sum of the group losses. Trainable decoder
            parameters, if any (PEFT LoRA injected by
            :meth:`fednano_ray.models.build.MLLM.with_llm_lora`), accumulate dL/dθ in ``.grad``.
        """
        if groups is None:
            groups = torch.zeros(inputs_embeds.shape[0], dtype=torch.long)
        g = int(num_groups if num_groups is not None else int(groups.max()) + 1)
        z = inputs_embeds.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logp, rows = self._token_logprobs(z, attention_mask, labels)
            row_group = groups[rows]
            sums = torch.zeros(g).index_add(0, row_group, -logp)
            counts = torch.zeros(g).index_add(0, row_group, torch.ones_like(logp))
            losses = sums / counts.clamp_min(1)
            # backward, not autograd.grad(z): any trainable decoder parameters get their grads too
            # (fedavg-lora's LoRA, in a client's own copy of the LLM); the shared LLM has none.
            losses.sum().backward()
        return losses.detach(), z.grad

    @torch.no_grad()
    def score(self, inputs_embeds: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Summed log-probability of each row's labelled tokens, (B,)."""
        logp, rows = self._token_logprobs(inputs_embeds.float(), attention_mask, labels)
        return torch.zeros(inputs_embeds.shape[0]).index_add(0, rows, logp)

    def _packed_logp(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        segments: Tensor,
        source: Tensor,
        target: Tensor,
    ) -> Tensor:
        """Log-probability of each scored token of packed rows, (M,) (see :meth:`score_packed`)."""
        b, n, _ = inputs_embeds.shape
        idx = torch.arange(n)
        seg_q, seg_k = segments[:, :, None], segments[:, None, :]
        allowed = (idx[None, :] <= idx[:, None])[None] & attention_mask.bool()[
            :, None, :
        ]  # causal, real keys
        allowed &= (seg_k == 0) | (seg_k == seg_q)  # a choice never sees another choice
        allowed |= torch.eye(n, dtype=torch.bool)[
            None
        ]  # padding queries see themselves: no empty softmax row
        mask = allowed[:, None]  # (B, 1, L, L), used as given by the decoder
        impl = getattr(self.decoder.config, "_attn_implementation", None) or "sdpa"
        if impl == "eager":  # eager attention adds a float mask
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        elif impl != "sdpa":
            raise ValueError(
                "packed choice scoring needs a 4-D attention mask, which "
                f"attn_implementation={impl!r} does not take: load the LLM with "
                "attn_implementation='sdpa' (or 'eager')"
            )
        with self._autocast():
            hidden = self.decoder(
                inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids
            ).last_hidden_state
        h = hidden.reshape(b * n, -1)[
            source
        ]  # (M, d): the vocab projection only where it is scored
        with self._autocast():
            logits = self.lm_head(h)
        return -F.cross_entropy(logits.float(), target, reduction="none")

    @torch.no_grad()
    def score_packed(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        segments: Tensor,
        source: Tensor,
        target: Tensor,
        owner: Tensor,
        num_scores: int,
    ) -> Tensor:
        """Summed log-likelihood of several answers that share one prompt, in one forward pass.

        Each row packs a prompt (segment 0) followed by every choice's answer tokens (segments 1, 2,
        ...). A choice's tokens see the prompt and their own earlier tokens only, at the positions
        they would have after the prompt, so each choice scores as if it were alone
        (lm-eval-harness's sum of log-likelihoods), while the prompt runs once instead of once per
        choice.

        Args:
            inputs_embeds: (B, L, d) adapted embeddings of the packed rows.
            attention_mask: (B, L) 1 for real tokens (right padding).
            position_ids: (B, L) positions: the prompt's 0..P-1, each choice again from P.
            segments: (B, L) 0 for the prompt, j for choice j's tokens.
            source: (M,) flat index ``b * L + t`` of the position whose next-token distribution
                scores ...
            target: (M,) ... this token id,
            owner: (M,) for this score (0..num_scores-1).
            num_scores: number of scores returned.

        Returns:
            (num_scores,) summed log-probabilities.
        """
        logp = self._packed_logp(
            inputs_embeds.float(), attention_mask, position_ids, segments, source, target
        )
        return torch.zeros(num_scores).index_add(0, owner, logp)

    def choice_loss_and_grad(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        segments: Tensor,
        source: Tensor,
        target: Tensor,
        owner: Tensor,
        counts: Tensor,
        answers: Tensor,
        lm_weight: float = 0.0,
        groups: Tensor | None = None,
        num_groups: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The split step of the choice-level objective: what evaluation ranks is what is trained.

        Rows are packed questions (:meth:`score_packed`'s layout; question ``q`` owns the next
        ``counts[q]`` scores, in order). A question's loss is the cross-entropy of its answer among
        its choices' summed log-likelihoods, ``-log softmax(s_q)[answers[q]]``, plus ``lm_weight``
        times the mean next-token NLL of the answer's own tokens (the LM objective, on the answer).

        Args:
            counts: (Q,) number of choices of each question (Q = B rows).
            answers: (Q,) index of the correct choice within its question.
            lm_weight: weight of the answer's token NLL in the mix (0: pure choice cross-entropy).
            groups: (Q,) group (client) of each question; a group's loss is the mean over its
                questions.
            num_groups: number of groups (default max(groups)+1).

        Returns:
            (losses (G,), dL/dz' (B, L, d)) where L = sum of the group losses.
        """
        q = int(counts.shape[0])
        if q != inputs_embeds.shape[0] or answers.shape != counts.shape:
            raise ValueError(
                f"one question per packed row: {inputs_embeds.shape[0]} rows, {q} counts, "
                f"{answers.shape[0]} answers"
            )
        if bool((answers < 0).any()) or bool((answers >= counts).any()):
            raise ValueError("every answer must index one of its question's choices")
        if groups is None:
            groups = torch.zeros(q, dtype=torch.long)
        g = int(num_groups if num_groups is not None else int(groups.max()) + 1)
        z = inputs_embeds.detach().float().requires_grad_(True)
        num_scores = int(counts.sum())
        first = torch.cumsum(counts, 0) - counts  # each question's first score
        question_of = torch.repeat_interleave(torch.arange(q), counts)  # (num_scores,)
        with torch.enable_grad():
            logp = self._packed_logp(z, attention_mask, position_ids, segments, source, target)
            scores = torch.zeros(num_scores).index_add(0, owner, logp)
            # log-sum-exp of each question's scores, stabilised by its own max
            top = torch.full((q,), -torch.inf).scatter_reduce(
                0, question_of, scores.detach(), "amax"
            )
            lse = (
                torch.zeros(q).index_add(0, question_of, (scores - top[question_of]).exp()).log()
                + top
            )
            per_q = lse - scores[first + answers]
            if lm_weight:
                right = (
                    owner == (first + answers)[question_of[owner]]
                )  # tokens of the correct choices
                nll = torch.zeros(q).index_add(0, question_of[owner[right]], -logp[right])
                ntok = torch.zeros(q).index_add(
                    0, question_of[owner[right]], torch.ones_like(logp[right])
                )
                per_q = per_q + lm_weight * nll / ntok.clamp_min(1)
            sums = torch.zeros(g).index_add(0, groups, per_q)
            n = torch.zeros(g).index_add(0, groups, torch.ones_like(per_q))
            losses = sums / n.clamp_min(1)
            # as in loss_and_grad: trainable decoder LoRA (fedavg-lora) gets grads too
            losses.sum().backward()
        return losses.detach(), z.grad

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int],
    ) -> list[list[int]]:
        """Greedy decoding from prompt embeddings (right padded); returns new token ids per row."""
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        table = self.decoder.get_input_embeddings()  # the server embeds the tokens it generates
        outs: list[list[int]] = []
        for b in range(
            inputs_embeds.shape[0]
        ):  # rows differ in length; decode each with a KV cache
            n = int(attention_mask[b].sum())
            z = inputs_embeds[b : b + 1, :n].float()
            past = None
            ids: list[int] = []
            for _ in range(max_new_tokens):
                with self._autocast():
                    out = self.decoder(inputs_embeds=z, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = int(self.lm_head(out.last_hidden_state[:, -1].float()).argmax(-1))
                if nxt in eos:
                    break
                ids.append(nxt)
                z = table(torch.tensor([[nxt]])).float()
            outs.append(ids)
        return outs


def adapter_dims(parts: MLLMParts, slots: int) -> AdapterDims:
    """The widths the adapter forms read off ``parts`` (works on the meta device).

    ``feature``/``connector_hidden`` are 0 when the connector has no leading Linear; only
    ``adapter.kind: connector`` needs them, and it then names the problem.
    """
    try:
        first, _ = connector_layers(parts.connector)
        feature, hidden = int(first.in_features), int(first.out_features)
    except ValueError:
        feature = hidden = 0
    return AdapterDims(
        hidden=parts.hidden_size, feature=feature, connector_hidden=hidden, slots=slots
    )


def build_adapters(
    parts: MLLMParts,
    *,
    kind: str = "lowrank",
    r: int,
    scaling: float,
    dropout: float = 0.0,
    modalities: Sequence[str] = ("vision", "text"),
    slots: int = 0,
) -> dict[str, nn.Module]:
    """Fresh NanoAdapters of form ``kind`` (``adapter.kind``) for ``parts``, by modality.

    The one place a client's adapters are built: training clients, serving and the benchmarks go
    through :func:`split_mllm` (or :meth:`~fednano_ray.models.build.MLLM.split`), which calls it.
    """
    bad = set(modalities) - {"vision", "text"}
    if bad:
        raise ValueError(f"unknown adapter modalities {sorted(bad)}; use vision and/or text")
    form = adapter_form(kind)
    dims = adapter_dims(parts, slots)
    if kind == "connector" and "vision" in modalities:
        connector_layers(
            parts.connector
        )  # raises, naming the connector, if it has no leading Linear
    return {m: form.build(m, dims, r=r, scaling=scaling, dropout=dropout) for m in modalities}


def split_mllm(
    parts: MLLMParts,
    *,
    r: int,
    scaling: float,
    dropout: float = 0.0,
    modalities: Sequence[str] = ("vision", "text"),
    autocast_bf16: bool = False,
    seed: int | None = None,
    train_a: bool = True,
    kind: str = "lowrank",
    slots: int = 0,
) -> tuple[NanoEdge, ServerLLM]:
    """Split any MLLM into (NanoEdge with fresh NanoAdapters, frozen ServerLLM).

    The two halves share the frozen tensors (no copy); in a real deployment each side loads only
    its own half. ``seed`` makes the adapter init identical across processes. ``scaling`` is the
    run's one adapter scaling (``adapter.lora_alpha / adapter.r``, the same at every rank ``r``; see
    :mod:`fednano_ray.models.adapter`). ``train_a=False`` freezes every ``lora_A`` at its seeded
    init (FFA-LoRA, ``adapter.factors: frozen_a``): only ``lora_B`` (and a form's rank-free
    tensors) train. ``kind`` is the adapter form (``adapter.kind``,
    :mod:`fednano_ray.models.adapter`); ``slots``, the visual tokens per image, sizes ``slots``'
    offsets.
    """
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        adapters = build_adapters(
            parts,
            kind=kind,
            r=r,
            scaling=scaling,
            dropout=dropout,
            modalities=modalities,
            slots=slots,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    for adapter in adapters.values():
        adapter.lora_A.requires_grad_(train_a)
    edge = NanoEdge(
        encoder=parts.encoder,
        connector=parts.connector,
        embed_tokens=parts.embed_tokens,
        adapters=adapters,
    )
    server = ServerLLM(parts.decoder, parts.lm_head, autocast_bf16=autocast_bf16)
    return edge, server
