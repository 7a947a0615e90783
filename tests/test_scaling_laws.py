"""The forgetting laws' fitters: known constants back from data the laws generate, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loramoe.scaling.laws import PowerLawFit, fit_linear_law, fit_power_law

SIZES = np.array([2e4, 4e4, 8e4, 1.6e5, 3.2e5])
STEPS = np.array([10.0, 15.0, 20.0, 25.0, 30.0, 40.0])
GRID_P, GRID_N = (g.ravel() for g in np.meshgrid(SIZES, STEPS, indexing="ij"))


def _law(c, a, alpha, b, beta, rho, s):
    return c * ((a / GRID_P) ** alpha + (b / GRID_N) ** beta) ** rho + s


def test_linear_law_recovers_the_papers_openorca_constants():
    ft = np.linspace(0.9, 1.4, 30)
    noise = np.random.default_rng(0).normal(0, 0.002, ft.shape)
    fit = fit_linear_law(ft, -1.733 * ft + 2.048 + noise)
    assert fit.c == pytest.approx(1.733, rel=0.05)
    assert fit.s == pytest.approx(2.048, rel=0.05)
    assert fit.r2 > 0.99
    assert len(fit.residuals) == 30 and np.allclose(fit.predict(ft) + fit.residuals, -1.733 * ft + 2.048 + noise)


TRUE_LAWS = {
    "forgetting (rises)": dict(c=-1.0, a=5e3, alpha=0.5, b=20.0, beta=0.8, rho=1.5, s=2.6),
    "fine-tuning loss (falls)": dict(c=1.0, a=1e5, alpha=0.3, b=8.0, beta=0.6, rho=2.0, s=1.2),
}


@pytest.mark.parametrize("name", sorted(TRUE_LAWS))
def test_power_law_recovers_known_constants_within_5_percent(name):
    true = TRUE_LAWS[name]
    y = _law(**true)
    y = y + np.random.default_rng(1).normal(0, 1e-5 * np.ptp(y), y.shape)
    fit = fit_power_law(GRID_P, GRID_N, y)
    for key, value in true.items():
        assert getattr(fit, key) == pytest.approx(value, rel=0.05), key
    assert fit.r2 > 0.999 and fit.undetermined == []
    assert np.allclose(fit.predict(GRID_P, GRID_N), y - np.array(fit.residuals))


def test_a_loss_that_ignores_the_parameter_count_leaves_the_p_term_undetermined():
    y = -((20.0 / GRID_N) ** 0.8) + 2.6 + np.random.default_rng(2).normal(0, 1e-3, GRID_N.shape)
    fit = fit_power_law(GRID_P, GRID_N, y)
    assert fit.r2 > 0.99 and {"a", "alpha"} <= set(fit.undetermined)
    assert np.allclose(fit.predict(np.full(6, 2e4), STEPS), fit.predict(np.full(6, 3.2e5), STEPS), atol=1e-3)


def test_power_law_prediction_matches_its_formula():
    fit = PowerLawFit(c=-1.0, a=3.0, alpha=0.2, b=7.0, beta=0.4, rho=2.0, s=5.0, r2=1.0, residuals=[], points=0,
                      stderr={}, undetermined=[])
    expected = -((3.0 / 100) ** 0.2 + (7.0 / 20) ** 0.4) ** 2.0 + 5.0
    assert fit.predict([100.0], [20.0])[0] == pytest.approx(expected, rel=1e-12)


def test_c_a_and_b_trade_off_exactly_which_is_why_c_is_fixed():
    base = dict(c=1.0, a=5e3, alpha=0.5, b=20.0, beta=0.8, rho=1.5, s=2.6)
    k = 3.0
    scaled = dict(base, c=k, a=base["a"] * k ** (-1 / (base["alpha"] * base["rho"])),
                  b=base["b"] * k ** (-1 / (base["beta"] * base["rho"])))
    assert np.allclose(_law(**base), _law(**scaled), rtol=1e-12)


@pytest.mark.parametrize("fit, args, message", [
    (fit_linear_law, ([1.0, 2.0], [3.0, 1.0]), "2 points for a law with 2 parameters"),
    (fit_linear_law, ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]), "fine_tuning_loss is constant"),
    (fit_linear_law, ([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]), "forgetting is constant"),
    (fit_linear_law, ([1.0, 2.0, math.nan, 4.0], [1.0, 2.0, 3.0, 4.0]), "non-finite value (nan) at index 2"),
    (fit_linear_law, ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]), "different lengths"),
    (fit_power_law, (GRID_P[:6], GRID_N[:6], np.arange(6.0)), "6 points for a law with 6 parameters"),
    (fit_power_law, (np.full(30, 1e4), GRID_N, GRID_N ** -0.5), "params is constant"),
    (fit_power_law, (GRID_P, np.full(30, 10.0), GRID_P ** -0.5), "steps is constant"),
    (fit_power_law, (GRID_P, GRID_N, np.full(30, 3.0)), "loss is constant"),
    (fit_power_law, (GRID_P, GRID_N - 10, GRID_N), "must be positive"),
    (fit_power_law, (GRID_P, GRID_N, np.where(GRID_N > 30, np.inf, 1.0)), "non-finite value (inf)"),
])
def test_degenerate_input_is_refused_clearly(fit, args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit(*args)
