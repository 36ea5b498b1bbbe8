"""FlowOpt on the real ComfyUI with tiny SD3 and Flux models: zero iterations is plain sampling from the inversion,
the update is the paper's, ||f(x) - y|| falls when the source prompt is the target, passes are counted, and eps
models and impossible settings are refused."""
import pytest
import torch

from conftest import ModelCallCounter, run_node
from harness import tiny_models

FLOW = ("sd3", "flux")
STEPS = 6


@pytest.fixture(scope="module")
def prompts():
    return {f: (tiny_models.conditioning(f, seed=1), tiny_models.conditioning(f, seed=5),
                tiny_models.conditioning(f, seed=2)) for f in FLOW}  # source, target, negative


@pytest.fixture(scope="module")
def inversions(tiny, prompts):
    import comfy.samplers
    found = {}
    for family in FLOW:
        model = tiny(family)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS).float()
        latent = {"samples": torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.8}
        found[family] = run_node("TrainFreeInvert", model=model, positive=prompts[family][0], latent=latent,
                                 sigmas=sigmas, sampler="euler", guidance=1.0, fixed_point_iterations=0)[0]
    return found


def flowopt(model, inversion, positive, cfg=1.0, n_max=4, iterations=3, eta=0.1, negative=None):
    return run_node("TrainFreeFlowOpt", model=model, inversion=inversion, positive=positive, cfg=cfg, n_max=n_max,
                    iterations=iterations, eta=eta, negative=negative)


def recut(inversion, n_start):
    """The inversion as if it had been made on its last steps only (an Inversion built by hand)."""
    import dataclasses
    return dataclasses.replace(inversion, pivots=inversion.pivots[n_start:].clone(),
                               sigmas=inversion.sigmas[n_start:].clone())


def sample_from_inversion(model, inversion, positive, negative, cfg):
    return run_node("TrainFreeSampleFromInversion", model=model, inversion=inversion, positive=positive, cfg=cfg,
                    unconditional="negative prompt", negative=negative)[0]["samples"]


@pytest.mark.parametrize("family", FLOW)
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_zero_iterations_is_sampling_from_the_inversion_pivot(tiny, prompts, inversions, family, cfg):
    source, target, negative = prompts[family]
    inversion = inversions[family]
    latent, optimised = flowopt(tiny(family), inversion, target, cfg=cfg, n_max=4, iterations=0, negative=negative)
    expected = sample_from_inversion(tiny(family), recut(inversion, STEPS - 4), target, negative, cfg)
    assert torch.equal(latent["samples"], expected)
    assert torch.equal(optimised.pivots[0], inversion.pivots[STEPS - 4])
    assert optimised.report["flowopt_errors"] and len(optimised.report["flowopt_errors"]) == 1
    # all steps regenerated: the inversion's own reconstruction
    whole, _ = flowopt(tiny(family), inversion, source, cfg=cfg, n_max=STEPS, iterations=0, negative=negative)
    assert torch.equal(whole["samples"], sample_from_inversion(tiny(family), inversion, source, negative, cfg))


@pytest.mark.parametrize("family", FLOW)
def test_one_iteration_is_the_papers_update_and_the_output_inversion_replays_it(tiny, prompts, inversions, family):
    _, target, negative = prompts[family]
    model, inversion, eta, n_start = tiny(family), inversions[family], 0.05, STEPS - 3
    first, _ = flowopt(model, inversion, target, n_max=3, iterations=0)
    latent, optimised = flowopt(model, inversion, target, n_max=3, iterations=1, eta=eta)
    f0 = model.model.process_latent_in(first["samples"])
    y = inversion.pivots[-1]
    expected = inversion.pivots[n_start] - eta * (f0 - y)  # x <- x - eta (f(x) - y), in the model's latent space
    assert torch.allclose(optimised.pivots[0], expected, atol=1e-5)
    assert torch.equal(optimised.sigmas, inversion.sigmas[n_start:])
    assert not torch.allclose(latent["samples"], first["samples"], atol=1e-3)
    replayed = sample_from_inversion(model, optimised, target, negative, 1.0)
    assert torch.equal(replayed, latent["samples"])


@pytest.mark.parametrize("family", FLOW)
def test_source_prompt_error_falls_over_iterations(tiny, prompts, inversions, family):
    """The inversion task: with the source prompt at cfg 1, ||f(x) - y|| must fall at every iteration. On the tiny
    random models f is close to a well-conditioned map (estimate_step_size_bound here gave mu ~ 1, L ~ 1.2 - 1.6,
    a local bound 2 mu / L^2 of 0.76 - 1.3; Flux already oscillates at 0.6 and diverges at 1), so eta 0.1 falls
    steadily; the official 0.0025 / 0.01 are sized for 1024^2 Flux / SD3, whose flow map is much steeper."""
    source, _, _ = prompts[family]
    _, optimised = flowopt(tiny(family), inversions[family], source, n_max=4, iterations=5, eta=0.1)
    errors = optimised.report["flowopt_errors"]
    assert len(errors) == 6
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.8 * errors[0], errors


@pytest.mark.parametrize("family", FLOW)
def test_default_eta_is_the_official_one_and_still_descends(tiny, prompts, inversions, family):
    source, _, _ = prompts[family]
    _, optimised = flowopt(tiny(family), inversions[family], source, n_max=4, iterations=2, eta=0.0)
    assert optimised.report["flowopt_eta"] == {"flux": 0.0025, "sd3": 0.01}[family]
    errors = optimised.report["flowopt_errors"]
    assert errors[2] < errors[1] < errors[0]


@pytest.mark.parametrize("family", FLOW)
def test_the_estimated_step_size_rule(tiny, prompts, inversions, family):
    """Half the estimated bound 2 mu / L^2 (five more passes): a step the error falls with, reported."""
    source, _, _ = prompts[family]
    model = tiny(family).clone()
    counter = ModelCallCounter(model)
    _, optimised = run_node("TrainFreeFlowOpt", model=model, inversion=inversions[family], positive=source, cfg=1.0,
                            n_max=4, iterations=2, eta=0.0, eta_rule="estimated bound")
    eta = optimised.report["flowopt_eta"]
    assert eta not in (0.0025, 0.01) and 0 < eta < 1
    assert counter.calls == (2 + 1 + 5) * 4 == optimised.report["flowopt_sampling_steps"]
    errors = optimised.report["flowopt_errors"]
    assert errors[2] < errors[1] < errors[0]
    with pytest.raises(ValueError, match="set eta to 0"):
        run_node("TrainFreeFlowOpt", model=model, inversion=inversions[family], positive=source, cfg=1.0, n_max=4,
                 iterations=2, eta=0.1, eta_rule="estimated bound")


@pytest.mark.parametrize("family,cfg,rows", [("sd3", 1.0, 1), ("flux", 1.0, 1), ("sd3", 3.5, 2)])
def test_model_passes(tiny, prompts, inversions, family, cfg, rows):
    _, target, negative = prompts[family]
    model = tiny(family).clone()
    counter = ModelCallCounter(model)
    _, optimised = flowopt(model, inversions[family], target, cfg=cfg, n_max=3, iterations=4, negative=negative)
    assert counter.calls == (4 + 1) * 3 == optimised.report["flowopt_sampling_steps"]
    assert counter.rows == rows * counter.calls


@pytest.mark.parametrize("eps_family", ["sd15", "sdxl"])
def test_eps_models_are_refused(tiny, host, prompts, inversions, eps_family):
    with pytest.raises(host.UnsupportedModel, match="SD3, Flux"):
        flowopt(tiny(eps_family), inversions["sd3"], tiny_models.conditioning(eps_family, seed=1))


def test_impossible_settings_are_refused(tiny, prompts, inversions):
    import dataclasses
    target = prompts["sd3"][1]
    model, inversion = tiny("sd3"), inversions["sd3"]
    with pytest.raises(ValueError, match=f"n_max is {STEPS + 1} but the inversion has {STEPS} steps"):
        flowopt(model, inversion, target, n_max=STEPS + 1)
    with pytest.raises(ValueError, match="connect a negative prompt"):
        flowopt(model, inversion, target, cfg=3.5)
    with pytest.raises(ValueError, match="invert with sampler euler"):
        flowopt(model, dataclasses.replace(inversion, sampler="cfg++"), target)
    with pytest.raises(ValueError, match="another kind of model"):
        flowopt(tiny("flux"), inversion, prompts["flux"][1])
