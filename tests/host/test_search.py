"""The search samplers (Diffusion Tree Sampling, Latent Beam Search, best-of-N) on the real ComfyUI and tiny models:
a budget of one path is ComfyUI's euler_ancestral bit for bit (four families); the evaluations ComfyUI's guider
makes (counted by a post-CFG hook, rows per call) are those the report charges and never exceed the budget; a seed
gives the same image and another seed another; the returned image is the best the search scored (re-scored here
from the latent it returns), and beats a single path on average for a scorer stated here (brightness); progress,
interrupt and refusals."""
import pytest
import torch

from conftest import EveryEvaluation, run_node
from harness import tiny_models

SIZE, STEPS = 8, 3
VAES = {}
NODES = {"tree": ("TrainFreeDiffusionTreeSampling", {"mode": "search (DTS*)", "lambda": 1.0, "max_children": 2}),
         "beam": ("TrainFreeLatentBeamSearch", {"beams": 2, "candidates": 2, "lookahead": 2}),
         "best_of_n": ("TrainFreeBestOfN", {})}


class Brightness:
    """A scorer stated independently of the pack: the mean pixel value of the decoded image."""
    reads, differentiable = "pixels", False

    def __init__(self, on_score=None):
        self.on_score, self.calls = on_score, 0

    def score(self, pixels):
        self.calls += 1
        if self.on_score is not None:
            self.on_score(self.calls)
        return pixels.mean(dim=(1, 2, 3))

    def describe(self):
        return "brightness"


def vae_for(family):
    channels = tiny_models.LATENT_CHANNELS[family]
    if channels not in VAES:
        VAES[channels] = tiny_models.make_vae(channels)
    return VAES[channels]


def searcher(method, family, budget, scorer=None, **overrides):
    name, settings = NODES[method]
    return run_node(name, scorer=scorer or Brightness(), vae=vae_for(family), budget=budget,
                    **{**settings, **overrides})[0]


def run(model, family, sampler, seed=5, batch=1, steps=STEPS, callback=None, latent=None, pos=None):
    import comfy.sample
    import comfy.samplers
    if latent is None:
        latent = torch.zeros(batch, tiny_models.LATENT_CHANNELS[family], SIZE, SIZE)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).float()
    pos = pos or tiny_models.conditioning(family, seed=1)
    neg = tiny_models.conditioning(family, seed=2)
    return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, seed), 2.0, sampler, sigmas, pos, neg,
                                      latent, seed=seed, disable_pbar=True, callback=callback)


def brightness(family, latent):
    with torch.no_grad():
        return vae_for(family).decode(latent.float()).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("method", list(NODES))
@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_one_path_is_comfyuis_euler_ancestral_bit_for_bit(tiny, family, method):
    import comfy.samplers
    model = tiny(family)
    overrides = {"beams": 1} if method == "beam" else {}
    ours = run(model, family, searcher(method, family, STEPS, **overrides), batch=2)
    core = run(model, family, comfy.samplers.sampler_object("euler_ancestral"), batch=2)
    assert torch.equal(ours, core)


@pytest.mark.parametrize("method,budget", [("tree", 11), ("beam", 17), ("best_of_n", 11)])
def test_budget_is_the_evaluations_comfyui_makes(tiny, method, budget):
    model = tiny("sd15").clone()
    counter = EveryEvaluation(model, keys=("input",))
    sampler = searcher(method, "sd15", budget)
    run(model, "sd15", sampler, batch=2)
    report = sampler.trainfree_report
    counted = sum(a["input"].shape[0] for a in counter.args)
    assert counted == sum(report["evaluations"])
    assert all(used <= budget for used in report["evaluations"])
    if method == "best_of_n":
        assert report["evaluations"] == [budget // STEPS * STEPS] * 2 and report["paths"] == [3, 3]
    if method == "beam":
        assert report["evaluations"] == [report["planned_evaluations"]] * 2
    if method == "tree":  # branching reuses the steps above: more paths than whole paths the budget pays for
        assert all(p > budget // STEPS for p in report["paths"])


@pytest.mark.parametrize("method", list(NODES))
def test_deterministic_for_a_seed_and_another_seed_differs(tiny, method):
    model = tiny("flux")
    first = run(model, "flux", searcher(method, "flux", 12), seed=3)
    again = run(model, "flux", searcher(method, "flux", 12), seed=3)
    other = run(model, "flux", searcher(method, "flux", 12), seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("method", list(NODES))
def test_returns_the_best_it_scored(tiny, method):
    model = tiny("sd15")
    sampler = searcher(method, "sd15", 12)
    out = run(model, "sd15", sampler, batch=2)
    report = sampler.trainfree_report
    rescored = brightness("sd15", out)
    for row in range(2):
        assert report["returned_score"][row] == pytest.approx(float(rescored[row]), abs=1e-5)
        assert report["returned_score"][row] == max(report["path_scores"][row])
        assert report["returned_score"][row] >= report["first_path_score"][row]


@pytest.mark.parametrize("method", list(NODES))
def test_beats_a_single_path_on_average(tiny, method):
    import comfy.samplers
    model = tiny("sd15")
    seeds = range(4)
    searched = torch.cat([brightness("sd15", run(model, "sd15", searcher(method, "sd15", 18), seed=s))
                          for s in seeds])
    plain = torch.cat([brightness("sd15", run(model, "sd15", comfy.samplers.sampler_object("euler_ancestral"), seed=s))
                       for s in seeds])
    assert searched.mean() > plain.mean()
    if method != "beam":  # their first path is the plain one (beam search may prune its lineage)
        assert (searched >= plain).all()


def test_sample_mode_draws_from_the_tree(tiny):
    model = tiny("sd15")
    sampler = searcher("tree", "sd15", 15, mode="sample (DTS)", **{"lambda": 0.0})
    out = run(model, "sd15", sampler)
    report = sampler.trainfree_report
    assert report["greedy"] is False
    assert report["returned_score"][0] in report["path_scores"][0]
    assert report["returned_score"][0] == pytest.approx(float(brightness("sd15", out)[0]), abs=1e-5)


def test_progress_reaches_the_last_step(tiny):
    model = tiny("sd15")
    steps = []
    run(model, "sd15", searcher("tree", "sd15", 12), callback=lambda i, den, x, total: steps.append((i, total)))
    assert steps[0][0] == 0 and steps[-1] == (STEPS - 1, STEPS)
    assert all(a[0] < b[0] for a, b in zip(steps, steps[1:]))


def test_interrupt_stops_the_search(tiny):
    import comfy.model_management as mm
    model = tiny("sd15")
    scorer = Brightness(on_score=lambda calls: mm.interrupt_current_processing(True) if calls == 2 else None)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(model, "sd15", searcher("best_of_n", "sd15", 30, scorer=scorer))
    finally:
        mm.interrupt_current_processing(False)
    assert scorer.calls == 2


@pytest.mark.parametrize("method,minimum", [("tree", STEPS), ("beam", 2 * STEPS), ("best_of_n", STEPS)])
def test_refuses_a_budget_below_one_path(tiny, method, minimum):
    with pytest.raises(ValueError, match=f"at least {minimum}"):
        run(tiny("sd15"), "sd15", searcher(method, "sd15", minimum - 1))


def test_refusals(tiny):
    model = tiny("sd15")
    name, settings = NODES["tree"]
    with pytest.raises(ValueError, match="VAE"):
        run_node(name, scorer=Brightness(), vae=None, budget=10, **settings)
    with pytest.raises(ValueError, match="scorer"):
        run_node(name, scorer="seven", vae=vae_for("sd15"), budget=10, **settings)
    judge = Brightness()
    judge.reads = "model"
    with pytest.raises(ValueError, match="pixels"):
        run_node(name, scorer=judge, vae=vae_for("sd15"), budget=10, **settings)
    with pytest.raises(ValueError, match="lambda"):
        run_node(name, scorer=Brightness(), vae=vae_for("sd15"), budget=10, **{**settings, "lambda": float("nan")})
    with pytest.raises(ValueError, match="one prompt"):
        run(model, "sd15", searcher("tree", "sd15", 10), batch=2, pos=tiny_models.conditioning("sd15", batch=2))


def test_refuses_a_noise_mask(tiny):
    import comfy.sample
    import comfy.samplers
    model = tiny("sd15")
    latent = torch.zeros(1, 4, SIZE, SIZE)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).float()
    pos, neg = tiny_models.conditioning("sd15", seed=1), tiny_models.conditioning("sd15", seed=2)
    with pytest.raises(ValueError, match="noise mask"):
        comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 0), 2.0, searcher("tree", "sd15", 10),
                                   sigmas, pos, neg, latent, noise_mask=torch.ones(1, 1, SIZE, SIZE), seed=0,
                                   disable_pbar=True)
