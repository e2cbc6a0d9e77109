"""The training loss: next-token cross-entropy summed over the labelled tokens of a batch.

For large vocabularies the logits are the biggest tensor of a step: fp32 logits of 8k tokens x 128,256 words are
4 GiB, their log-softmax and gradient as much again. The chunked path never holds them whole: the model runs with its
output head short-circuited (its output is then the last hidden states), and `ChunkedLinearCrossEntropy` computes
the head and the loss chunk by chunk, recomputing each chunk's logits in backward. Same loss and gradients as the
plain path, to fp32 rounding (tests/test_loss.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import sharding
from .data import IGNORE

CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk; `auto` chunks when a micro-batch's logits would exceed this


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum of cross_entropy(hidden @ weight.T + bias, labels) over labelled rows, `chunk` rows at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # type: ignore
                labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # The head's matmul in the dtype the plain path uses: autocast's where it is on (backward runs outside it)
        device = hidden.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = _linear(hidden[s:s + chunk], weight, bias, ctx.dtype).float()  # (chunk, V)
            total += F.cross_entropy(logits, labels[s:s + chunk], ignore_index=IGNORE, reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        hidden, weight, bias, labels = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, y = hidden[s:s + ctx.chunk], labels[s:s + ctx.chunk]
            g = torch.softmax(_linear(h, weight, bias, ctx.dtype).float(), dim=-1)  # (chunk, V)
            valid = y != IGNORE  # d(sum CE)/d(logits) = softmax - onehot on labelled rows, 0 elsewhere
            g[valid, y[valid]] -= 1
            g[~valid] = 0
            g = (g * grad).to(ctx.dtype)
            if want_h:
                grad_h[s:s + ctx.chunk] = (g @ weight.to(ctx.dtype)).to(hidden.dtype)
            if want_w:
                grad_w += (g.T @ h.to(ctx.dtype)).float()
            if want_b:
                grad_b += g.float().sum(0)
        return (grad_h, grad_w.to(weight.dtype) if want_w else None,
                grad_b.to(bias.dtype) if want_b else None, None, None)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return F.linear(x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None)


def _plain_head(model: nn.Module) -> Optional[nn.Linear]:
    """The output head as a plain nn.Linear whose output is the logits as they are (else None: use the plain path)."""
    from .core.lora import ModulesToSaveWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, ModulesToSaveWrapper):
        head = head._current()
    config = getattr(base, "config", None)
    transformed = any(getattr(config, k, None) not in (None, 1, 1.0) for k in
                      ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))
    return head if type(head) is nn.Linear and not transformed else None


@contextlib.contextmanager
def _head_returns_hidden(head: nn.Module) -> Iterator[None]:
    """Inside the block the head passes its input through: the model's `.logits` are its last hidden states."""
    head.forward = lambda hidden: hidden  # an instance attribute, over the class's forward
    try:
        yield
    finally:
        del head.forward


def token_loss_sum(model, batch: dict[str, torch.Tensor], chunked: Union[bool, str] = False) -> torch.Tensor:
    """Sum of next-token cross-entropies over labelled tokens (fp32 logits). `chunked`: False (the plain path: the
    model's own logits, every position), True, "auto" or "liger" (liger-kernel's fused version).

    With any of the last three, the model runs with its output head passed through, and the head is applied to the
    labelled positions alone: with the prompt masked most positions carry no loss, and for a large vocabulary the
    head is a good part of a step (SmolLM2-135M: 576 x 49,152, about a fifth of its matmul work) and its logits the
    largest tensor. Then chunk by chunk (True; "auto" where those positions' fp32 logits would pass CHUNK_BYTES) or
    whole. The same loss and gradients as the plain path, to rounding: the rows left out contribute nothing to
    either. Where the head's weight is sharded (ZeRO-3), the head runs inside the model's forward on those rows, as
    one piece (no chunks).

    The labels are shifted, not the logits: in fp32 (CPUs) a sliced view of the logits was copied whole by the
    reshape, one more (B, T-1, V) fp32 tensor, the largest of the step for big vocabularies.
    """
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE).reshape(-1)  # (B*T,): token t predicts t+1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = _plain_head(_unwrapped(model)) if chunked else None
    if head is None:
        logits = model(**inputs).logits.float()  # a no-op in fp32; the one upcast copy in bf16 / fp16
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels, ignore_index=IGNORE, reduction="sum")
    keep = labels != IGNORE
    labels = labels[keep]  # the positions that carry loss
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * head.out_features))
    if sharding.is_sharded(head.weight) or chunked == "auto" and labels.numel() <= rows_per_chunk:
        # The head inside the model's forward (its autocast, a sharded weight's gathering), on those rows only
        with _head_on_rows(head, keep):
            logits = model(**inputs).logits.float()  # (rows kept, V)
        return F.cross_entropy(logits, labels, reduction="sum")
    with _head_returns_hidden(head):
        hidden = model(**inputs).logits  # (B, T, H): the head passed its input through
    hidden = hidden.reshape(-1, hidden.shape[-1])[keep]
    if chunked == "liger":
        return _liger_loss_sum(hidden, head, labels)
    return ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, rows_per_chunk)


@contextlib.contextmanager
def _head_on_rows(head: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """Inside the block the head computes the logits of the flattened positions `keep` selects, as (rows, V)."""
    forward = head.forward
    head.forward = lambda hidden: forward(hidden.reshape(-1, hidden.shape[-1])[keep])
    try:
        yield
    finally:
        del head.forward


def _liger_loss_sum(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy (Triton, CUDA): head and loss in chunks, gradients computed in the
    forward pass. Parity with the plain loss: tests/test_cuda.py."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        from .core.errors import UserError

        raise UserError("train.chunked_loss=liger needs liger-kernel: pip install liger-kernel (CUDA only), or use "
                        "train.chunked_loss=auto") from None
    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(
        head.weight, hidden.to(head.weight.dtype), labels, head.bias)
    return (out[0] if isinstance(out, tuple) else out).float()


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model under DDP's / FSDP's / DeepSpeed's wrappers (`.module`)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
