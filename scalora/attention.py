"""Causal attention example by example, with no T x T mask: `attn_implementation="sdpa_segments"`.

A packed row holds several examples, and a padded row one example and its padding. With torch's SDPA they need a
(B, 1, T, T) mask, and a kernel given a mask computes every query against every key of the row (twice the causal
work of a row, more against its examples), after repeating grouped-query heads' keys and values. Here the batch's
`attention_mask` holds example ids, (B, 1, 1, T) (`data.collate(..., segment_ids=True)`: 1, 2, ... for a row's
examples in order, 0 for padding; 4D so that transformers passes it through untouched), or is a (B, T) padding mask
(the one-example case), and each example runs as its own causal SDPA call on its own tokens: the examples' causal
work only, no mask, grouped-query heads as they are. Padding's outputs are zeros; a one-token example's is its
value (softmax over one key).

Everything else (decoding with a cache, queries and keys of different lengths) goes to transformers' SDPA with the
equivalent mask. `register()` adds it to transformers' `AttentionInterface`; scalora picks it on CPUs in fp32 when
the run config leaves `model.attn_implementation` unset and the layers are not compiled
(`model.attention_implementation`). Measured: BENCHMARKS.md section 6.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.nn import functional as F

NAME = "sdpa_segments"

# The last mask's segments, with the mask held (so that no other tensor takes its memory while it is cached): every
# layer of a forward, and gradient checkpointing's recomputation, read the same mask.
_last: dict[str, Any] = {"mask": None, "version": -1, "rows": None}


def example_ids(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (B, S) example ids a mask holds: a (B, S) padding mask, or scalora's (B, 1, 1, S) ids; None for no mask
    or any other (a (B, 1, T, S) mask, an additive float mask)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask
    if mask.dim() == 4 and mask.shape[1:3] == (1, 1) and not mask.is_floating_point():
        return mask.view(mask.shape[0], mask.shape[-1])
    return None


def segments(mask: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row of a (B, T) or (B, 1, 1, T) mask of example ids, its runs as (start, end, id), id 0 for padding."""
    if _last["mask"] is mask and _last["version"] == mask._version:
        return _last["rows"]
    ids = example_ids(mask).detach().to("cpu", torch.long)
    T = ids.shape[1]
    change = (ids[:, 1:] != ids[:, :-1]).nonzero().tolist()
    cuts: list[list[int]] = [[0] for _ in range(ids.shape[0])]
    for b, t in change:
        cuts[b].append(t + 1)
    values = ids.tolist()
    rows = [[(s, e, values[b][s]) for s, e in zip(c, c[1:] + [T])] for b, c in enumerate(cuts)]
    _last.update(mask=mask, version=mask._version, rows=rows)
    return rows


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, T, D), key / value (B, H_kv, S, D); returns
    ((B, T, H, D), None)."""
    B, H, T, D = query.shape
    readable = attention_mask is None or example_ids(attention_mask) is not None
    if key.shape[2] != T or not readable or kwargs.get("position_bias") is not None \
            or kwargs.get("softcap") is not None:
        return _with_mask(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = H // key.shape[1]
    if attention_mask is None:
        rows = [[(0, T, 1)]] * B
    else:
        rows = segments(attention_mask)
    parts = []
    # unbind and split, not slices: their backward is one stack / cat, where each slice's would fill a whole
    # (B, H, T, D) gradient with zeros
    for row, q, k, v in zip(rows, query.unbind(0), key.unbind(0), value.unbind(0)):
        lengths = [e - s for s, e, _ in row]
        for (s, e, ex), qs, ks, vs in zip(row, q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1)):
            if ex == 0:  # padding
                parts.append(query.new_zeros(e - s, H, value.shape[-1]))
            elif e - s == 1:  # softmax over one key: the value itself
                parts.append(vs.repeat_interleave(groups, 0).transpose(0, 1))
            else:
                out = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout, scale=scaling,
                                                     is_causal=True, enable_gqa=groups > 1)
                parts.append(out[0].transpose(0, 1))  # (L, H, D)
    return torch.cat(parts).view(B, T, H, -1), None


def _with_mask(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """transformers' SDPA with the (B, 1, T, S) boolean mask equivalent to the (B, S) ids (or none): causal,
    aligned on the last query (decoding with a cache), and within the same example."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    T, S = query.shape[2], key.shape[2]
    ids = example_ids(attention_mask)
    i = torch.arange(T, device=query.device)[:, None] + (S - T)  # query positions among the keys
    j = torch.arange(S, device=query.device)[None, :]
    if ids is not None:
        ids = ids[:, -S:].to(torch.long)
        same = ids[:, None, :] == ids[:, -T:, None]  # (B, T, S)
        attention_mask = ((j <= i)[None] & same & (ids[:, None, :] != 0))[:, None]
        attention_mask |= (j == i)[None, None]  # padding queries see themselves: no all-masked softmax
    elif attention_mask is None and T > 1 and S > T:
        attention_mask = (j <= i)[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> str:
    """Register with transformers: the attention function, and for the padding mask of unpacked rows flash
    attention's mask function (the (B, T) mask, or none without padding)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
