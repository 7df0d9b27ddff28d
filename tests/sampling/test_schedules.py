"""Sigma tables, sigma <-> timestep, and ComfyUI's named schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from diffsplit.engine.sampling.schedules import (
    SCHEDULER_NAMES,
    DiscreteSchedule,
    exponential_sigmas,
    karras_sigmas,
    sigmas,
)
from diffsplit.engine.types import ModelSampling

SD = ModelSampling()
SCHEDULE = DiscreteSchedule(SD)


def test_sd_training_sigma_range() -> None:
    assert SCHEDULE.sigma_min == pytest.approx(0.0291672, rel=1e-4)
    assert SCHEDULE.sigma_max == pytest.approx(14.614642, rel=1e-5)
    assert len(SCHEDULE.sigmas) == 1000 and torch.all(SCHEDULE.sigmas[1:] > SCHEDULE.sigmas[:-1])


def test_timestep_of_a_training_sigma_is_its_index_and_back() -> None:
    for index in (0, 1, 250, 777, 999):
        assert float(SCHEDULE.timestep(SCHEDULE.sigmas[index])) == index
        expected = float(SCHEDULE.sigmas[index])
        assert float(SCHEDULE.sigma(torch.tensor(float(index)))) == pytest.approx(expected)


def test_timestep_rounds_to_the_nearest_sigma_in_log_space() -> None:
    low, high = SCHEDULE.sigmas[100], SCHEDULE.sigmas[101]
    just_above_low = low * (high / low) ** 0.4
    assert float(SCHEDULE.timestep(just_above_low)) == 100
    assert float(SCHEDULE.timestep(low * (high / low) ** 0.6)) == 101
    batch = SCHEDULE.timestep(torch.stack([low, high]))
    assert batch.tolist() == [100.0, 101.0] and batch.dtype == torch.float32


def test_fractional_timestep_interpolates_log_sigma() -> None:
    geometric_mean = math.sqrt(float(SCHEDULE.sigmas[10]) * float(SCHEDULE.sigmas[11]))
    assert float(SCHEDULE.sigma(10.5)) == pytest.approx(geometric_mean, rel=1e-5)


def test_percent_to_sigma_like_comfyui() -> None:
    assert SCHEDULE.percent_to_sigma(0.0) > 1e8
    assert SCHEDULE.percent_to_sigma(1.0) == 0.0
    assert SCHEDULE.percent_to_sigma(0.5) == pytest.approx(float(SCHEDULE.sigma(499.5)))
    assert SCHEDULE.percent_to_sigma(0.25) > SCHEDULE.percent_to_sigma(0.75)


def test_normal_matches_comfyui_reference_values() -> None:
    # ComfyUI / A1111 "normal" for SD 1.x at 20 steps (4 decimals).
    reference = [
        14.6146,
        10.7468,
        8.0815,
        6.2050,
        4.8557,
        3.8654,
        3.1238,
        2.5572,
        2.1157,
        1.7648,
        1.4806,
        1.2458,
        1.0481,
        0.8784,
        0.7297,
        0.5964,
        0.4736,
        0.3555,
        0.2322,
        0.0292,
        0.0,
    ]
    assert sigmas(SD, "normal", 20).tolist() == pytest.approx(reference, abs=2e-4)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_every_scheduler_descends_to_zero(name: str, steps: int) -> None:
    values = sigmas(SD, name, steps)
    assert values.dtype == torch.float32
    assert values[-1] == 0 and torch.all(values[:-1] > 0)
    assert torch.all(values[1:] < values[:-1])
    if name != "ddim_uniform":
        assert len(values) == steps + 1


@pytest.mark.parametrize("name", ["normal", "karras", "exponential", "sgm_uniform", "simple"])
def test_schedulers_start_at_sigma_max(name: str) -> None:
    assert float(sigmas(SD, name, 10)[0]) == pytest.approx(SCHEDULE.sigma_max, rel=1e-5)


def test_karras_and_exponential_formulas() -> None:
    karras = karras_sigmas(5, 0.1, 10.0, rho=7.0)
    ramp = torch.linspace(0, 1, 5)
    expected = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(karras[:-1], expected)
    exponential = exponential_sigmas(5, 0.1, 10.0)
    ratios = exponential[1:-1] / exponential[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 0.01 ** (1 / 4)))
    assert karras[-1] == 0 and exponential[-1] == 0
    assert sigmas(SD, "karras", 7)[-2] == pytest.approx(SCHEDULE.sigma_min, rel=1e-5)


def test_normal_ends_at_sigma_min_and_sgm_uniform_does_not() -> None:
    normal = sigmas(SD, "normal", 10)
    sgm = sigmas(SD, "sgm_uniform", 10)
    assert float(normal[-2]) == pytest.approx(SCHEDULE.sigma_min, rel=1e-5)
    # sgm_uniform spaces steps + 1 timesteps and drops the last: its smallest sigma is larger.
    assert float(sgm[-2]) > float(normal[-2]) * 5
    expected = float(SCHEDULE.sigma(torch.linspace(999.0, 0.0, 11)[-2]))
    assert float(sgm[-2]) == pytest.approx(expected, rel=1e-5)


def test_simple_picks_every_nth_training_sigma_from_the_top() -> None:
    values = sigmas(SD, "simple", 4)
    assert values[:-1].tolist() == [float(SCHEDULE.sigmas[i]) for i in (999, 749, 499, 249)]


def test_ddim_uniform_strides_through_the_table_like_comfyui() -> None:
    values = sigmas(SD, "ddim_uniform", 10)
    assert values[:-1].tolist() == [float(SCHEDULE.sigmas[i]) for i in range(901, 0, -100)]
    # 1000 // 7 = 142 does not divide 1000: ComfyUI keeps the extra sigma.
    assert len(sigmas(SD, "ddim_uniform", 7)) == 9


def test_v_prediction_uses_the_same_table() -> None:
    v_model = ModelSampling(prediction_type="v_prediction")
    assert torch.equal(sigmas(v_model, "karras", 5), sigmas(SD, "karras", 5))


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown scheduler 'linear'.*normal"):
        sigmas(SD, "linear", 10)
    with pytest.raises(ValueError, match="steps"):
        sigmas(SD, "normal", 0)


def test_beta_takes_training_sigmas_at_beta_quantiles() -> None:
    from scipy.stats import beta

    values = sigmas(SD, "beta", 10)
    assert float(values[0]) == pytest.approx(SCHEDULE.sigma_max)  # ppf(1) = 1: the last timestep
    for i, value in enumerate(values[:-1].tolist()):
        timestep = round(float(beta.ppf(1 - i / 10, 0.6, 0.6)) * 999)
        assert value == pytest.approx(float(SCHEDULE.sigmas[timestep]))
    # a symmetric Beta(0.6, 0.6) puts the middle quantile at the middle timestep
    assert float(values[5]) == pytest.approx(float(SCHEDULE.sigmas[round(0.5 * 999)]))
    # many steps on 1000 timesteps give repeated timesteps, which are dropped as in ComfyUI
    dense = sigmas(SD, "beta", 900)
    assert len(dense) < 901 and torch.all(dense[1:] < dense[:-1])


def test_linear_quadratic_is_linear_then_quadratic_in_fractions_of_sigma_max() -> None:
    values = sigmas(SD, "linear_quadratic", 8)
    fractions = 1 - values / SCHEDULE.sigma_max
    linear = fractions[:4]
    assert torch.allclose(linear[1:] - linear[:-1], torch.full((3,), 0.025 / 4), atol=1e-6)
    assert float(fractions[4]) == pytest.approx(0.025, abs=1e-6)  # the two parts meet at the threshold
    steps = fractions[4:][1:] - fractions[4:][:-1]
    second = steps[1:] - steps[:-1]
    assert torch.allclose(second, second[0].expand_as(second), atol=1e-5) and float(second[0]) > 0
    assert float(values[0]) == pytest.approx(SCHEDULE.sigma_max) and float(values[-1]) == 0


def test_kl_optimal_is_uniform_in_arctan_sigma() -> None:
    values = sigmas(SD, "kl_optimal", 6)
    angles = torch.atan(values[:-1].double())
    assert torch.allclose(angles[1:] - angles[:-1], (angles[1] - angles[0]).expand(5), atol=1e-6)
    assert float(values[0]) == pytest.approx(SCHEDULE.sigma_max, rel=1e-5)
    assert float(values[-2]) == pytest.approx(SCHEDULE.sigma_min, rel=1e-4)
