"""The two forgetting laws of arXiv 2401.05605, fitted with scipy: pure functions over arrays.

Law 1 (linear): ``L_f = -c * L_ft + s``. Forgetting ``L_f`` falls on a line against the
fine-tuning loss ``L_ft``: the lower the fine-tuning loss, the more is forgotten (c > 0).

Law 2 (shifted power law in trainable parameters P and update steps N)::

    L(P, N) = c * ((a / P)^alpha + (b / N)^beta)^rho + s

The fine-tuning loss falls with P and N (c > 0); forgetting, being linear in it with a negative
slope, rises (c < 0). ``c``, ``a`` and ``b`` are not separately identifiable: multiplying ``c`` by
``k``, ``a`` by ``k^(-1/(alpha*rho))`` and ``b`` by ``k^(-1/(beta*rho))`` leaves every prediction
unchanged. The fit therefore fixes ``|c| = 1`` and reports its sign; ``a`` and ``b`` carry the
scale, and the exponents ``alpha``, ``beta``, ``rho`` and the shift ``s`` are what compares across
fits (and with the paper).

How the power law is fitted: least squares on the loss itself (the shift ``s`` makes a fit of
``log L`` meaningless near the asymptote), over the log of the positive constants (a, alpha, b,
beta, rho), so a search spans orders of magnitude; ``s`` is solved exactly for every trial
(variable projection), both signs of ``c`` are tried, and a grid of starting exponents guards
against local minima, which this law has many of. The term is evaluated as
``exp(rho * logaddexp(alpha log(a/P), beta log(b/N)))`` so extreme trials cannot overflow.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats

from loramoe.errors import UsageError

_POWER_NAMES = ("a", "alpha", "b", "beta", "rho")
_EXPONENT_STARTS = (0.05, 0.3, 1.0)
_RHO_STARTS = (0.5, 2.0, 8.0)
_LOG_LIMIT = 60.0  # exp(60) ~ 1e26: far beyond any loss, still finite


@dataclass(frozen=True)
class LinearFit:
    """``L_f = -c * L_ft + s``."""

    c: float
    s: float
    r2: float
    residuals: list[float]
    points: int
    c_stderr: float
    s_stderr: float

    def predict(self, fine_tuning_loss: ArrayLike) -> np.ndarray:
        return -self.c * np.asarray(fine_tuning_loss, dtype=float) + self.s

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PowerLawFit:
    """``L = c * ((a/P)^alpha + (b/N)^beta)^rho + s`` with ``|c| = 1`` (see the module docstring)."""

    c: float
    a: float
    alpha: float
    b: float
    beta: float
    rho: float
    s: float
    r2: float
    residuals: list[float]
    points: int
    stderr: dict[str, float]
    """Standard errors of the fitted constants from the Jacobian at the optimum (inf where the
    data do not pin a constant down)."""
    undetermined: list[str]
    """Constants the data do not determine: on a bound of the search, or with a standard error
    larger than the value (e.g. ``a`` and ``alpha`` when the loss does not change with P, where
    the law degenerates to a simpler one)."""

    def predict(self, params: ArrayLike, steps: ArrayLike) -> np.ndarray:
        return _power_law(np.asarray(params, dtype=float), np.asarray(steps, dtype=float), self.c,
                          (math.log(self.a), math.log(self.alpha), math.log(self.b), math.log(self.beta),
                           math.log(self.rho))) + self.s

    def to_dict(self) -> dict:
        return asdict(self)


def _as_array(name: str, values: ArrayLike) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise UsageError(f"{name} must be a 1-D series, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise UsageError(f"{name} holds a non-finite value ({array[bad[0]]}) at index {bad[0]}")
    return array


def _check_series(n_params: int, **series: np.ndarray) -> None:
    lengths = {name: len(values) for name, values in series.items()}
    if len(set(lengths.values())) != 1:
        raise UsageError(f"series of different lengths: {lengths}")
    n = next(iter(lengths.values()))
    if n <= n_params:
        raise UsageError(f"{n} points for a law with {n_params} parameters: need at least {n_params + 1}")


def _check_varies(name: str, values: np.ndarray) -> None:
    if np.ptp(values) <= 1e-12 * max(1.0, float(np.abs(values).max())):
        raise UsageError(f"{name} is constant ({values[0]}): nothing to fit")


def _r2(y: np.ndarray, residuals: np.ndarray) -> float:
    return float(1.0 - np.sum(residuals**2) / np.sum((y - y.mean()) ** 2))


def fit_linear_law(fine_tuning_loss: ArrayLike, forgetting: ArrayLike) -> LinearFit:
    """Least-squares fit of ``forgetting = -c * fine_tuning_loss + s`` (law 1)."""
    x = _as_array("fine_tuning_loss", fine_tuning_loss)
    y = _as_array("forgetting", forgetting)
    _check_series(2, fine_tuning_loss=x, forgetting=y)
    _check_varies("fine_tuning_loss", x)
    _check_varies("forgetting", y)
    result = stats.linregress(x, y)
    residuals = y - (result.slope * x + result.intercept)
    return LinearFit(c=float(-result.slope), s=float(result.intercept), r2=_r2(y, residuals),
                     residuals=residuals.tolist(), points=len(x), c_stderr=float(result.stderr),
                     s_stderr=float(result.intercept_stderr))


def _power_law(params: np.ndarray, steps: np.ndarray, sign: float, theta) -> np.ndarray:
    log_a, log_alpha, log_b, log_beta, log_rho = theta
    term_p = math.exp(log_alpha) * (log_a - np.log(params))
    term_n = math.exp(log_beta) * (log_b - np.log(steps))
    log_term = math.exp(log_rho) * np.logaddexp(term_p, term_n)
    return sign * np.exp(np.minimum(log_term, _LOG_LIMIT))


def _projected_residuals(theta, params, steps, y, sign) -> np.ndarray:
    """Residuals with the shift ``s`` at its exact least-squares value for this ``theta``."""
    shape = _power_law(params, steps, sign, theta)
    return y - shape - np.mean(y - shape)


def _full_residuals(x, params, steps, y, sign) -> np.ndarray:
    return y - _power_law(params, steps, sign, x[:5]) - x[5]


def _stderr(result, n: int) -> np.ndarray:
    """Standard errors of (a, alpha, b, beta, rho, s) from the Jacobian at the optimum; the
    first five are searched as logs, hence the factor exp(x) (delta method). inf where the data
    leave a direction undetermined."""
    variance = 2 * result.cost / max(n - len(result.x), 1)
    covariance = np.linalg.pinv(result.jac.T @ result.jac) * variance
    errors = np.sqrt(np.clip(np.diag(covariance), 0, None)) * np.r_[np.exp(result.x[:5]), 1.0]
    if np.linalg.matrix_rank(result.jac) < len(result.x):
        errors[np.abs(np.linalg.svd(result.jac)[2][-1]) > 1e-3] = np.inf
    return errors


def fit_power_law(params: ArrayLike, steps: ArrayLike, loss: ArrayLike) -> PowerLawFit:
    """Least-squares fit of ``loss = c * ((a/params)^alpha + (b/steps)^beta)^rho + s`` (law 2),
    ``|c| = 1``. Needs at least two distinct parameter counts and two distinct step counts."""
    p = _as_array("params", params)
    n = _as_array("steps", steps)
    y = _as_array("loss", loss)
    _check_series(6, params=p, steps=n, loss=y)
    if (p <= 0).any() or (n <= 0).any():
        raise UsageError("params and steps must be positive (exclude step 0 before fitting)")
    _check_varies("params", p)
    _check_varies("steps", n)
    _check_varies("loss", y)
    p_mid, n_mid = float(np.exp(np.log(p).mean())), float(np.exp(np.log(n).mean()))
    lower = np.array([math.log(p.min()) - 30, math.log(1e-3), math.log(n.min()) - 30, math.log(1e-3), math.log(1e-2)])
    upper = np.array([math.log(p.max()) + 30, math.log(10.0), math.log(n.max()) + 30, math.log(10.0), math.log(100.0)])
    best = None
    for sign, alpha, beta, rho in itertools.product((1.0, -1.0), _EXPONENT_STARTS, _EXPONENT_STARTS, _RHO_STARTS):
        start = np.array([math.log(p_mid), math.log(alpha), math.log(n_mid), math.log(beta), math.log(rho)])
        with np.errstate(over="ignore", invalid="ignore"):
            result = optimize.least_squares(_projected_residuals, start, bounds=(lower, upper),
                                            args=(p, n, y, sign), method="trf", x_scale="jac")
        if np.isfinite(result.cost) and (best is None or result.cost < best[1].cost):
            best = (sign, result)
    sign, result = best
    shift = float(np.mean(y - _power_law(p, n, sign, result.x)))
    # one last pass with the shift as a parameter too, for the Jacobian the errors come from
    final = optimize.least_squares(_full_residuals, np.r_[result.x, shift], args=(p, n, y, sign), method="trf",
                                   bounds=(np.r_[lower, -np.inf], np.r_[upper, np.inf]), x_scale="jac")
    residuals = _full_residuals(final.x, p, n, y, sign)
    constants = dict(zip(_POWER_NAMES, np.exp(final.x[:5]).tolist()))
    errors = dict(zip((*_POWER_NAMES, "s"), _stderr(final, len(y)).tolist()))
    undetermined = [name for name, x, low, high in zip(_POWER_NAMES, final.x, lower, upper)
                    if min(x - low, high - x) < 1e-3 or not errors[name] <= constants[name]]
    # a term that adds nothing over the data leaves both its constants free, whatever the
    # Jacobian's rounding says of its exponent
    term_p = (constants["a"] / p) ** constants["alpha"]
    term_n = (constants["b"] / n) ** constants["beta"]
    for names, term in ((("a", "alpha"), term_p), (("b", "beta"), term_n)):
        if np.max(term / (term_p + term_n)) < 1e-6:
            undetermined += [name for name in names if name not in undetermined]
    return PowerLawFit(c=sign, **constants, s=float(final.x[5]), r2=_r2(y, residuals), residuals=residuals.tolist(),
                       points=len(y), stderr=errors, undetermined=undetermined)
