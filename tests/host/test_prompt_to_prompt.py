"""Prompt-to-Prompt's attention control on the real ComfyUI with tiny SD1.5 / SDXL models.

The two branches run as one batch [source; target] that shares its starting noise, sampled by a plain Euler loop
(a KSAMPLER, as an own sampling loop would be) that calls the controller's local blend after each step. An
independent recorder (an attention override) recomputes the attention probabilities of every attention call
ComfyUI makes; a second recorder wraps the patch from outside and checks its output against the official
formulas.
"""
import pytest
import torch

from conftest import AttentionOverride
from harness import tiny_models

UNETS = ("sd15", "sdxl")
STEPS = 5
SOURCE, TARGET = "a photo of a cat on a table", "a photo of a dog on a table"


@pytest.fixture(scope="module")
def clip(pack):
    return tiny_models.make_clip()


@pytest.fixture(params=UNETS)
def unet(request):
    return request.param


def conditioning(clip, family, texts, same_negative=False):
    """[source; target] CONDITIONING (one row per prompt) and a negative with a different row per branch (or the
    same one)."""
    crosses, pooled = zip(*(clip.encode_from_tokens(clip.tokenize(t), return_pooled=True) for t in texts))
    extra = {"pooled_output": torch.cat(pooled)}
    if family == "sdxl":
        extra.update(width=128, height=128)
    neg = tiny_models.conditioning(family, batch=1 if same_negative else len(texts), tokens=77, seed=5)
    return [[torch.cat(crosses), extra]], neg


def euler(controller=None, check=None):
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]), **(extra_args or {}))
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            if controller is not None:
                blended = controller.blend(x, i)
                if check is not None:
                    check(x, blended)
                x = blended
        return x
    return sample


def run(model, family, pos, neg, controller=None, steps=STEPS, size=16, check=None):
    import comfy.sample
    import comfy.samplers
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    sampler = comfy.samplers.KSAMPLER(euler(controller, check))
    return comfy.sample.sample_custom(model, noise, 3.0, sampler, sigmas, pos, neg, torch.zeros_like(noise),
                                      disable_pbar=True, seed=0)


def plan_for(host, clip, mode, source=SOURCE, target=TARGET, blend=(), reweight=(), **kw):
    from guidance_ops import prompt_to_prompt as p2p
    ids = [host.prompt_token_ids(clip, t) for t in (source, target)]
    if blend:
        kw.update(blend_source_tokens=p2p.word_positions(ids[0], host.word_token_ids(clip, blend[0])),
                  blend_target_tokens=p2p.word_positions(ids[1], host.word_token_ids(clip, blend[1])))
    if reweight:
        kw.update(reweight_tokens=p2p.word_positions(ids[1], host.word_token_ids(clip, reweight[0])),
                  reweight_scale=reweight[1])
    return p2p.make_plan(ids[0], ids[1], mode, **kw)


def step_of(options):
    sigma, sigmas = float(options["sigmas"][0]), options["sample_sigmas"].tolist()
    return sigmas.index(sigma)


class ProbabilityRecorder(AttentionOverride):
    """(kind, step, query tokens, source probs, target probs) of the branches' rows in every attention call."""

    def __call__(self, func, *args, **kwargs):
        q, k = args[:2]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        to = kwargs["transformer_options"]
        q, k = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).float() for t in (q, k))
        p = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        for i, chunk in enumerate(to["cond_or_uncond"]):
            kind = ("cross" if k.shape[2] == 77 else "self", "cond" if chunk == 0 else "uncond")
            self.calls.append((kind, step_of(to), q.shape[2], p[2 * i], p[2 * i + 1]))
        return func(*args, **kwargs)


def test_word_swap_injects_cross_then_self_maps_for_their_fractions(tiny, unet, host, clip):
    model = tiny(unet).clone()
    plan = plan_for(host, clip, "word swap", cross_replace=0.6, self_replace=0.4, self_max_fraction=0.25)
    controller = host.install_prompt_to_prompt(model, plan, rows=1)
    recorder = ProbabilityRecorder(model)
    run(model, unet, *conditioning(clip, unet, (SOURCE, TARGET)), controller)
    cross_steps, self_steps = 3, 2  # int(0.6 * 5), int(0.4 * 5)
    seen = set()
    for (kind, chunk), step, tokens, source, target in recorder.calls:
        same = torch.equal(source, target)
        if chunk == "uncond":
            assert step == 0 or not same, "the unconditional chunk is edited"
            continue
        replaced = step < (cross_steps if kind == "cross" else self_steps)
        if kind == "self" and tokens > 0.25 * 16 * 16:
            replaced = False  # too fine a layer for self replacement
        if replaced:
            assert same, f"{kind} map at step {step} ({tokens} tokens) is not the source's"
        elif step > 0:  # at step 0 both branches start from one latent, so early layers agree anyway
            assert not same, f"{kind} map at step {step} ({tokens} tokens) is still the source's"
        seen.add((kind, replaced))
    assert seen == {("cross", True), ("cross", False), ("self", True), ("self", False)}
    report = controller.report()
    sites = sum(host.attention_layers(model).values())
    assert report["cross_steps"] == cross_steps and report["self_steps"] == self_steps
    assert report["cross_layers"] == sites and 0 < report["self_layers"] <= sites


def test_identical_prompts_give_exactly_the_unpatched_result(tiny, unet, host, clip):
    pos, neg = conditioning(clip, unet, (SOURCE, SOURCE), same_negative=True)
    base = run(tiny(unet), unet, pos, neg)
    for mode in ("word swap", "refinement"):
        model = tiny(unet).clone()
        plan = plan_for(host, clip, mode, SOURCE, SOURCE, blend=("cat", "cat"), self_max_fraction=1.0)
        controller = host.install_prompt_to_prompt(model, plan, rows=1)
        assert torch.equal(run(model, unet, pos, neg, controller), base), mode
        assert controller.report()["cross_steps"] == 4 and controller.report()["blend_steps"] == STEPS


def test_local_blend_keeps_the_source_latent_outside_the_mask(tiny, unet, host, clip):
    model = tiny(unet).clone()
    plan = plan_for(host, clip, "word swap", blend=("cat", "dog"), blend_threshold=0.9)
    controller = host.install_prompt_to_prompt(model, plan, rows=1)
    kept = []

    def check(x, blended):
        assert torch.equal(blended[0], x[0]), "the source row is blended"
        inside = (blended[1] == x[1]).all(0)  # pixels where the target keeps its own latent
        outside = (blended[1] == x[0]).all(0)  # pixels where it takes the source's
        assert (inside | outside).all(), "a pixel is neither the target's nor the source's latent"
        kept.append((float(inside.float().mean()), bool((outside & ~inside).any())))

    out = run(model, unet, *conditioning(clip, unet, (SOURCE, TARGET)), controller, check=check)
    report = controller.report()
    assert report["blend_steps"] == STEPS and 0 < report["blend_mask_fraction"] < 1
    assert kept[-1][0] == pytest.approx(report["blend_mask_fraction"])
    assert any(changed for _, changed in kept), "the blend never moved a target pixel to the source"
    same = (out[0] == out[1]).all(0)
    assert same.any() and not same.all(), "the final target equals the source outside the mask only"


class OutputChecker:
    """Wraps the patch at every cross-attention site from outside and checks the target rows of the conditional
    chunk against the official formula: (source map[:, :, mapper] * alphas + target map * (1 - alphas)) * equalizer
    in the replacement steps, the target's own map after."""

    def __init__(self, model, plan, cross_steps):
        self.plan, self.cross_steps, self.checked = plan, cross_steps, {True: 0, False: 0}
        replace = model.model_options["transformer_options"]["patches_replace"]["attn2"]
        for key in list(replace):
            replace[key] = self.wrap(replace[key])

    def wrap(self, inner):
        def attn2(q, k, v, extra_options):
            out = inner(q, k, v, extra_options)
            heads, cou = extra_options["n_heads"], extra_options["cond_or_uncond"]
            i = 2 * cou.index(0)
            qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).double() for t in (q, k, v))
            p = (qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5).softmax(-1)
            source, target = p[i], p[i + 1]
            replaced = step_of(extra_options) < self.cross_steps
            if replaced:
                mapped = torch.stack([source[..., m] for m in self.plan.mapper], -1)
                alphas = torch.tensor(self.plan.alphas, dtype=torch.float64)
                target = mapped * alphas + target * (1 - alphas)
                for t in self.plan.reweight_tokens:
                    target[..., t] *= self.plan.reweight_scale
            expected = (target @ vh[i + 1]).transpose(0, 1).reshape(out.shape[1:])
            torch.testing.assert_close(out[i + 1].double(), expected, rtol=1e-4, atol=1e-5)
            self.checked[replaced] += 1
            return out
        return attn2


@pytest.mark.parametrize("mode", ["refinement", "reweight"])
def test_refinement_and_reweight_follow_the_official_formula(tiny, unet, host, clip, mode):
    model = tiny(unet).clone()
    if mode == "refinement":
        texts = (SOURCE, "a photo of a small cat on a wooden table")
        plan = plan_for(host, clip, mode, *texts, cross_replace=0.6)
        assert 0 < sum(plan.alphas) < len(plan.alphas)
    else:
        texts = (SOURCE, SOURCE)
        plan = plan_for(host, clip, mode, *texts, reweight=("cat", 3.0), cross_replace=0.6)
    controller = host.install_prompt_to_prompt(model, plan, rows=1)
    checker = OutputChecker(model, plan, cross_steps=3)
    run(model, unet, *conditioning(clip, unet, texts), controller)
    assert checker.checked[True] > 0 and checker.checked[False] > 0
    assert controller.report()["cross_steps"] == 3


def test_no_stale_state_between_runs_of_other_size_and_steps(tiny, host, clip):
    pos, neg = conditioning(clip, "sd15", (SOURCE, TARGET))
    plan = plan_for(host, clip, "word swap", blend=("cat", "dog"))
    reused = tiny("sd15").clone()
    controller = host.install_prompt_to_prompt(reused, plan, rows=1)
    run(reused, "sd15", pos, neg, controller, steps=4, size=16)
    second = run(reused, "sd15", pos, neg, controller, steps=3, size=24)
    fresh = tiny("sd15").clone()
    fresh_controller = host.install_prompt_to_prompt(fresh, plan, rows=1)
    assert torch.equal(second, run(fresh, "sd15", pos, neg, fresh_controller, steps=3, size=24))
    assert controller.report() == fresh_controller.report()


def test_a_batch_that_breaks_the_layout_is_refused(tiny, host, clip):
    model = tiny("sd15").clone()
    controller = host.install_prompt_to_prompt(model, plan_for(host, clip, "word swap"), rows=2)
    with pytest.raises(ValueError, match="each conditioning chunk of the batch to hold 4 rows"):
        run(model, "sd15", *conditioning(clip, "sd15", (SOURCE, TARGET)), controller)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dits_are_refused(tiny, host, clip, family):
    with pytest.raises(host.UnsupportedModel, match="needs separate cross-attention layers"):
        host.install_prompt_to_prompt(tiny(family).clone(), plan_for(host, clip, "word swap"), rows=1)


def test_token_ids_as_the_text_encoder_sees_them(host, clip):
    from guidance_ops import prompt_to_prompt as p2p
    ids = host.prompt_token_ids(clip, SOURCE)
    start, end = ids[0], ids[ids.index(ids[-1])]
    assert len(ids) == 77 and ids.count(end) == 77 - 9  # start and 8 words, then the end and its padding
    cat = host.word_token_ids(clip, "cat")
    assert len(cat) == 1 and start not in cat and end not in cat
    assert p2p.word_positions(ids, cat) == (5,)
    assert len(host.prompt_token_ids(clip, "cat " * 100)) == 154  # two 77-token chunks


def test_sdxl_tokenizers_agree_on_every_token_but_the_padding(host, pack):
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base
    target = tiny_models.clip_target()
    sdxl = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, target.clip),
                         model_options={"dtype": torch.float32})
    tokens = sdxl.tokenize(SOURCE)
    g, l_ = ([t[0] for t in tokens[key][0]] for key in ("g", "l"))
    assert g[:10] == l_[:10] and g[10:] != l_[10:] and host.prompt_token_ids(sdxl, SOURCE) == g
    assert host.word_token_ids(sdxl, "cat") == [g[5]]
