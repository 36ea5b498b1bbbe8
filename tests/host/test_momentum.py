"""Momentum samplers on the real ComfyUI: without momentum (beta 1) each is its base solver, checked against core's
own samplers and independent statements of PLMS and DPM-Solver++(2M); momentum changes the result; bad settings
are refused."""
import pytest
import torch

from conftest import run_node
from test_cfgpp import close, core, dpm_solver_pp_2m, run

AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def momentum(solver="dpmpp_2m_hb", order=2, beta=0.8):
    return run_node("TrainFreeMomentumSampler", solver=solver, order=order, beta=beta)[0]


@torch.no_grad()
def plms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """PLMS (Liu et al. 2022) as the momentum paper uses it: Adams-Bashforth on eps with the classic
    coefficients, lower orders while the history fills, x' = x + (sigma' - sigma) e."""
    ones = x.new_ones([x.shape[0]])
    history = []
    for i in range(len(sigmas) - 1):
        eps = (x - model(x, sigmas[i] * ones, **extra_args)) / sigmas[i]
        history.insert(0, eps)
        k = min(order, len(history))
        x = x + (sigmas[i + 1] - sigmas[i]) * sum(c * e for c, e in zip(AB[k], history))
    return x


@pytest.mark.parametrize("family", ("sd15", "sdxl"))
def test_dpmpp_2m_without_momentum_is_core_dpmpp_2m_on_eps_models(tiny, family):
    close(run(tiny(family), family, momentum(beta=1.0), cfg=5.0), run(tiny(family), family, core("dpmpp_2m"), cfg=5.0))


@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_dpmpp_2m_without_momentum_is_the_papers_solver_on_flow_models(tiny, family):
    import comfy.samplers
    close(run(tiny(family), family, momentum(beta=1.0), cfg=5.0),
          run(tiny(family), family, comfy.samplers.KSAMPLER(dpm_solver_pp_2m), cfg=5.0))


@pytest.mark.parametrize("family", ("sd15", "sdxl", "sd3", "flux"))
@pytest.mark.parametrize("solver", ("plms_hb", "ghvb"))
def test_order_one_without_momentum_is_core_euler(tiny, family, solver):
    close(run(tiny(family), family, momentum(solver, 1, 1.0), cfg=5.0), run(tiny(family), family, core("euler"), cfg=5.0))


@pytest.mark.parametrize("family", ("sd15", "flux"))
@pytest.mark.parametrize("order", (2, 3, 4))
def test_plms_and_ghvb_without_momentum_are_plms(tiny, family, order):
    import functools
    import comfy.samplers
    reference = run(tiny(family), family, comfy.samplers.KSAMPLER(functools.partial(plms, order=order)), cfg=5.0)
    for solver in ("plms_hb", "ghvb"):
        close(run(tiny(family), family, momentum(solver, order, 1.0), cfg=5.0), reference)


def test_at_order_one_both_momentum_forms_are_heavy_ball_euler(tiny):
    """With one step of history HB and GHVB coincide: v = (1 - beta) v + beta eps, x' = x + dsigma v."""
    a = run(tiny("sd15"), "sd15", momentum("plms_hb", 1, 0.7), cfg=5.0)
    close(run(tiny("sd15"), "sd15", momentum("ghvb", 1, 0.7), cfg=5.0), a)
    assert not torch.allclose(a, run(tiny("sd15"), "sd15", core("euler"), cfg=5.0), atol=1e-3)


@pytest.mark.parametrize("solver,order", [("dpmpp_2m_hb", 2), ("plms_hb", 4), ("ghvb", 4)])
def test_momentum_changes_the_result_and_patches_upstream_act(tiny, solver, order):
    model = tiny("sd15")
    plain = run(model, "sd15", momentum(solver, order, 1.0), cfg=5.0)
    damped = run(model, "sd15", momentum(solver, order, 0.8), cfg=5.0)
    assert torch.isfinite(damped).all() and not torch.allclose(damped, plain, atol=1e-3)
    pag = run_node("TrainFreePAG", model=model, scale=3.0, layers="auto", start_percent=0.0, end_percent=1.0)[0]
    assert not torch.equal(run(pag, "sd15", momentum(solver, order, 0.8), cfg=5.0), damped)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="set order to 2"):
        momentum("dpmpp_2m_hb", 3)
    with pytest.raises(ValueError, match="beta"):
        momentum("ghvb", 4, 0.0)
