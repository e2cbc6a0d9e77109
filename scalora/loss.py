"""The training loss: next-token cross-entropy summed over the labelled tokens of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled tokens (fp32 logits).

    The labels are shifted, not the logits: in fp32 (CPUs) a sliced view of the logits was copied whole by the
    reshape, one more (B, T-1, V) fp32 tensor, the largest of the step for big vocabularies.
    """
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # (B, T): token t predicts t+1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # a no-op in fp32; the one upcast copy in bf16 / fp16
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
