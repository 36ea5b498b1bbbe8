"""Gradient-Free Classifier Guidance and the judges on the real ComfyUI: scale 0 and an empty window are the
unpatched run exactly; each row is pushed away from its own most-confused class's conditional prediction
(restated with plain ComfyUI sampling calls) by scale * p_ref / (p_target + p_ref); the judge reads the current
clean estimate decoded by the VAE; the prompt judge is the Diffusion Classifier's ELBO over the prompts; every
family runs; bad inputs get clear errors."""
import pytest
import torch

from conftest import EveryEvaluation, run_node, sample
from harness import tiny_models

CLASSES = "a red seven\na blue one\na green two"
TEXTS = CLASSES.splitlines()


class TableJudge:
    """A pixel judge whose answer is fixed per row (``table[row]`` are probabilities); it records what it read."""
    reads = "pixels"
    labels = ("seven", "one", "two")

    def __init__(self, table):
        self.table = torch.tensor(table)
        self.seen = []

    def log_probs(self, pixels):
        self.seen.append(pixels.clone())
        return self.table[:pixels.shape[0]].log()


def gfcg(model, clip, scale=2.0, target="1", judge=None, vae=None, start=0.0, end=1.0, classes=CLASSES):
    extra = {k: v for k, v in (("judge", judge), ("vae", vae)) if v is not None}
    return run_node("TrainFreeGFCG", model=model, clip=clip, class_prompts=classes, target_class=target, scale=scale,
                    start_percent=start, end_percent=end, **extra)[0]


def report(host, model):
    (only,) = [r for key, r in host.run_reports(model).items() if "gfcg" in key]
    return only


def conditional_prediction(model, conditioning, x, sigma):
    """The model's conditional denoised prediction at (x, sigma), through a plain one-evaluation sampling run."""
    import comfy.sample
    import comfy.samplers
    seen = []
    m = model.clone()
    m.set_model_sampler_post_cfg_function(lambda args: seen.append(args["cond_denoised"]) or args["denoised"])

    def sampler(k_model, x_, sigmas, extra_args=None, callback=None, disable=None):
        k_model(x, sigma, **extra_args)
        return x_
    zeros = torch.zeros_like(x)
    comfy.sample.sample_custom(m, zeros, 1.0, comfy.samplers.KSAMPLER(sampler), torch.tensor([float(sigma[0]), 0.0]),
                               conditioning, conditioning, zeros, disable_pbar=True, seed=0)
    return seen[0]


@pytest.mark.parametrize("family", ("sd15", "sdxl", "sd3", "flux"))
def test_scale_zero_and_an_empty_window_are_the_unpatched_run(tiny, clip, family):
    plain = sample(tiny(family), family)
    assert torch.equal(sample(gfcg(tiny(family), clip, scale=0.0), family), plain)
    assert torch.equal(sample(gfcg(tiny(family), clip, start=1.0, end=1.0), family), plain)


def test_each_row_moves_away_from_its_most_confused_class_by_the_adaptive_scale(tiny, clip, host):
    vae = tiny_models.make_vae(4)
    table = [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]  # target 'seven': row 0 is confused with 'one', row 1 with 'two'
    judge = TableJudge(table)
    plain = tiny("sd15").clone()
    before = EveryEvaluation(plain)
    sample(plain, "sd15", batch=2, steps=3)
    patched = gfcg(tiny("sd15"), clip, scale=2.0, judge=judge, vae=vae)
    after = EveryEvaluation(patched)
    sample(patched, "sd15", batch=2, steps=3)
    first, guided = before.args[0], after.args[0]
    assert torch.equal(first["input"], guided["input"])  # same state at the first evaluation
    for row, (reference, p_ref) in enumerate(((1, 0.5), (2, 0.3))):
        p_target = table[row][0]
        scale = 2.0 * p_ref / (p_target + p_ref)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(TEXTS[reference]))
        x, sigma = first["input"][row:row + 1], first["sigma"][row:row + 1]
        away = conditional_prediction(tiny("sd15"), cond, x, sigma)
        expected = first["denoised"][row] + scale * (first["cond_denoised"][row] - away[0])
        torch.testing.assert_close(guided["denoised"][row], expected, rtol=1e-4, atol=1e-5)
    rep = report(host, patched)
    assert rep["guided"] == rep["evaluations"] == 3 and rep["references"] == {"a blue one": 3, "a green two": 3}
    decoded = vae.decode(tiny("sd15").model.process_latent_out(first["denoised"])).movedim(-1, 1)
    torch.testing.assert_close(judge.seen[0], decoded.clamp(0, 1), rtol=1e-4, atol=1e-5)


def test_the_prompt_judge_gives_the_diffusion_classifiers_posterior(tiny, clip, host):
    """p(c | x) ∝ exp(-E ||eps - eps(x_t, c)||²) with the classifier's own (t, eps) pairs and errors."""
    from guidance_ops import diffusion_classifier as dc
    (judge,) = run_node("TrainFreePromptJudge", clip=clip, prompts=CLASSES, timesteps=3, seed=5)
    model = tiny("sd15").clone()
    key = host.new_key("test_judge")
    host.prepare_judge(model, key, judge)
    got = []

    def read(args):
        if not got:  # the scope's state is the run's guider
            got.append((args["denoised"], host.judge_log_probs(model, judge, args["denoised"], scope.state,
                                                               key, args["model_options"])))
        return args["denoised"]
    scope = host.RunScope(model, key, lambda guider, *_: guider)
    model.set_model_sampler_post_cfg_function(read)
    sample(model, "sd15", steps=2)
    denoised, log_probs = got[0]
    latent = tiny("sd15").model.process_latent_out(denoised)
    timesteps = dc.timestep_grid(3)
    noise = dc.shared_noise(3, latent.shape[1:], 5)
    conditionings = {text: clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in TEXTS}
    errors = host.denoising_errors(tiny("sd15"), conditionings, latent, host.timestep_sigmas(tiny("sd15"), timesteps),
                                   noise, 8, None)
    summed = torch.tensor([[sum(errors[t]) / len(errors[t]) * latent[0].numel() for t in TEXTS]])
    torch.testing.assert_close(log_probs, torch.log_softmax(-summed, dim=1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ("sd15", "sdxl", "sd3", "flux"))
def test_the_built_in_prompt_judge_guides_every_family(tiny, clip, host, family):
    patched = gfcg(tiny(family), clip)
    out = sample(patched, family, steps=3)
    assert not torch.equal(out, sample(tiny(family), family, steps=3))
    rep = report(host, patched)
    assert rep["guided"] == 3 and sum(rep["references"].values()) == 3 and "a red seven" not in rep["references"]


def test_runs_of_other_batch_sizes_and_sizes_follow_each_other(tiny, clip):
    patched = gfcg(tiny("sd15"), clip)
    sample(patched, "sd15", steps=2, batch=1)
    second = sample(patched, "sd15", steps=2, batch=2, size=24)
    assert second.shape[0] == 2 and second.shape[-1] == 24


@pytest.mark.parametrize("inputs, words", [
    ({"classes": "a red seven"}, "at least two"),
    ({"target": "a purple nine"}, "names no class"),
    ({"judge": TableJudge([[0.5, 0.5, 0.0]])}, "connect the model's VAE"),
    ({"vae": "a vae"}, "disconnect vae"),
    ({"judge": TableJudge([[0.5, 0.5, 0.0]]), "vae": "a vae", "classes": "a red seven\na blue one"},
     "one class prompt per label"),
])
def test_bad_inputs_are_refused_naming_the_fix(tiny, clip, inputs, words):
    with pytest.raises(ValueError, match=words):
        gfcg(tiny("sd15"), clip, **inputs)


def test_a_target_may_be_named_by_the_judges_label(tiny, clip, host):
    vae = tiny_models.make_vae(4)
    patched = gfcg(tiny("sd15"), clip, judge=TableJudge([[0.2, 0.5, 0.3]]), vae=vae, target="two")
    sample(patched, "sd15", steps=2)
    assert report(host, patched)["references"] == {"a blue one": 2}  # target 'two': the rival is 'one' (0.5)
