"""Prompts, answer targets and padded batches for the split step.

A small frozen LLM cannot bind choices to letters (ENVIRONMENT.md: SmolLM2-135M answers "A" to every
lettered question), so answers are *texts*: we train on the answer's tokens only and score a
multiple-choice item by the summed log-likelihood of each choice's text (lm-eval-harness style).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fednano_ray.models.split import IGNORE_INDEX

INSTRUCTION = " Answer with one word."


@dataclass(frozen=True)
class PromptFormat:
    """How a (image, question, answer) triple becomes text around the visual tokens.

    The visual tokens sit between ``prefix`` and the question; the answer follows ``assistant`` and
    ends with ``end``. Pieces are tokenized separately so the image slots are exact.
    """

    prefix: str
    question_template: str
    end: str

    def encode(
        self,
        tokenizer,
        question: str,
        answer: str | None,
        num_image_tokens: int,
        image_token_id: int,
    ) -> tuple[list[int], list[int], list[bool]]:
        """Token ids, labels and image mask of one row (answer None: prompt only)."""
        pre = tokenizer.encode(self.prefix, add_special_tokens=False)
        post = tokenizer.encode(
            self.question_template.format(question=question.strip()), add_special_tokens=False
        )
        ids = pre + [image_token_id] * num_image_tokens + post
        labels = [IGNORE_INDEX] * len(ids)
        if answer is not None:
            ans = tokenizer.encode(answer.strip() + self.end, add_special_tokens=False)
            ids = ids + ans
            labels = labels + ans
        mask = (
            [False] * len(pre)
            + [True] * num_image_tokens
            + [False] * (len(ids) - len(pre) - num_image_tokens)
        )
        return ids, labels, mask


# SmolLM2's chat template inserts a long default system prompt unless one is given: give a short
# one.
CHATML = PromptFormat(
    prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    question_template="\n{question}" + INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n",
    end="<|im_end|>",
)
# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:").
LLAVA = PromptFormat(
    prefix="USER: ", question_template="\n{question}" + INSTRUCTION + " ASSISTANT:", end="</s>"
)


def collate(
    rows: Sequence[tuple[list[int], list[int], list[bool]]], pad_id: int, pad_to: int | None = None
) -> dict[str, Tensor]:
    """Right-pad rows into ``input_ids``, ``labels``, ``attention_mask``, ``image_mask`` tensors."""
    t = max(len(r[0]) for r in rows)
    if pad_to is not None:
        t = max(t, pad_to)
    n = len(rows)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, t), dtype=torch.long)
    image_mask = torch.zeros((n, t), dtype=torch.bool)
    for i, (ids, lab, msk) in enumerate(rows):
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids)
        labels[i, :k] = torch.tensor(lab)
        attention[i, :k] = 1
        image_mask[i, :k] = torch.tensor(msk)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention,
        "image_mask": image_mask,
    }
