"""LoRA layers: one wrapper around whatever linear layer the base has, with PEFT's names.

    y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling

in peft's order of operations (peft's numbers), or, after `use_fused_lora`, as
`addmm(base_layer(x), lora_A(dropout(x)) * scaling, lora_B.weight.T)` in fewer passes.

`lora_A` / `lora_B` are fp32 `nn.Linear`s kept per adapter name in `ModuleDict`s, so a wrapped layer's parameters are
`base_layer.weight`, `lora_A.<adapter>.weight`, `lora_B.<adapter>.weight`, as in peft.

DoRA (`use_dora=True`, arXiv 2402.09353, as peft computes it) adds a trained magnitude m per output,
`lora_magnitude_vector.<adapter>.weight`, initialised to the row norms of W + scaling * B A, and computes

    y = base(x) + (m / n - 1) * W x' + (m / n) * scaling * B A x',   n = ||W + scaling * B A|| per row, detached,

with x' = dropout(x) (W x' is the base's output without bias when there is no dropout; with dropout, on plain and
4-bit bases, that output less the sparse product of W with the elements dropout dropped, `_DroppedProduct`, where
peft takes a second dense product with the de-quantized W), i.e. the output of m * (W + scaling * B A) / n on x'
plus the base's own output minus W x'. n is computed once per values of A and B (`_cached_dora_norm`), and the sum
arranged to touch the (tokens, out) tensors twice (`_dora`). n comes from the weights directly, as an expanded square
with W A^T and A A^T that makes no out x in tensor but W (`dora_norm`; peft forms B A as lora_B(lora_A(eye(in))), an
in x in product, so that FSDP's hooks fire, then W + s B A; scalora's FSDP2 unshards the whole decoder layer before
its forward).
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import warnings
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from . import init_weights, quant


class Wrapper(nn.Module):
    """A module around another: attributes it does not have are read from the wrapped module (`inner` names it), as
    peft's wrappers do (`layer.weight`, `peft_model.config`, `peft_model.generation_config`, ...)."""

    inner = ""
    not_read_through: dict[str, str] = {}  # names never read from the wrapped module, with the reason

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.inner:
                raise
            if name in self.not_read_through:
                raise AttributeError(self.not_read_through[name]) from None
            return getattr(super().__getattr__(self.inner), name)


class FastDropout(nn.Dropout):
    """`nn.Dropout` with its CPU mask drawn from 16-bit random integers, four to one 64-bit draw of torch's generator,
    or below p = 0.15 as the dropped positions themselves (`POSITIONS_BELOW`), instead of torch's `bernoulli_` on
    floats (one 32-bit draw per element): each element is dropped with
    probability p resolved to 2**-16 (`p_drawn`, within 2**-17 of p; torch's float draw resolves it to 2**-24) and
    the kept ones are scaled by 1 / (1 - p_drawn), so that the expectation is x's. Same generator, so gradient
    checkpointing's recomputation, which restores it, draws the same mask. Measured on an AVX512-BF16 CPU
    (bench/dropout.py): the mask costs ~0.4x of an int32 draw per element and dropout with the LoRA A matmul, forward
    and backward, ~0.6x of torch's; backward keeps a boolean mask where torch's CPU dropout keeps a float noise tensor
    and the input. The masks are other draws than torch's, so a run is equal to peft's in distribution, not bitwise:
    scalora's core keeps torch's dropout (peft's numbers from the same seed), the orchestrator switches to this one
    (`train.fast_dropout`). On GPUs, and inside compiled code, torch's."""

    # Below this p the mask is drawn as positions (`drop_at_positions`: about p * numel draws) rather than as a 16-bit
    # draw per element. Measured per mask, dropout applied, (8, 60, 576) and (480, 1536) fp32 (AMD EPYC Zen 5 with
    # avx512_bf16, also with ATEN_CPU_CAPABILITY=avx2 there; the AVX2-only and AMX kinds not measured): positions
    # 0.49-0.57x the per-element draw's time at p = 0.05, 0.69-0.76x at 0.1, even at 0.2, 1.15-1.19x at 0.3.
    POSITIONS_BELOW = 0.15

    @property
    def p_drawn(self) -> float:
        return min(round(self.p * 2**16), 2**16) / 2**16

    def fast(self, x: torch.Tensor) -> bool:
        return self.training and 0 < self.p and x.device.type == "cpu" and not torch.compiler.is_compiling()

    def drop(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`(x with the dropped elements zeroed, the factor the kept ones take)`: dropout(x) is their product; a LoRA
        layer applies the factor to the r columns of `lora_A`'s output instead of x's."""
        if not self.fast(x):
            return super().forward(x), 1.0
        p = self.p_drawn
        if p == 1.0:
            return torch.zeros_like(x), 0.0
        if p < self.POSITIONS_BELOW:
            return self.drop_at_positions(x)[:2]
        n = x.numel()
        # int64 draws over the whole range [-2**63, 2**63): each of a draw's four 16-bit halves is uniform on
        # [-2**15, 2**15), independent of the others; kept where at or above the lowest p * 2**16 of them
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None).view(torch.int16)[:n].view(x.shape)
        keep = bits >= round(p * 2**16) - 2**15
        # `where` keeps only the boolean mask for backward (as torch's dropout does), not a mask in x's dtype
        return torch.where(keep, x, 0.0), 1.0 / (1.0 - p)

    def drop_at_positions(self, x: torch.Tensor) -> tuple[torch.Tensor, float, Optional[torch.Tensor],
                                                          Optional[torch.Tensor]]:
        """`drop(x)`, the boolean mask of the elements kept and the dropped positions, x's flat indices in
        increasing order (the last two None where torch's dropout ran: not on CPU, or compiled), for DoRA's sparse
        product (`_DroppedProduct`), drawn as positions: the gaps between dropped
        elements of a Bernoulli(p) sequence are geometric, floor(log(1 - u) / log(1 - p)) for uniform u, so about
        p * numel uniform draws give them all (then the mask is ones with those positions cleared) instead of a
        draw per element and a search for the dropped ones in the mask (measured per mask with its positions on the
        AVX2 kind: 1.2 against 2.6 ms for 948 x 512, 1.8 against 5.0 ms for 948 x 1376). Each element is dropped
        independently with probability p_drawn, as `drop`'s, from other draws of the same generator
        (gradient checkpointing's recomputation draws the same positions)."""
        if not self.fast(x):
            return super().forward(x), 1.0, None, None
        p, n = self.p_drawn, x.numel()
        if p == 1.0:
            return torch.zeros_like(x), 0.0, torch.zeros_like(x, dtype=torch.bool), torch.arange(n)
        rate = -math.log1p(-p)
        parts, end = [], -1
        while end < n - 1:  # one round but once in ~1e9 (six standard deviations over the mean count)
            left = n - 1 - end
            k = int(left * p + 6 * math.sqrt(left * p * (1 - p)) + 32)
            gaps = torch.rand(k).neg_().log1p_().div_(-rate).long().add_(1)  # >= 1
            pos = gaps.cumsum_(0).add_(end)
            parts.append(pos)
            end = int(pos[-1])
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        flat = flat[:int(torch.searchsorted(flat, n))]
        keep = torch.ones(n, dtype=torch.bool).index_fill_(0, flat, False).view(x.shape)
        return torch.where(keep, x, 0.0), 1.0 / (1.0 - p), keep, flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, factor = self.drop(x)
        return h if factor == 1.0 else h * factor


def use_fused_lora(model: nn.Module) -> int:
    """Compute every LoRA layer of `model` as `addmm(base_layer(x), lora_A(dropout(x)) * scaling, lora_B.weight.T)`:
    peft's sum with its scalars on lora_A's r output columns and lora_B's matmul adding into the base's output (in
    place, `addmm_`, where nothing else can hold that output), so two passes over the (..., out) output and, with
    FastDropout, one over the (..., in) input fewer per layer and direction (bench/lora_layer.py, width 2048 with
    torch's dropout, AVX512-BF16 CPU: 0.93-0.96x peft's layer). Rounded differently from peft's order (fp32: ~1e-7
    relative per layer); the orchestrator's `train.fused_lora`. Returns how many layers."""
    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.fused = True
            n += 1
    return n


def _drop(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """`(dropped x, factor)` with dropout(x) = dropped x * factor: FastDropout leaves the factor to the caller."""
    return dropout.drop(x) if isinstance(dropout, FastDropout) else (dropout(x), 1.0)


class _DropMask:
    """One dropout draw's mask of the elements kept and `ratio`, the dropped input's kept elements over x's; the
    dropped positions (`_dropped_index`, from `flat` where the draw gave them) computed once for every layer that
    reads this draw."""

    __slots__ = ("keep", "ratio", "flat", "_index")

    def __init__(self, keep: torch.Tensor, ratio: float, flat: Optional[torch.Tensor] = None) -> None:
        self.keep, self.ratio, self.flat, self._index = keep, ratio, flat, None

    def index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._index is None:
            self._index = _dropped_index(self.keep, self.flat)
        return self._index


def _drop_with_mask(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float, Optional[_DropMask]]:
    """`(*_drop(dropout, x), its mask or None)`. torch's own `nn.Dropout` on CPU computes x * noise with
    noise = bernoulli(1 - p) / (1 - p) drawn for x's shape; drawing that noise for a tensor of ones takes the same
    numbers from the generator, so x * noise is dropout(x) to the bit (its kept elements x's over 1 - p) and
    noise != 0 its mask."""
    if isinstance(dropout, FastDropout):
        h, factor, keep, flat = dropout.drop_at_positions(x)
        return h, factor, None if keep is None else _DropMask(keep, 1.0, flat)
    if type(dropout) is nn.Dropout and dropout.training and 0 < dropout.p < 1 and x.device.type == "cpu" \
            and not torch.compiler.is_compiling():
        noise = F.dropout(torch.ones_like(x), dropout.p, True)
        return x * noise, 1.0, _DropMask(noise != 0, 1.0 / (1.0 - dropout.p))
    return (*_drop(dropout, x), None)


def use_fast_dropout(model: nn.Module) -> int:
    """Replace the LoRA dropout of every LoRA layer in `model` with `FastDropout` (same p); returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, d in module.lora_dropout.items():
                if type(d) is nn.Dropout:
                    module.lora_dropout[name] = FastDropout(d.p)
                    n += 1
    return n


class SharedDropout:
    """One LoRA dropout mask for sibling LoRA layers that read the same input tensor (q/k/v of an attention block,
    gate/up of an MLP), called in turn: the first draws `dropout(x)`, the others reuse it, and after the last the
    reference is dropped (gradient checkpointing must not find the tensor kept). Each layer's mask has the
    distribution of its own dropout; the layers' masks are the same draw instead of independent ones. A new input,
    another adapter, or more calls than siblings draw afresh; in compiled code each layer draws its own.

    Where every sibling is fused (`use_fused_lora`), their lora_A matmuls on the shared input are one too: the
    first computes `h @ cat(A_q, A_k, A_v).T` and each takes its r columns, so that backward computes h's gradient
    in one matmul instead of three and two sums (not under ZeRO-3, whose hooks gather each lora_A on its call, nor
    under autocast)."""

    group_lora_a = True  # False: each sibling's own lora_A matmul (for measuring, bench/lora_group.py)

    def __init__(self, members: list["LoraLayer"]) -> None:
        self.members = members
        self.size = len(members)
        self.key: Optional[torch.Tensor] = None
        self.adapter: Optional[str] = None
        self.out: Optional[tuple[torch.Tensor, float]] = None
        self.a: Optional[tuple[torch.Tensor, ...]] = None
        self.used = 0

    def __call__(self, dropout: nn.Module, key: torch.Tensor, inp: torch.Tensor, adapter: str, layer: "LoraLayer"
                 ) -> tuple[torch.Tensor, float, Optional[torch.Tensor], Optional[_DropMask]]:
        """`(*_drop(dropout, inp), layer's lora_A output or None, the draw's mask or None)`, drawn by the first
        sibling to read `key` (the mask where a sibling's adapter is DoRA, whose product on the dropped input
        reads it: `LoraLayer._dora`)."""
        if not dropout.training or torch.compiler.is_compiling():
            return (*_drop(dropout, inp), None, None)
        # the same input by its memory, not its Python object: hooks (DeepSpeed ZeRO-3's) hand each module a new
        # tensor object for the same data; `self.key` is held, so no other tensor can take its place meanwhile
        same = self.key is not None and (key.data_ptr(), key.shape, key.stride(), key._version) == (
            self.key.data_ptr(), self.key.shape, self.key.stride(), self.key._version)
        if not same or self.adapter != adapter or self.used >= self.size:
            dora = any(adapter in m.lora_magnitude_vector for m in self.members)
            self.key, self.adapter, self.a, self.used = key, adapter, None, 0
            self.out = _drop_with_mask(dropout, inp) if dora else (*_drop(dropout, inp), None)
            weights = [m.lora_A[adapter].weight if adapter in m.lora_A else None for m in self.members]
            # not under autocast: bf16 matmuls go through oneDNN, which keeps a primitive per shape (and the grouped
            # shapes, new ones, pushed a 30m run's out of its capped cache: 0.94x the padded speed)
            if self.group_lora_a and not torch.is_autocast_enabled(key.device.type) and all(
                    m.fused for m in self.members) and all(
                    w is not None and not hasattr(w, "ds_id") and w.dtype == weights[0].dtype for w in weights):
                self.a = F.linear(self.out[0], torch.cat(weights)).split([w.shape[0] for w in weights], -1)
        h, factor, mask = self.out
        a = self.a[next(i for i, m in enumerate(self.members) if m is layer)] if self.a is not None else None
        self.used += 1
        if self.used >= self.size:
            self.key = self.out = self.a = None
        return h, factor, a, mask


# Attribute names of LoRA layers in one parent module that read the same input (Llama, Mistral, Qwen, Gemma, ...).
SAME_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def share_dropout_masks(model: nn.Module, groups: tuple[tuple[str, ...], ...] = SAME_INPUT) -> int:
    """Give sibling LoRA layers that read the same input one dropout mask (`SharedDropout`); returns how many
    groups. Their dropout must be the same module kind and p."""
    n = 0
    for parent in model.modules():
        for names in groups:
            members = [getattr(parent, a, None) for a in names]
            members = [m for m in members if isinstance(m, LoraLayer)]
            if len(members) < 2:
                continue
            kinds = {(type(d), getattr(d, "p", 0.0)) for m in members for d in m.lora_dropout.values()}
            if len(kinds) != 1:
                continue
            share = SharedDropout(members)
            for m in members:
                m.__dict__["dropout_share"] = share
            n += 1
    return n


class _Phase:
    """One side of a checkpointed call (its forward, or its recomputation in backward) while it runs: the LoRA
    layers called inside look it up (`_current_phase`): to keep or take back their base outputs (`keep`), and
    (`_DroppedProduct`) to know that what they save the forward keeps none of and the recomputation hands to the
    backward that follows it."""

    def __init__(self, kept: dict, recompute: bool, keep: bool = True) -> None:
        self.kept, self.recompute, self.keep = kept, recompute, keep

    def __enter__(self) -> "_Phase":
        _phases.__dict__.setdefault("stack", []).append(self)
        return self

    def __exit__(self, *exc: Any) -> bool:
        _phases.stack.pop()
        return False


_phases = threading.local()  # the recomputation runs in backward, in the thread that runs it


def _current_phase() -> Optional[_Phase]:
    if torch.compiler.is_compiling():  # a compiled layer computes its products itself
        return None
    stack = getattr(_phases, "stack", None)
    return stack[-1] if stack else None


def _keeping_phase() -> Optional[_Phase]:
    """The current phase where it keeps base outputs (`keep_base_outputs_contexts`)."""
    phase = _current_phase()
    return phase if phase is not None and phase.keep else None


def checkpoint_contexts() -> tuple[_Phase, _Phase]:
    """`context_fn` for non-reentrant `torch.utils.checkpoint` (scalora/model.py `enable_checkpointing`): marks the
    checkpointed call's forward and recomputation for the LoRA layers inside, keeping nothing."""
    return _Phase({}, recompute=False, keep=False), _Phase({}, recompute=True, keep=False)


def keep_base_outputs_contexts() -> tuple[_Phase, _Phase]:
    """`context_fn` for non-reentrant `torch.utils.checkpoint` (the orchestrator's `model.keep_base_outputs`): in
    the checkpointed forward every LoRA layer on a 4-bit base keeps its base's output, and the recomputation in
    backward takes it back instead of multiplying by the base weight again: one 4-bit matmul per wrapped layer and
    micro-batch fewer, for tokens x out_features values per wrapped layer held from the forward until its layer's
    backward. (DoRA with dropout computes its product on the dropped input from that output and a sparse product,
    `_DroppedProduct`, which the recomputation computes again; where it cannot, that product is kept too.)

    Backward runs the forward's graph (the recomputation only refills the tensors it saved): the base's own node
    computes its input gradient, as without this. The recomputation must save what the forward saved, tensor for
    tensor: bitsandbytes' 4-bit matmul saves none through autograd's saved-tensor hooks (it keeps the packed weight
    on its context), and the kept output goes back attached to its input (`_Kept`), so that what follows it saves
    what it saved in the forward; a plain or 8-bit base saves its input, so theirs are computed again. The two
    contexts share one store per checkpointed call, and the recomputation replays the forward's calls in order (the
    same RNG state), so each layer takes back its own outputs in turn."""
    kept: dict = {}
    return _Phase(kept, recompute=False), _Phase(kept, recompute=True)


class _Kept(torch.autograd.Function):
    """A 4-bit base's output on x kept from the forward, handed to the recomputation with x as its input, so that
    the recomputed graph has the forward's shape (what needs a gradient, and so what later operations save). Saves
    nothing, as bitsandbytes' 4-bit matmul saves nothing through the hooks. Its backward is the base's (grad @ W,
    as bitsandbytes computes it); checkpointing runs the forward's graph, not this one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ quant.dense_weight(ctx.layer, dtype=grad.dtype), None, None


def _dropped_index(keep: torch.Tensor, flat: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a dropout mask `keep` (..., in) dropped: `(flat, crow, cols)`, the positions in x's elements read in
    row-major order (`flat` if given), and the same as a CSR pattern over its (tokens, in) rows (row offsets,
    columns)."""
    n_in = keep.shape[-1]
    if flat is None:
        flat = (~keep).reshape(-1).nonzero().squeeze(1)  # sorted
    crow = torch.searchsorted(flat, torch.arange(0, keep.numel() + 1, n_in, device=flat.device))
    return flat, crow, flat % n_in


def _transposed(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) as the contiguous (in, out) matrix in `dtype`, a row per input feature (one copy at most)."""
    t = w.t()
    if t.is_contiguous() and t.dtype == dtype:
        return t
    return torch.empty(t.shape, dtype=dtype, device=w.device).copy_(t)


class _DroppedProduct(torch.autograd.Function):
    """W d, the product of a layer's base weight W (out, in) with the part of x that dropout dropped (d: x's values
    where it dropped them, zero elsewhere): a sparse product, the rows of W's transpose summed per token
    (`embedding_bag`), where x' = dropout(x) at rate p leaves p of the elements to it. DoRA's base product on the
    dropped input is then W x' = W x - W d with W x the base's output, instead of a second dense product
    (scalora/core/lora.py `LoraLayer._dora`). With `base`, the base's output W x + bias is computed here too, from
    the same de-quantized W (one de-quantization instead of two), and returned with W x - W d (in d's memory)
    instead of W d.

    Backward: d's gradient (the dropped positions of x) is grad @ W at those positions only (`sampled_addmm`), added
    into the base's dense input gradient where it is computed here. W's transpose is what both read; inside a
    checkpointed call (`checkpoint_contexts`) it is saved through autograd's hooks, so that the forward keeps none of
    it and the recomputation's copy goes to the backward that follows it (one decoder layer's de-quantized weights
    at a time); elsewhere backward de-quantizes W again from the weight tensor read in the forward (nothing of W's
    size held from the forward to the backward). The positions are saved through the hooks too, so that gradient
    checkpointing drops them in the forward and its recomputation draws the same mask again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, flat: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor,
                layer: "LoraLayer", dtype: torch.dtype, base: bool = False):
        # the weight tensor itself, as bitsandbytes' matmul keeps it: FSDP2 swaps the layer's attribute for a shard
        # after the forward and fills this tensor again before the layer's backward
        ctx.layer, ctx.weight, ctx.x_shape, ctx.x_dtype = layer, layer.base_layer.weight, x.shape, x.dtype
        ctx.dtype, ctx.base = dtype, base
        w = layer.dense_weight(ctx.weight, dtype)  # (out, in)
        w_t = _transposed(w, dtype)  # (in, out)
        ctx.keep_w = _current_phase() is not None
        ctx.save_for_backward(flat, crow, cols, *((w_t,) if ctx.keep_w else ()))
        d = F.embedding_bag(cols, w_t, crow, mode="sum", per_sample_weights=torch.take(x, flat).to(dtype),
                            include_last_offset=True)  # (tokens, out)
        if not base:
            return d
        # x W^T with W as the base's own product reads it (F.linear's (out, in), Conv1D's (in, out)), not with the
        # transposed copy: the same matmul kernel as LoRA's base product (in bf16 on the AVX2 kind, measured
        # 480 x 576 by 576 x 1536: 53 ms against 737 ms with the copy; fp32 alike either way)
        wx = torch.mm(x.reshape(-1, x.shape[-1]).to(dtype), w.t())
        prod = torch.sub(wx, d, out=d)  # W x - W d = W x' / ratio, into d's memory
        bias = getattr(layer.base_layer, "bias", None)
        out = wx if bias is None else wx.add_(bias.to(dtype))
        shape = (*x.shape[:-1], out.shape[-1])
        # the base's output in x's dtype, as a 4-bit layer returns it (an fp32 x under bf16 autocast); W x' in the
        # compute dtype, as peft's F.linear under autocast gives it
        return out.view(shape).to(x.dtype), prod.view(shape)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        none = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        flat, crow, cols, *kept = ctx.saved_tensors
        w_t = kept[0] if kept else _transposed(ctx.layer.dense_weight(ctx.weight, ctx.dtype), ctx.dtype)
        n_in = ctx.x_shape[-1]
        if ctx.base:  # d enters W x - W d negated; both outputs are W x's
            grad_out, grad_d = grads
            dense = grad_d if grad_out is None else grad_out if grad_d is None else grad_out + grad_d
            sign = -1
        else:
            dense, grad_d, sign = None, grads[0], 1
        if dense is not None:
            gx = torch.mm(dense.reshape(-1, dense.shape[-1]).to(w_t.dtype), w_t.t()).view(-1)
        else:
            gx = torch.zeros(ctx.x_shape.numel(), dtype=w_t.dtype, device=w_t.device)
        if grad_d is not None:
            with warnings.catch_warnings():  # torch's notes that its CSR support is in beta
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.shape[0], device=grad_d.device),
                                                  (crow.shape[0] - 1, n_in), check_invariants=False)
                # (sampled_addmm has no bf16 CPU kernel: the sampled sums run in fp32; W as the transpose of W's
                # transpose: sampled_addmm reads W's columns, which would otherwise take it a transposed copy)
                vals = torch.sparse.sampled_addmm(pattern, grad_d.reshape(-1, grad_d.shape[-1]).float(),
                                                  w_t.t().float(), beta=0.0).values()
            gx.index_add_(0, flat, vals.to(gx.dtype), alpha=sign)
        return (gx.view(ctx.x_shape).to(ctx.x_dtype), *none)


class LoraLayer(Wrapper):
    """Wraps a `nn.Linear`, `Conv1D`, bitsandbytes `Linear4bit` or `Linear8bitLt` and adds LoRA adapters to it."""

    inner = "base_layer"
    fused = False  # `use_fused_lora`: the same sum in fewer passes, rounded differently from peft

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not quant.is_wrappable(base_layer):
            raise TypeError(f"LoRA wraps linear layers (nn.Linear, Conv1D, bitsandbytes Linear4bit / Linear8bitLt), "
                            f"not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.dora_pending: set[str] = set()  # DoRA magnitudes still to compute (a base on the meta device)
        self.init_pending: dict[str, str] = {}  # adapter -> PiSSA / OLoRA / LoftQ, still to compute (init_weights)
        self.residual_pending: dict[str, str] = {}  # adapter loaded from a file -> PiSSA / OLoRA residual to derive
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.fan_in_fan_out = quant.is_conv1d(base_layer)
        self.in_features, self.out_features = quant.linear_shape(base_layer)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: Union[bool, str], use_rslora: bool, use_dora: bool = False) -> None:
        """Add (or replace) one adapter on this layer. An initialisation from the base weight (PiSSA, OLoRA, LoftQ:
        scalora/core/init_weights.py) and DoRA's magnitude (the row norms of W + scaling * B A, so after that
        initialisation) are left pending when they cannot be computed here: `init_weights.finish` computes them
        once the base is loaded (LoraModel right after adding the adapter; the layer-by-layer loader,
        scalora/loading.py, once the layer's weights are in)."""
        device = _param_device(self.base_layer)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Created as peft creates them (nn.Linear default init, then reset), so that a seed gives peft's weights.
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.init_pending.pop(adapter_name, None)
        if init_weights.kind(init_lora_weights) is not None:
            self.init_pending[adapter_name] = init_lora_weights  # peft draws nothing more for these either
        else:
            self.reset_lora_parameters(adapter_name, init_lora_weights)
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self.dora_pending.discard(adapter_name)
        if use_dora:
            if quant.linear_weight_is_meta(self.base_layer) or adapter_name in self.init_pending:
                self.lora_magnitude_vector[adapter_name] = DoraMagnitude(
                    torch.zeros(self.out_features, device=device, dtype=torch.float32))
                self.dora_pending.add(adapter_name)
            else:
                self.init_dora_magnitude(adapter_name)
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    # --- DoRA -------------------------------------------------------------------------------------------------
    def dense_weight(self, weight: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight de-quantized to fp32 (`dtype`) as (out, in), whatever the base's layout (`weight`: the
        base's weight tensor as read earlier, `quant.dense_weight`)."""
        w = quant.dense_weight(self.base_layer, weight, dtype)
        return w.T if self.fan_in_fan_out else w

    def dora_norm(self, adapter_name: str, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """||W + scaling * B A|| of each output row, fp32, out of autograd (W: `dense_weight()` unless given), from
        the expanded square ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T: W A^T takes the multiply-adds
        B A did, and neither B A nor W + s B A (each out x in fp32, with W three such tensors for a moment, the
        largest layer's of a 70B model ~0.9 GB apiece) is made. Rounding: fp32's on each term; the sum cancels
        only where s B A undoes most of W in a row (n much smaller than ||W_i||), which training does not reach."""
        with torch.no_grad():
            w = self.dense_weight() if w is None else w
            a, b = self.lora_A[adapter_name].weight.float(), self.lora_B[adapter_name].weight.float()
            s = self.scaling[adapter_name]
            square = torch.linalg.vector_norm(w, dim=1).square()
            square += (2 * s) * (b * (w @ a.T)).sum(1)  # (out, r)
            square += (s * s) * ((b @ (a @ a.T)) * b).sum(1)
            return square.clamp_min_(0).sqrt_()

    def _cached_dora_norm(self, name: str) -> torch.Tensor:
        """`dora_norm`, computed again only when A or B hold other values than when it was last computed (compared
        element for element with a copy: optimizers and sharding engines may update them in place without any
        version count to go by) or the base weight is another tensor (a merge replaces it): the micro-batches of
        one optimizer step and gradient checkpointing's recomputation share one de-quantization and B @ A per layer
        instead of one per forward. The comparison costs r * (in + out) element reads against the norm's
        out * in * r multiply-adds; the copy, the adapter's size once more. A value, not a graph (detached)."""
        a, b, w = self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer.weight
        if torch.compiler.is_compiling():
            return self.dora_norm(name)
        cache = self.__dict__.setdefault("_dora_norm_cache", {})
        hit = cache.get(name)
        with torch.no_grad(), _gathered(a, b):
            # (ZeRO-3 puts a gathered weight in new memory each time: the tensor object is the key there; a
            # sharded base is never merged into)
            key = ("ds", id(w)) if hasattr(w, "ds_id") else (w.data_ptr(), w._version, w.shape)
            if hit is None or hit[0] != key or not (torch.equal(hit[1], a) and torch.equal(hit[2], b)):
                with _gathered(w):
                    hit = (key, a.detach().clone(), b.detach().clone(), self.dora_norm(name))
                cache[name] = hit
        return hit[3]

    def init_dora_magnitude(self, adapter_name: str) -> None:
        norm = self.dora_norm(adapter_name)
        if adapter_name in self.lora_magnitude_vector:
            with torch.no_grad():
                self.lora_magnitude_vector[adapter_name].weight.copy_(norm)
        else:
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm)
        self.dora_pending.discard(adapter_name)

    def _base_output(self, tag: str, x: torch.Tensor) -> torch.Tensor:
        """`base_layer(x)`; for a 4-bit base inside `keep_base_outputs_contexts`, kept in the checkpointed forward and
        taken back in its recomputation (`tag` tells a layer's products apart)."""
        phase = _keeping_phase()
        if phase is None or not torch.is_grad_enabled() or not quant.is_4bit(self.base_layer):
            return self.base_layer(x)
        key = (id(self), tag)
        if not phase.recompute:
            out = self.base_layer(x)
            phase.kept.setdefault(key, []).append(out.detach())
            return out
        queue = phase.kept.get(key)
        if not queue:
            return self.base_layer(x)
        out = queue.pop(0)
        return _Kept.apply(x, out, self.base_layer) if x.requires_grad else out

    def _sparse_dropped_ok(self, result: torch.Tensor, h: torch.Tensor) -> bool:
        """Whether W h' may be computed as W x - W d (`_DroppedProduct`): the base's output is W x + bias to the
        precision peft's F.linear has (a 4-bit base in its compute dtype, a plain one; not 8-bit, whose int8
        matmul rounds x), its weight frozen and not sharded (ZeRO-3), in h's dtype or under autocast (where
        peft's product is in the autocast dtype too), on CPU, not compiled (the positions' count is data)."""
        base = self.base_layer
        w = getattr(base, "weight", None)
        return (quant.is_4bit(base) or (not quant.is_quantized(base) and isinstance(w, torch.Tensor))) \
            and not w.requires_grad and not hasattr(w, "ds_id") and h.device.type == "cpu" \
            and (result.dtype == h.dtype or torch.is_autocast_enabled("cpu")) and not torch.compiler.is_compiling()

    def _base_deferred(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The compute dtype of `_DroppedProduct` (with `base`) where the base's output on x is left to it, computed
        from the W it de-quantizes for its sparse product; else None. Left to it where the one active adapter is DoRA
        with dropout drawn on CPU, the base an `nn.Linear`, `Conv1D` or 4-bit layer (their output W x + bias, the
        4-bit one's in x's dtype as its compute dtype) that `_sparse_dropped_ok` admits, called with no hooks, x in the
        adapter's dtype or, under autocast, in the autocast dtype (the products then in it, as the base's own; a
        4-bit base's compute dtype the autocast dtype, x in any float dtype: converted to it, the output in x's, as
        bitsandbytes' layer does), and its output not kept for a recomputation (keep_base_outputs)."""
        names = [n for n in self.active_adapters if n in self.lora_A]
        if len(names) != 1 or names[0] not in self.lora_magnitude_vector or names[0] in self.dora_pending:
            return None
        dropout, base = self.lora_dropout[names[0]], self.base_layer
        if not (type(dropout) is FastDropout and dropout.fast(x) or type(dropout) is nn.Dropout
                and dropout.training and 0 < dropout.p < 1):
            return None
        if not (type(base) is nn.Linear or quant.is_conv1d(base) or quant.is_4bit(base)):
            return None
        compute = getattr(base, "compute_dtype", None) or x.dtype if quant.is_4bit(base) else base.weight.dtype
        autocast = torch.is_autocast_enabled("cpu")
        wanted = torch.get_autocast_dtype("cpu") if autocast else self.lora_A[names[0]].weight.dtype
        # a 4-bit base under autocast takes x in any float dtype: it computes in its compute dtype and returns x's
        # (an fp32 x where the k-bit preparation keeps the norms before q/k/v and gate/up in fp32)
        x_ok = x.dtype == compute or quant.is_4bit(base) and autocast and x.is_floating_point()
        ok = compute == wanted and x_ok and _keeping_phase() is None and not (
                base._forward_hooks or base._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks) and self._sparse_dropped_ok(x, x)
        return compute if ok else None

    def _dora(self, name: str, h: torch.Tensor, factor: float, result: torch.Tensor, dropped: bool,
              sparse: Optional[tuple[torch.Tensor, _DropMask]] = None, a: Optional[torch.Tensor] = None,
              d: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`result` plus DoRA's term for adapter `name`: (m / n - 1) * W h' + (m / n) * scaling * B A h', with
        h' = h * factor the LoRA input after dropout (`factor`: FastDropout's, applied here), W h' read off
        `result` (minus the bias) when there is no dropout. peft's sum, arranged so that the (tokens, out) tensors
        see two elementwise passes (an addcmul and the add of B's product) instead of six: the per-output
        coefficients and `factor` go on the (out,) vector, and scaling * m / n onto B's (out, r) weight, so that
        B's matmul yields its term already scaled. Rounded differently from peft's order (fp32: ~1e-7 relative).

        With dropout, `sparse` = (x, the dropout's mask) where `result` is still the base's own output on x: W h is
        then (W x - W d) times the mask's ratio, W x read off `result` and W d the product with the dropped part
        only (`_DroppedProduct`, p of the elements), instead of a second dense product; backward then runs one
        dense product with W for both terms (autograd sums `result`'s two gradients before the base's backward)
        and the sparse one. `d`: W x - W d itself where `_DroppedProduct` computed it with the base's output
        (`base`), `result` then that output. `a`: lora_A's output on h, where siblings computed theirs as one
        (`SharedDropout`)."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        # ZeRO-3 gathers a module's parameters only inside its own call: the magnitude and B go in through theirs
        zero3 = hasattr(lora_B.weight, "ds_id")
        scale = self.lora_magnitude_vector[name](self._cached_dora_norm(name))  # m / n, (out,)
        bias = getattr(self.base_layer, "bias", None)
        a = lora_A(h) if a is None else a  # (..., r)
        if not dropped:  # result + (m/n - 1) (result - bias) = (m/n) result - (m/n - 1) bias
            new = result * scale if bias is None else torch.addcmul(-(scale - 1) * bias, result, scale)
        else:
            coef = (scale - 1) * factor
            if sparse is not None and (d is not None or self._sparse_dropped_ok(result, h)):
                x, mask = sparse
                if d is None:  # in the autocast dtype where it is on, as peft's F.linear (a 4-bit base's output
                    # is in x's dtype, an fp32 x's where the k-bit preparation keeps the norms in fp32)
                    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else result.dtype
                    d = _DroppedProduct.apply(x, *mask.index(), self, dtype, False)
                    prod = (result if bias is None else result - bias) - d.view(result.shape)
                else:  # W x - W d already
                    prod = d
                coef = coef * mask.ratio
            elif quant.is_4bit(self.base_layer) or zero3:  # (`result` holds another adapter's sum; ZeRO-3)
                # the base's product on the dropped input through bitsandbytes' own 4-bit matmul, which keeps the
                # packed weight for backward (F.linear with the de-quantized W, peft's, keeps that fp32 copy: a
                # layer's worth of memory per layer); the same numbers in its compute dtype
                prod = self._base_output("dropped", h)
                if bias is not None:
                    prod = prod - bias
            else:  # peft's F.linear with W (a plain fp32 weight goes in as itself; 8-bit: its de-quantized copy,
                # as bitsandbytes' int8 matmul would also round the input to int8)
                prod = F.linear(h, self.dense_weight(dtype=h.dtype))
            new = torch.addcmul(result, prod, coef)
        if zero3:  # one more pass over (tokens, out) than folding the coefficients into B's weight
            return new + lora_B(a) * (scale * (self.scaling[name] * factor)).to(a.dtype)
        b = lora_B.weight * (scale * (self.scaling[name] * factor)).unsqueeze(1)  # (out, r)
        if new.dtype == a.dtype:  # B's product added by its matmul (addmm): one pass over (tokens, out) fewer
            return torch.addmm(new.reshape(-1, new.shape[-1]), a.reshape(-1, a.shape[-1]), b.to(a.dtype).t()
                               ).view(new.shape)
        return new + F.linear(a, b.to(a.dtype))

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Union[bool, str]) -> None:
        if init_lora_weights is False:
            return  # both keep nn.Linear's random init: the adapter is not a no-op
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(a, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        # The fused sum adds into the base's output in place where nothing else can hold that tensor: the output of a
        # base whose backward keeps none of it, with no forward hook that could keep it. The base is then called on
        # x's rows as one 2-D matrix, so that its output is the (tokens, out) matrix addmm_ writes into: in place
        # on a view of it instead, autograd copies the whole output in backward (CopySlices), 1.04x slower at 4m.
        # (Not into an output kept for the recomputation: keep_base_outputs_contexts.)
        in_place = self.fused and not self.merged and not args and not kwargs and quant.keeps_no_output(
            self.base_layer) and not (self.base_layer._forward_hooks or nn.modules.module._global_forward_hooks)
        # DoRA with dropout computes the base's output with its product on the dropped input (`_DroppedProduct`), in
        # this dtype (None: the base computes it)
        deferred = None if args or kwargs or self.merged else self._base_deferred(x)
        if args or kwargs or self.merged:
            result = self.base_layer(x, *args, **kwargs)
        elif deferred:
            result, in_place = None, False
        else:
            in_place = in_place and _keeping_phase() is None
            result = self._base_output("base", x.reshape(-1, x.shape[-1]) if in_place else x)
        if self.merged:
            return result
        in_place = in_place and result._base is None  # a fresh output, not a view (8-bit's in eval mode)
        out_shape = (*x.shape[:-1], self.out_features if result is None else result.shape[-1])
        out_dtype = x.dtype if result is None else result.dtype
        # x goes in the adapter's dtype (as peft casts it), except an fp32 adapter under autocast: its matmuls run in
        # the autocast dtype whatever x is, and the cast would only add two copies (11% of a bf16 step on CPU).
        autocast = torch.is_autocast_enabled(x.device.type)
        pristine = True  # `result` is still the base's own output (DoRA's sparse dropped product reads it)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            first, pristine = pristine, False
            if name in self.init_pending or name in self.residual_pending:
                init = self.init_pending.get(name) or self.residual_pending[name]
                raise RuntimeError(f"adapter {name!r}: init_lora_weights={init!r} was never computed (the base was "
                                   "on the meta device; call scalora.core.init_weights.finish after loading it)")
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            keep = autocast and lora_A.weight.dtype == torch.float32
            inp = x if keep else x.to(lora_A.weight.dtype)
            share = self.__dict__.get("dropout_share")
            dropout = self.lora_dropout[name]
            if name in self.lora_magnitude_vector:
                if name in self.dora_pending:
                    raise RuntimeError(f"DoRA adapter {name!r}: its magnitude was never computed (the base was on "
                                       "the meta device; call scalora.core.init_weights.finish after "
                                       "loading it)")
                in_place = False
                dropped = not isinstance(dropout, nn.Identity) and dropout.training and dropout.p > 0
                if share is not None:
                    h, factor, a, mask = share(dropout, x, inp, name, self)
                else:
                    h, factor, mask = _drop_with_mask(dropout, inp) if dropped else (inp, 1.0, None)
                    a = None
                d = None
                if result is None:  # deferred: computed here with the product on the dropped input, if any
                    if mask is not None:
                        result, d = _DroppedProduct.apply(x, *mask.index(), self, deferred, True)
                    else:
                        result = self._base_output("base", x)
                if result.shape != out_shape:
                    result = result.view(out_shape)
                sparse = (inp, mask) if first and mask is not None else None
                result = self._dora(name, h, factor, result, dropped, sparse, a, d)
                continue
            h, factor, a, _ = share(dropout, x, inp, name, self) if share is not None else (
                *_drop(dropout, inp), None, None)
            if not self.fused:  # peft's order of operations, so peft's numbers to the last bit
                if factor != 1.0:
                    h = h * factor
                result = result + lora_B(lora_A(h)) * self.scaling[name]  # (..., out)
                continue
            # The scalars go on lora_A's r output columns rather than on the in- / out-wide tensors, and lora_B's
            # matmul adds into the base's output (addmm): two passes over (..., out) and one over (..., in) fewer.
            a = (lora_A(h) if a is None else a) * (self.scaling[name] * factor)  # (..., r)
            # (not under DeepSpeed ZeRO-3, whose hooks gather lora_B's weight only when lora_B itself is called)
            if result.dtype == (torch.get_autocast_dtype(x.device.type) if autocast else lora_B.weight.dtype) \
                    and not hasattr(lora_B.weight, "ds_id"):
                a2 = a.reshape(-1, a.shape[-1])
                if in_place:  # into the base's own output: no copy of it first (addmm's); autocast casts no
                    # in-place op's arguments, so lora_B's weight (and A's output) go in the output's dtype here
                    result.addmm_(a2.to(result.dtype), lora_B.weight.t().to(result.dtype))
                else:
                    result = torch.addmm(result.reshape(-1, self.out_features), a2, lora_B.weight.t())
            else:  # e.g. an fp32 base output under bf16 autocast: the sum stays in fp32
                result = result + lora_B(a).reshape(result.shape)
        if result.shape != out_shape:  # the fused sums' (tokens, out) matrix
            result = result.view(out_shape)
        return result.to(out_dtype)

    # --- merging ----------------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A in fp32, in the base weight's layout ((in, out) for Conv1D)."""
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = (b.float() @ a.float()) * self.scaling[adapter_name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self, w: torch.Tensor, names: Iterable[str], base: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        """`w` (fp32, the base's layout) with the adapters `names` merged in turn, as peft merges them: LoRA adds
        scaling * B A; DoRA makes (m / n) * (w + scaling * B A) with n the row norms over the unmerged base weight
        `base` (default: `w`), as its forward computes them. Records each DoRA adapter's n for `unmerge`."""
        base = w if base is None else base
        for name in names:
            delta = self.delta_weight(name).to(w.device)
            if name in self.lora_magnitude_vector:
                norm = self.dora_norm(name, base.T if self.fan_in_fan_out else base)
                self.__dict__.setdefault("_dora_norms", {})[name] = norm
                w = self._dora_factor(name, norm) * (w + delta)
            else:
                w = w + delta
        return w

    def _dora_factor(self, name: str, norm: torch.Tensor) -> torch.Tensor:
        """m / n of DoRA adapter `name`, shaped to scale the base weight's output rows in its own layout."""
        factor = (self.lora_magnitude_vector[name].weight.detach().float() / norm).view(-1, 1)
        return factor.T if self.fan_in_fan_out else factor

    def merge(self, safe_merge: bool = True, adapter_names: Optional[Iterable[str]] = None) -> None:
        """Merge the adapters into the base weight. Non-finite results are always refused (`safe_merge` is
        implied)."""
        names = [n for n in (adapter_names or self.active_adapters) if n in self.lora_A and n not in
                 self.merged_adapters]
        if not names:
            return
        w = quant.dense_weight(self.base_layer)
        base = self._unmerged(w) if self.merged_adapters else w
        quant.set_dense_weight(self.base_layer, self.merged_weight(w, names, base))
        self.merged_adapters.extend(names)

    def _unmerged(self, w: torch.Tensor) -> torch.Tensor:
        """`w` with the merged adapters taken out in reverse order (DoRA's with the norms it merged with)."""
        for name in reversed(self.merged_adapters):
            delta = self.delta_weight(name).to(w.device)
            if name in self.lora_magnitude_vector:
                w = w / self._dora_factor(name, self.__dict__["_dora_norms"][name]) - delta
            else:
                w = w - delta
        return w

    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self._unmerged(quant.dense_weight(self.base_layer))
        quant.set_dense_weight(self.base_layer, w, what="unmerged")
        self.merged_adapters = []

    def delete_adapter(self, adapter_name: str) -> None:
        self.dora_pending.discard(adapter_name)
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.r, self.lora_alpha, self.scaling,
                  self.lora_magnitude_vector, self.init_pending, self.residual_pending):
            if adapter_name in d:
                del d[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        if not self.active_adapters and self.lora_A:
            self.active_adapters = [next(iter(self.lora_A))]

    def set_adapter(self, adapter_names: Union[str, list[str]], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.lora_A:
            on = name in names and trainable
            self.lora_A[name].requires_grad_(on)
            self.lora_B[name].requires_grad_(on)
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].requires_grad_(on)
        self.active_adapters = names

    def extra_repr(self) -> str:
        dora = f", dora={sorted(self.lora_magnitude_vector)}" if self.lora_magnitude_vector else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}{dora}"


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and trains a full copy per adapter (`modules_to_save`)."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.update(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._current(), name)

    def _current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        self.modules_to_save[adapter_name].requires_grad_(True)

    def set_adapter(self, adapter_name: str, trainable: bool = True) -> None:
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name and trainable)
        self.active_adapter = adapter_name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._current()(*args, **kwargs)


class DoraMagnitude(nn.Module):
    """DoRA's magnitude vector of one adapter (peft's `lora_magnitude_vector.<adapter>`, the vector its `weight`).
    Called with the row norms n, it returns m / n: inside its own call, where ZeRO-3 has gathered m."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, norm: torch.Tensor) -> torch.Tensor:
        return self.weight / norm


def _gathered(*params: torch.Tensor):
    """DeepSpeed ZeRO-3's whole-parameter context for `params` (read only) where they are sharded by it, else
    nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # one already whole (a small parameter ZeRO-3 keeps whole, one its hooks fetched) is left to its owner: a
    # context that partitioned it again on exit would pull it from under the module using it
    missing = [p for p in params if hasattr(p, "ds_id") and p.ds_status != ZeroParamStatus.AVAILABLE]
    return deepspeed.zero.GatheredParameters(missing, modifier_rank=None) if missing else contextlib.nullcontext()


def _param_device(module: nn.Module) -> torch.device:
    """Where a layer's adapter is created: beside the base weight, or on the CPU for a base still on the meta device
    (filled later, layer by layer), as peft does: the adapter is then initialized from the same random stream as on
    a loaded base."""
    p = next(module.parameters(), None)
    return p.device if p is not None and not p.is_meta else torch.device("cpu")
