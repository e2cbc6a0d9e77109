"""Tolerances for floating-point comparisons, derived from how rounding grows, not from one machine's numbers.

Two evaluations of the same mathematics that differ only in the order of their sums (peft's order of operations
against scalora's, a merged weight against W x + s B (A x), one CPU kind's kernels against another's: oneDNN and
ATen pick AVX2, AVX-512 or AMX code at run time, each with its own blocking and so its own summation order) differ
by rounding alone. How large that difference may be follows from three facts:

- A sum of n terms in a format of unit roundoff u (2**-24 for fp32, 2**-8 for bf16) carries a relative error that
  grows like sqrt(n) * u: its rounding errors are independent with mean zero (Higham and Mary, "A new approach to
  probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019). The worst case, n * u, is not what
  kernels show and would let real bugs through. `LAMBDA` standard deviations of that model are allowed.
- Through `depth` such sums in a row (a network's matmuls, attention's two products, the norms), each stage's
  relative error passes into the next; norms, softmax and residual sums do not amplify it on these small models, so
  the errors add: `depth` times the one-sum error (a bound, since independent errors add in quadrature).
- Both results carry such an error, so they may differ by twice it.

Compared in a norm relative to the quantity's size (||actual - expected|| / ||expected||), so that an element near
zero, where a reordered sum has lost its relative digits to cancellation, does not set the bar.

Every comparison can also be handed what a broken feature gives (`wrong=`): the test then shows that result lies
far outside the tolerance (`MARGIN` times), so the tolerance cannot pass the bug it guards against. Each comparison
is recorded; `SCALORA_TOLERANCE_REPORT=FILE` writes them as JSON lines (the test, the tolerance, the measured
difference and the wrong result's).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
LAMBDA = 4.0  # standard deviations of the probabilistic model allowed
MARGIN = 10.0  # a broken feature's result must lie at least this many tolerances away


def rounding_rtol(n: int, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """The relative (norm) difference two evaluations of the same math may show: `depth` sums of up to `n` terms each
    in a row, both results rounded: 2 * LAMBDA * sqrt(n) * u * depth."""
    return 2 * LAMBDA * math.sqrt(max(n, 1)) * UNIT_ROUNDOFF[dtype] * max(depth, 1)


def operand_rtol(depth: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """As `rounding_rtol` where each of `depth` stages rounds its operands or its output to `dtype` and sums in fp32
    (autocast): one rounding of relative size u per stage, whatever the length of its sums, independent from stage
    to stage so adding in quadrature; both results rounded: 2 * LAMBDA * u * sqrt(depth)."""
    return 2 * LAMBDA * UNIT_ROUNDOFF[dtype] * math.sqrt(max(depth, 1))


def bf16_loss_rtol(step: int) -> float:
    """The relative difference of a training loss at `step` (1, 2, ...) between runs in bf16 that differ by rounding,
    or between bf16 and fp32: a loss is a mean over the batch's tokens, whose independent roundings average out; what
    remains is at most one bf16 rounding (u = 2**-8) of the first forward, and one more for each update that came
    from bf16 gradients."""
    return step * UNIT_ROUNDOFF[torch.bfloat16]


def loss_rtol(model) -> float:
    """The relative difference of a mean cross-entropy computed two ways: the logits' rounding (`logits_rtol`) and
    one more sum, over the vocabulary. Relative to the loss, which assumes the logits' size is at most the loss's,
    as in these short runs of models near their start (losses of 3-10, logits of order 1)."""
    n, depth = model_shape(model)
    cfg = getattr(model, "config", model)
    vocab = getattr(getattr(cfg, "get_text_config", lambda: cfg)(), "vocab_size", n)
    return rounding_rtol(max(n, vocab), depth + 1)


def trained_rtol(model, steps: int, moved: float, grad_rtol: Optional[float] = None) -> float:
    """How far a model's logits may drift after `steps` optimizer steps whose gradients agree to `grad_rtol`
    (default: fp32 rounding, `logits_rtol(backward=True)`), where the training moved them by `moved` (relative to
    their size): the forward's rounding, plus each step's update off by the gradients' relative error, to first order
    (an element Adam moves a long way because its gradient is within rounding of zero changes the outputs only to
    second order: their gradient is zero)."""
    if grad_rtol is None:
        grad_rtol = logits_rtol(model, backward=True)
    return logits_rtol(model) + steps * grad_rtol * moved


def assert_losses_close(got: dict, ref: dict, model, what: str = "losses") -> None:
    """Per-step training losses of two runs that differ by rounding only (another summation order, another process
    count), as {step: loss} or lists: step k within loss_rtol plus (k - 1) updates' worth of gradient rounding
    (`trained_rtol`)."""
    got, ref = (dict(enumerate(x, 1)) if isinstance(x, (list, tuple)) else x for x in (got, ref))
    assert list(got) == list(ref) and len(ref) > 0, (list(got), list(ref))
    first = ref[next(iter(ref))]
    for k, (step, want) in enumerate(ref.items()):
        tol = loss_rtol(model) + k * logits_rtol(model, backward=True) * abs(want - first) / abs(want)
        assert_rounding_close(torch.tensor([got[step]]), torch.tensor([want]), tol, what=f"{what} step {step}")


def model_shape(model) -> tuple[int, int]:
    """(n, depth) of a transformers causal LM (or its config) for `rounding_rtol`: n the longest sum its forward
    makes (the hidden or intermediate width; attention's sums over positions are shorter in these tests), depth the
    sums in a row from the embeddings to the logits (per decoder layer: the input norm, q/k/v, the scores, the
    weighted values, o, the MLP's norm, gate/up, down; then the final norm and the head)."""
    cfg = getattr(model, "config", model)  # a model or its config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return max(hidden, inter), 8 * layers + 2


def logits_rtol(model, backward: bool = False, dtype: torch.dtype = torch.float32) -> float:
    """`rounding_rtol` for a model's logits (or, with backward, its gradients: the same sums again in reverse)."""
    n, depth = model_shape(model)
    return rounding_rtol(n, depth * (2 if backward else 1), dtype)


_RECORDS: list[dict] = []


def rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in the 2-norm, in float64 (an expected zero must be met exactly: 0 or
    inf)."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    diff, scale = (a - e).norm().item(), e.norm().item()
    if scale == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / scale


def _record(what: str, rtol: float, measured: Optional[float], wrong: Optional[float]) -> None:
    _RECORDS.append({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "what": what, "rtol": rtol,
                     "measured": measured, "wrong": wrong})


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, *,
                          wrong: Optional[torch.Tensor] = None, what: str = "", margin: float = MARGIN) -> float:
    """||actual - expected|| <= rtol * ||expected||; with `wrong` (what a broken feature gives, e.g. the merge
    without its scaling), also ||wrong - expected|| >= margin * rtol * ||expected|| (`margin`: MARGIN unless a
    caller says why a loose bound leaves less room). Returns the measured ratio."""
    measured = rel_diff(actual, expected)
    if wrong is None:
        _record(what, rtol, measured, None)
    assert measured <= rtol, f"{what}: relative difference {measured:.3g} > tolerance {rtol:.3g}"
    if wrong is not None:
        assert_wrong_is_far(wrong, expected, rtol, what, measured=measured, margin=margin)
    return measured


def assert_wrong_is_far(wrong: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
                        measured: Optional[float] = None, margin: float = MARGIN) -> float:
    """What a broken feature gives lies at least `margin` (MARGIN) tolerances from the expected result (`measured`:
    the right result's difference, for the report)."""
    far = rel_diff(wrong, expected)
    _record(what, rtol, measured, far)
    assert far >= margin * rtol, (f"{what}: the wrong result is only {far:.3g} away, within {margin:g}x the "
                                  f"tolerance {rtol:.3g}: the test could not tell it from rounding")
    return far


def write_report() -> None:
    path = os.environ.get("SCALORA_TOLERANCE_REPORT")
    if path and _RECORDS:
        with open(path, "a") as f:
            for r in _RECORDS:
                f.write(json.dumps(r) + "\n")
        _RECORDS.clear()
