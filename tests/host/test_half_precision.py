"""Every node on half-precision models, as ComfyUI runs them on a GPU: weights and inference in float16 for the
UNet families and bfloat16 for the DiTs and Wan, and every family in the other dtype as well.

For each node and case the real sampler runs a few steps on a tiny latent, and the test shows: the output is
finite; the patch acts (it moves the result by more than half-precision rounding could); the node's neutral
setting gives the unpatched result bit for bit; the model computed in its own dtype in every pass (the patch did
not widen its tensors) and every denoised prediction the sampler received has the dtype ComfyUI gives it
unpatched (float32: ``BaseModel._apply_model`` widens the diffusion model's output before guidance sees it).
"""
import pytest
import torch

from conftest import run_node
from harness import tiny_models
from test_guidance import AUTO, NEGATIVE, apg, damped, fdg, interval, residual, two_model

F16, BF16 = torch.float16, torch.bfloat16
VIDEO = tiny_models.VIDEO_FAMILY
SINE = "SINE (guide is a fine-tuned model mixed into the prompt branch)"
STEPS, SIZE, FRAMES, CFG = 3, 8, 2, 3.0
# As GPUs run them (float16 UNets, bfloat16 DiTs and Wan), then each family in the other dtype.
CASES = [("sd15", F16), ("sdxl", F16), ("sd3", BF16), ("flux", BF16), (VIDEO, BF16),
         ("sd15", BF16), ("sdxl", BF16), ("sd3", F16), ("flux", F16), (VIDEO, F16)]
IMAGE_CASES = [case for case in CASES if case[0] != VIDEO]


def case_id(case):
    return f"{case[0]}-{str(case[1]).removeprefix('torch.')}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention (the test machine shares two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(pack):
    cache = {}

    def get(family, dtype, seed=0):
        if (family, dtype, seed) not in cache:
            cache[family, dtype, seed] = tiny_models.make_model(family, seed=seed, dtype=dtype)
        return cache[family, dtype, seed]
    return get


class Run:
    """One sampling run, with the dtypes the diffusion model computed in and those of the denoised predictions."""

    def __init__(self, model, family, steps=STEPS, cfg=CFG, second=None):
        import comfy.sample
        video = (FRAMES,) if family == VIDEO else ()
        latent = torch.zeros(1, tiny_models.LATENT_CHANNELS[family], *video, SIZE, SIZE)
        self.model_dtypes, self.denoised_dtypes = set(), set()
        hooks = [m.model.diffusion_model.register_forward_hook(
            lambda module, args, out: self.model_dtypes.add(out.dtype)) for m in (model, second) if m is not None]
        try:
            self.out = comfy.sample.sample(
                model, comfy.sample.prepare_noise(latent, 0), steps, cfg, "euler", "normal",
                tiny_models.conditioning(family, seed=1), tiny_models.conditioning(family, seed=2), latent, seed=0,
                callback=lambda step, x0, x, total: self.denoised_dtypes.add(x0.dtype), disable_pbar=True)
        finally:
            for hook in hooks:
                hook.remove()


@pytest.fixture(scope="module")
def plain(models):
    cache = {}

    def get(family, dtype, steps=STEPS, cfg=CFG):
        if (family, dtype, steps, cfg) not in cache:
            cache[family, dtype, steps, cfg] = Run(models(family, dtype), family, steps, cfg)
        return cache[family, dtype, steps, cfg]
    return get


def check(run, reference, dtype, acts):
    """``run`` has ``dtype`` inside the model and ComfyUI's dtypes outside it; it acts (moves the result by more
    than 1 % of its range, far above half-precision rounding), or it is ``reference`` bit for bit."""
    assert run.model_dtypes == {dtype}, "the patch changed the dtype the model computes in"
    assert run.denoised_dtypes == reference.denoised_dtypes and run.out.dtype == reference.out.dtype
    assert torch.isfinite(run.out).all()
    if acts:
        assert (run.out - reference.out).abs().max() > 0.01 * reference.out.abs().max()
    else:
        assert torch.equal(run.out, reference.out)


def test_the_models_run_in_their_dtype(models, plain):
    for family, dtype in CASES:
        net = models(family, dtype).model.diffusion_model
        assert models(family, dtype).model.get_dtype() == dtype
        floats = [p for p in net.parameters() if p.dtype.is_floating_point]
        assert sum(p.dtype == dtype for p in floats) > 0.9 * len(floats)  # Wan keeps its patch embedding in float32
        run = plain(family, dtype)
        assert run.model_dtypes == {dtype} and torch.isfinite(run.out).all()
        assert run.denoised_dtypes == {torch.float32}  # ComfyUI widens the model's output for the sampler
        full = Run(tiny_models.make_model(family), family)
        assert (run.out - full.out).abs().max() > 0, "the half model must differ from the float32 one"


def pag(model, scale=2.0, start=0.0, end=1.0, **optional):
    return run_node("TrainFreePAG", model=model, scale=scale, layers="auto", start_percent=start, end_percent=end,
                    **optional)[0]


@pytest.mark.parametrize("case", IMAGE_CASES, ids=case_id)
def test_pag(models, plain, case):
    family, dtype = case
    model, reference = models(family, dtype), plain(family, dtype)
    guided = Run(pag(model), family)
    check(guided, reference, dtype, acts=True)
    damped_and_rescaled = Run(pag(model, adaptive_scale=0.0005, rescale=0.7), family)
    check(damped_and_rescaled, guided, dtype, acts=True)  # the adaptive scale and the rescale statistics act
    check(Run(pag(model, start=1.0, end=1.0), family), reference, dtype, acts=False)  # empty window
    check(Run(pag(model, scale=0.0), family), reference, dtype, acts=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_apg(models, plain, case):
    family, dtype = case
    model, reference = models(family, dtype), plain(family, dtype)
    check(Run(apg(model), family), reference, dtype, acts=True)
    check(Run(apg(model, 1.0, 0.0, 0.0), family), reference, dtype, acts=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fdg(models, plain, case):
    family, dtype = case
    model, reference = models(family, dtype), plain(family, dtype)
    check(Run(fdg(model), family), reference, dtype, acts=True)
    check(Run(fdg(model, eta_low=0.5, eta_high=0.5), family), reference, dtype, acts=True)
    check(Run(fdg(model, CFG, CFG), family), reference, dtype, acts=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_guidance_interval(models, plain, case):
    family, dtype = case
    model, reference = models(family, dtype), plain(family, dtype)
    check(Run(interval(model, 0.0, 1.0), family), reference, dtype, acts=True)  # the first step is above 1
    check(Run(interval(model, 0.0, 1000.0), family), reference, dtype, acts=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_noise_damped_cfg(models, plain, case):
    family, dtype = case
    model, reference, weak = models(family, dtype), plain(family, dtype), models(family, dtype, seed=7)
    check(Run(damped(model, weak), family), reference, dtype, acts=True)
    check(Run(damped(model, weak, 0.0), family), reference, dtype, acts=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_residual_cfg(models, plain, case):
    family, dtype = case
    model, reference = models(family, dtype), plain(family, dtype)
    check(Run(residual(model), family), reference, dtype, acts=True)
    check(Run(residual(model, "self-negative"), family), reference, dtype, acts=True)
    # one-time negative with delta 1 is CFG on its first step, where it takes its anchor
    check(Run(residual(model), family, steps=1), plain(family, dtype, steps=1), dtype, acts=False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_two_model_guidance(models, plain, case):
    family, dtype = case
    model, reference, guide = models(family, dtype), plain(family, dtype), models(family, dtype, seed=7)
    for mode in (AUTO, NEGATIVE, SINE):
        check(Run(two_model(model, guide, mode), family), reference, dtype, acts=True)
    # an identical guide in the prompt branch leaves the conditional prediction alone
    check(Run(two_model(model, model.clone(), AUTO), family), plain(family, dtype, cfg=1.0), dtype, acts=False)
    # at cfg 1 the negative model is not asked, and SINE with weight v = 1 keeps the main model's prediction
    check(Run(two_model(model, guide, NEGATIVE), family, cfg=1.0), plain(family, dtype, cfg=1.0), dtype, acts=False)
    sine = two_model(model, guide, SINE, sine_weight=1.0)
    check(Run(sine, family), reference, dtype, acts=False)


def test_second_models_in_another_dtype(models, plain):
    """A weak or guide model loaded in another dtype than the main one: ComfyUI casts each model's input to its
    own dtype and widens each output, so the predictions still combine."""
    model, reference, other = models("sd15", F16), plain("sd15", F16), models("sd15", BF16, seed=7)
    for patched in (damped(model, other), two_model(model, other, AUTO), two_model(model, other, SINE)):
        run = Run(patched, "sd15", second=other)
        assert run.model_dtypes == {F16, BF16} and torch.isfinite(run.out).all()
        assert (run.out - reference.out).abs().max() > 0.01 * reference.out.abs().max()


@pytest.mark.parametrize("case", IMAGE_CASES, ids=case_id)
def test_caches(models, plain, case):
    """DeepCache (UNets) and the block cache (DiTs) keep the model's dtype in what they cache and serve."""
    from test_cache import cache
    family, dtype = case
    model, reference = models(family, dtype), plain(family, dtype)
    check(Run(cache(model, family, interval=2), family), reference, dtype, acts=True)
    check(Run(cache(model, family, interval=1), family), reference, dtype, acts=False)


@pytest.mark.parametrize("case", IMAGE_CASES, ids=case_id)
def test_adaptive_guidance(models, plain, case):
    """The similarity is taken in float64 from half-precision predictions; stopping guidance keeps the dtypes."""
    family, dtype = case
    model, reference = models(family, dtype), plain(family, dtype)

    def ag(threshold):
        return run_node("TrainFreeAdaptiveGuidance", model=model, threshold=threshold)[0]
    stopped = Run(ag(0.5), family)  # the tiny models align at once: CFG stops after the first step
    assert stopped.model_dtypes == {dtype} and stopped.denoised_dtypes == reference.denoised_dtypes
    assert torch.isfinite(stopped.out).all() and not torch.equal(stopped.out, reference.out)
    check(Run(ag(1.0), family), reference, dtype, acts=False)
