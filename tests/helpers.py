"""Tolerances that follow from the dtype and the size of the computation.

A floating-point result may differ from machine to machine (another kernel, thread count,
instruction set or summation order), so no test compares one against a number that
happened to pass on one machine. The bounds here are the standard a-priori error bounds
of floating-point arithmetic (Higham, *Accuracy and Stability of Numerical Algorithms*,
2nd ed., sec. 3.1 and 4.2), which hold for every summation order a kernel may choose
(recursive, pairwise, blocked, with or without FMA):

- each operation rounds with a relative error of at most the unit roundoff
  ``u = eps / 2`` of its dtype;
- a chain of ``n`` such roundings is bounded by ``gamma_n = n u / (1 - n u)``;
- a sum of ``n`` terms, or an inner product of length ``n``, computed in any order, is
  within ``gamma_n * sum_i |term_i|`` of the exact value (eq. 3.5 and 4.4).

A test computes the exact value in float64 (whose own error is bounded the same way with
float64's ``u``) and asserts the result lies within the bound. The bound is rigorous but
not tight: a correct kernel lands far inside it, and a wrong formula far outside.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

__all__ = [
    "unit_roundoff", "gamma", "sum_error_bound", "softmax_sum_bound", "assert_within",
    "approx_f64", "approx_csv",
]


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: the largest relative error of one rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: bounds ``n`` successive roundings."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"gamma_{n} is undefined in {dtype}: n * u = {nu} >= 1"
    return nu / (1 - nu)


def sum_error_bound(abs_terms: Tensor | float, n: int, dtype: torch.dtype) -> Tensor | float:
    """Bound on ``|computed - exact|`` for a sum (or inner product) of ``n`` terms in
    ``dtype`` whose absolute values sum to ``abs_terms``: ``gamma_n * abs_terms``."""
    return gamma(n, dtype) * abs_terms


def softmax_sum_bound(abs_sum: Tensor | float, n: int, z_abs: float, dtype: torch.dtype
                      ) -> Tensor | float:
    """Bound for ``sum_q x_q softmax_q(z)`` over ``n`` terms in ``dtype``, ``|z_q| <= z_abs``,
    ``abs_sum = sum_q |x_q| softmax_q(z)`` (at most ``max |x|``).

    Rounding ``z_q = lam x_q`` and ``z_q - max z`` moves each exponent by at most
    ``3 z_abs u`` (``|z_q - max z| <= 2 z_abs``), which ``exp`` turns into that relative
    error (``e^(z + d) = e^z e^d``); ``exp`` itself adds at most 2 u (within 1 ulp). The
    normaliser is a sum of ``n`` such terms (``gamma_n`` more) and one division divides
    them: each weight is within ``2 (3 z_abs + 2) u + gamma_(n+1)``; the weighted sum adds
    one product and ``n`` additions, and a ratio of two window means (GFGP's local form)
    two divisions more. ``ceil`` keeps every count an integer."""
    k = 2 * (3 * math.ceil(z_abs) + 2) + 2 * n + 6
    return gamma(k, dtype) * abs_sum


def assert_within(actual: Tensor, exact: Tensor, bound: Tensor | float, what: str = "") -> None:
    """Assert ``|actual - exact| <= bound`` elementwise, the difference taken in float64.

    ``bound`` (a number or a tensor broadcastable to ``actual``) must cover both sides:
    the computation under test and, where ``exact`` is itself a float64 computation,
    its own rounding (:func:`sum_error_bound` with ``torch.float64``)."""
    assert actual.shape == exact.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}")
    err = (actual.double() - exact.double()).abs()
    allowed = torch.as_tensor(bound, dtype=torch.float64).broadcast_to(err.shape)
    worst = int((err - allowed).flatten().argmax())
    assert (err <= allowed).all(), (
        f"{what}: |actual - exact| = {err.flatten()[worst].item():.3e} exceeds the bound "
        f"{allowed.flatten()[worst].item():.3e} at flat index {worst}"
    )


def approx_f64(value: float, ops: int) -> object:
    """``pytest.approx`` for a float64 value that went through ``ops`` roundings on
    either side of the comparison (Python float arithmetic, pandas, a JSON round trip
    that prints ``repr`` and parses it back exactly): relative tolerance ``gamma_ops``."""
    return pytest.approx(value, rel=gamma(ops, torch.float64), abs=0)


def approx_csv(value: float, decimals: int = 4, scale: float = 100.0) -> object:
    """``pytest.approx`` for a number read back from a CSV written with ``%.<decimals>f``
    against the test's own float64 computation of it: printing rounds by at most half a
    unit in the last printed place, and the two float64 computations (on inputs no
    larger than ``scale``; accuracies are at most 100) differ by ``gamma_16 * scale``."""
    return pytest.approx(value, rel=0,
                         abs=0.5 * 10.0**-decimals + gamma(16, torch.float64) * scale)
