"""The numpy DDPM schedule (common/diffusion.py) against closed forms and DiT's respacing."""
import numpy as np
import pytest

from common.diffusion import (
    DiffusionSchedule, ScheduleError, ddim_sigmas, linear_betas, make_schedule, respace, sampling_schedule,
    space_timesteps,
)


def test_linear_betas_endpoints_and_spacing():
    betas = linear_betas(1000)
    assert betas.shape == (1000,) and betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    # Other T keep the same range of noise: beta scaled by 1000/T.
    np.testing.assert_allclose(linear_betas(100)[[0, -1]], [1e-3, 0.2])


def test_closed_forms():
    s = make_schedule(1000, "linear", learn_sigma=True)
    betas = linear_betas(1000)
    alpha_bar = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alphas_cumprod, alpha_bar)
    assert s.alphas_cumprod[-1] == pytest.approx(4.036e-5, rel=1e-3)  # DDPM's alpha_bar_T
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:], alpha_bar[:-1])
    assert s.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_allclose(s.sqrt_alphas_cumprod ** 2 + s.sqrt_one_minus_alphas_cumprod ** 2, 1.0)
    np.testing.assert_allclose(s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod, 1.0)
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / alpha_bar - 1))
    # posterior q(x_{t-1} | x_t, x_0): beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    t = 500
    expected_var = betas[t] * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])
    assert s.posterior_variance[t] == pytest.approx(expected_var)
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == pytest.approx(np.log(s.posterior_variance[1]))
    assert s.posterior_mean_coef1[t] == pytest.approx(np.sqrt(alpha_bar[t - 1]) * betas[t] / (1 - alpha_bar[t]))
    assert s.posterior_mean_coef2[t] == pytest.approx(np.sqrt(1 - betas[t]) * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]))
    # The posterior mean of x_0 itself at x_t = q-mean is consistent: coef1 + coef2*sqrt(abar_t) = sqrt(abar_{t-1})
    assert s.posterior_mean_coef1[t] + s.posterior_mean_coef2[t] * np.sqrt(alpha_bar[t]) == pytest.approx(np.sqrt(alpha_bar[t - 1]))
    np.testing.assert_allclose(s.fixed_large_variance[1:], betas[1:])
    assert s.fixed_large_variance[0] == pytest.approx(s.posterior_variance[1])
    arrays = s.arrays()
    assert all(a.dtype == np.float32 and a.shape == (1000,) for a in arrays.values())


def test_space_timesteps_matches_dit():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == list(range(0, 1000, 4))
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(100, "10") == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    with pytest.raises(ScheduleError, match="ddimN"):
        space_timesteps(1000, "ddim7x")
    with pytest.raises(ScheduleError, match="cannot take exactly 999"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ScheduleError, match="cannot take 20 steps"):
        space_timesteps(10, "20")


def test_respacing_keeps_alpha_bar_on_kept_steps():
    base = make_schedule(1000)
    spaced = respace(base, "250")
    kept = np.asarray(space_timesteps(1000, "250"))
    assert spaced.num_timesteps == 250
    np.testing.assert_array_equal(spaced.timestep_map, kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    ddim = sampling_schedule(base, "ddim", 50)
    np.testing.assert_array_equal(ddim.timestep_map, np.arange(0, 1000, 20))
    assert sampling_schedule(base, "ddpm", None).num_timesteps == 250  # DiT's default
    assert sampling_schedule(base, "ddim", None).num_timesteps == 50
    # Full "1000" respacing is the identity.
    np.testing.assert_allclose(respace(base, "1000").betas, base.betas, rtol=1e-10)


def test_ddim_sigmas():
    s = sampling_schedule(make_schedule(1000), "ddim", 10)
    np.testing.assert_array_equal(ddim_sigmas(s, 0.0), 0.0)
    # eta = 1 gives the DDPM posterior standard deviation.
    np.testing.assert_allclose(ddim_sigmas(s, 1.0) ** 2, s.posterior_variance, rtol=1e-10)


def test_bad_betas_rejected():
    with pytest.raises(ScheduleError, match="betas must lie"):
        DiffusionSchedule(np.array([0.1, 1.5]), np.arange(2))
    with pytest.raises(ScheduleError, match="unknown noise schedule 'sqrt'"):
        make_schedule(1000, "sqrt")


def test_cosine_schedule_closed_form():
    s = make_schedule(1000, "cosine")
    t = np.array([0, 250, 500, 999])
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(s.alphas_cumprod[t[:3]], f((t[:3] + 1) / 1000) / f(0), rtol=1e-9)
    assert s.betas.max() == pytest.approx(0.999) and s.betas[0] > 0
