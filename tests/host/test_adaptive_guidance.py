"""Adaptive Guidance on the real ComfyUI: CFG until cos(D_cond, D_cfg) on the denoised predictions reaches the
threshold (checked against the predictions the sampler saw), then no unconditional pass for good (counted model
rows); threshold 1 is plain CFG exactly; it composes with the pack's guidance patches."""
import pytest
import torch

from conftest import run_node, sample

STEPS = 8


def ag(model, threshold=0.991):
    return run_node("TrainFreeAdaptiveGuidance", model=model, threshold=threshold)[0]


def report(host, model):
    (only,) = [r for key, r in host.run_reports(model).items() if "adaptive_guidance" in key]
    return only


class Similarities:
    """A post-CFG function ahead of the patch: the cosine of each evaluation's conditional and guided prediction."""

    def __init__(self, model):
        model.set_model_sampler_post_cfg_function(self)
        self.values = []

    def __call__(self, args):
        if args["uncond"] is not None:
            c, d = args["cond_denoised"].flatten(1), args["denoised"].flatten(1)
            self.values.append(float(torch.nn.functional.cosine_similarity(c, d).min()))
        return args["denoised"]


@pytest.mark.parametrize("family", ("sd15", "sdxl", "sd3", "flux"))
def test_threshold_one_is_plain_cfg(tiny, family):
    assert torch.equal(sample(ag(tiny(family), 1.0), family, steps=STEPS), sample(tiny(family), family, steps=STEPS))


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_guidance_stops_at_the_first_step_whose_similarity_reaches_the_threshold(tiny, family, host):
    model = tiny(family).clone()
    seen = Similarities(model)
    sample(model, family, steps=STEPS)
    ordered = sorted(seen.values)
    threshold = (ordered[STEPS // 2 - 1] + ordered[STEPS // 2]) / 2  # a threshold the run crosses part-way
    first = next(i for i, v in enumerate(seen.values) if v >= threshold)
    patched = ag(tiny(family), threshold)
    rows = []

    def per_call(executor, x, *args, **kwargs):
        rows.append(x.shape[0])
        return executor(x, *args, **kwargs)
    import comfy.patcher_extension as pe
    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_rows", per_call)
    out = sample(patched, family, steps=STEPS)
    assert rows == [2] * (first + 1) + [1] * (STEPS - first - 1)  # cond + uncond until it stops, then cond alone
    rep = report(host, patched)
    assert rep["stopped_after"] == first + 1 and rep["saved_passes"] == STEPS - first - 1
    assert not torch.equal(out, sample(tiny(family), family, steps=STEPS))


def test_composes_with_apg_and_pag(tiny, host):
    model = tiny("sd15")
    apg = run_node("TrainFreeAPG", model=model, eta=0.0, norm_threshold=5.0, momentum=-0.5)[0]
    pag = run_node("TrainFreePAG", model=apg, scale=3.0, layers="auto", start_percent=0.0, end_percent=1.0)[0]
    assert torch.equal(sample(ag(pag, 1.0), "sd15", steps=STEPS), sample(pag, "sd15", steps=STEPS))
    patched = ag(pag, 0.5)  # stops at once on the tiny model
    out = sample(patched, "sd15", steps=STEPS)
    assert report(host, patched)["saved_passes"] == STEPS - 1
    assert torch.isfinite(out).all() and not torch.equal(out, sample(pag, "sd15", steps=STEPS))
