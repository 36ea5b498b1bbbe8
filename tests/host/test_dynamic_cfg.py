"""Dynamic CFG on the real ComfyUI: one candidate at the sampler's cfg (or an empty window) is the unpatched run
exactly; at every judged evaluation each row takes the scale whose clean estimate, decoded by ComfyUI's VAE and
read by the judges, scores best (restated from the recorded predictions); rows choose independently; the report
holds the schedule; bad inputs get clear errors; per-run state follows the batch."""
import pytest
import torch

from conftest import EveryEvaluation, run_node, sample
from harness import tiny_models

FAMILIES = ("sd15", "sdxl", "sd3", "flux")


class SpreadJudge:
    """A pixel judge with a known preference: log p('spread') rises with the image's pixel standard deviation
    (``towards`` None) or with its closeness to ``towards``."""
    reads = "pixels"
    labels = ("spread", "other")

    def __init__(self, towards=None):
        self.towards, self.calls = towards, 0

    def preference(self, pixels):
        spread = pixels.float().flatten(1).std(dim=1)
        return 4 * spread if self.towards is None else -400 * (spread - self.towards) ** 2

    def log_probs(self, pixels):
        self.calls += 1
        logits = torch.stack([self.preference(pixels), torch.zeros(pixels.shape[0])], dim=1)
        return torch.log_softmax(logits, dim=1)


KEYS = ("sigma", "cond_denoised", "uncond_denoised", "denoised", "cond_scale")


def dynamic(model, scales="1, 3, 6", judge=None, target="spread", weight=1.0, vae=None, start=0.0, end=1.0,
            **extra):
    judge = SpreadJudge() if judge is None else judge
    if vae is not None:
        extra["vae"] = vae
    return run_node("TrainFreeDynamicCFG", model=model, candidate_scales=scales, judge=judge, target=target,
                    weight=weight, start_percent=start, end_percent=end, **extra)[0]


def report(host, model):
    (only,) = [r for key, r in host.run_reports(model).items() if "dynamic_cfg" in key]
    return only


_VAES = {}


def vae_for(family):
    channels = tiny_models.LATENT_CHANNELS[family]
    if channels not in _VAES:
        _VAES[channels] = tiny_models.make_vae(channels)
    return _VAES[channels]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_candidate_at_the_samplers_cfg_and_an_empty_window_are_the_unpatched_run(tiny, family):
    plain = sample(tiny(family), family, cfg=3.0)
    judge = SpreadJudge()
    assert torch.equal(sample(dynamic(tiny(family), "3", judge, vae=vae_for(family)), family, cfg=3.0), plain)
    assert torch.equal(sample(dynamic(tiny(family), "1, 3, 6", judge, vae=vae_for(family), start=1.0, end=1.0),
                              family, cfg=3.0), plain)
    assert judge.calls == 0
    unguided = sample(tiny(family), family, cfg=1.0)  # cfg 1: no unconditional pass is forced either
    assert torch.equal(sample(dynamic(tiny(family), "1", judge, vae=vae_for(family)), family, cfg=1.0), unguided)


def acceptable_choices(model, vae, judges, cond, uncond, scales, sampler_cfg, margin=1e-5):
    """Per row, the scales that may be chosen: the candidate whose decoded clean estimate maximises
    sum_i weight_i log p_i(target_i); where others come within ``margin`` of it (late steps, where cond and uncond
    nearly agree, or float noise between batched and single decodes), any of them; exact ties go to the sampler's
    cfg, else to the smallest scale."""
    accepted = []
    for row in range(cond.shape[0]):
        scores = []
        for w in scales:
            estimate = uncond[row:row + 1] + w * (cond[row:row + 1] - uncond[row:row + 1])
            pixels = vae.decode(model.model.process_latent_out(estimate)).movedim(-1, 1).clamp(0, 1).detach()
            scores.append(sum(weight * float(judge.log_probs(pixels)[0, target]) for judge, target, weight in judges))
        best = max(scores)
        near = {w for w, s in zip(scales, scores) if s >= best - margin}
        exact = [w for w, s in zip(scales, scores) if s == best]
        accepted.append(near if len(near) > 1 else {sampler_cfg if sampler_cfg in exact else min(exact)})
    return accepted


def check_every_evaluation(host, tiny, patched, recorder, judges, scales, vae):
    rep = report(host, patched)
    assert len(rep["schedule"]) == len(recorder.args) == rep["evaluations"] == rep["judged_evaluations"]
    chosen_rows = []
    for entry, args in zip(rep["schedule"], recorder.args):
        cond, uncond = args["cond_denoised"], args["uncond_denoised"]
        accepted = acceptable_choices(tiny("sd15"), vae, judges, cond, uncond, scales, args["cond_scale"])
        assert all(w in ok for w, ok in zip(entry["scales"], accepted)), (entry["scales"], accepted)
        w = torch.tensor(entry["scales"]).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(args["denoised"], uncond + w * (cond - uncond), rtol=1e-5, atol=1e-5)
        chosen_rows.append(entry["scales"])
    return rep, chosen_rows


def test_each_row_takes_the_scale_its_judges_score_best(tiny, host):
    vae, scales = vae_for("sd15"), (1.0, 3.0, 6.0)
    runs = {}
    for name, panel in (("spread", [(SpreadJudge(), 0, 1.0)]), ("flat", [(SpreadJudge(towards=0.0), 0, 1.0)]),
                        ("both", [(SpreadJudge(), 0, 1.0), (SpreadJudge(towards=0.0), 0, 5.0)])):
        extra = {} if len(panel) == 1 else {"judge_2": panel[1][0], "target_2": "1", "weight_2": 5.0}
        patched = dynamic(tiny("sd15"), "6, 1, 3", panel[0][0], vae=vae, **extra)
        recorder = EveryEvaluation(patched, KEYS)
        sample(patched, "sd15", batch=2, steps=4, cfg=3.0)
        rep, runs[name] = check_every_evaluation(host, tiny, patched, recorder, panel, scales, vae)
        assert rep["candidates"] == list(scales) and rep["judged_estimates"] == 4 * len(scales) * 2 * len(panel)
        assert rep["scales_per_row"] == [[c[0] for c in runs[name]], [c[1] for c in runs[name]]]
    # from noise the guidance scale moves the decoded image's spread one way: the judge that wants spread and the
    # one that wants none take opposite ends of the candidates, and the weighted pair follows the heavier one
    first = {name: chosen[0] for name, chosen in runs.items()}
    assert {first["spread"][0], first["flat"][0]} == {1.0, 6.0} and first["both"] == first["flat"]


def test_rows_choose_their_own_scales(tiny, host):
    vae, scales = vae_for("sd15"), (0.0, 1.0, 2.0, 4.0, 8.0)
    judge = SpreadJudge(towards=0.232)
    patched = dynamic(tiny("sd15"), "0, 1, 2, 4, 8", judge, vae=vae)
    recorder = EveryEvaluation(patched, KEYS)
    sample(patched, "sd15", batch=3, steps=4, cfg=3.0, pos=tiny_models.conditioning("sd15", batch=1, seed=7))
    _, chosen = check_every_evaluation(host, tiny, patched, recorder, [(judge, 0, 1.0)], scales, vae)
    assert len(set(chosen[0])) > 1, chosen


def test_state_follows_the_batch_and_is_released(tiny, host):
    vae = vae_for("sd15")
    patched = dynamic(tiny("sd15"), "1, 3, 6", SpreadJudge(), vae=vae)
    sample(patched, "sd15", batch=3, steps=2)
    assert [len(e["scales"]) for e in report(host, patched)["schedule"]] == [3, 3]
    sample(patched, "sd15", batch=1, steps=3)
    rep = report(host, patched)
    assert [len(e["scales"]) for e in rep["schedule"]] == [1, 1, 1] and len(rep["scales_per_row"]) == 1
    assert [e["step"] for e in rep["schedule"]] == [0, 1, 2]
    scopes = patched.model_options["transformer_options"]["trainfree_runs"]
    assert all(scope.state is None for key, scope in scopes.items() if "dynamic_cfg" in key)


def test_the_prompt_judge_reads_the_model_itself(tiny, clip, host):
    (judge,) = run_node("TrainFreePromptJudge", clip=clip, prompts="a red seven\na blue one", timesteps=1, seed=0)
    patched = dynamic(tiny("sd15"), "1, 5", judge, target="a red seven")
    sample(patched, "sd15", batch=2, steps=2)
    rep = report(host, patched)
    assert rep["judged_evaluations"] == 2 and all(set(e["scales"]) <= {1.0, 5.0} for e in rep["schedule"])


def test_bad_inputs_get_clear_errors(tiny, clip):
    model = tiny("sd15")
    with pytest.raises(ValueError, match="reads pixels: connect the model's VAE"):
        dynamic(model)
    (prompt_judge,) = run_node("TrainFreePromptJudge", clip=clip, prompts="a\nb", timesteps=1, seed=0)
    with pytest.raises(ValueError, match="disconnect vae"):
        dynamic(model, judge=prompt_judge, target="a", vae=vae_for("sd15"))
    with pytest.raises(ValueError, match=r"target: .*'seven'.*1: spread, 2: other"):
        dynamic(model, target="seven", vae=vae_for("sd15"))
    with pytest.raises(ValueError, match="judge_2 is not connected"):
        dynamic(model, vae=vae_for("sd15"), target_2="spread")
    with pytest.raises(ValueError, match="candidate_scales"):
        dynamic(model, scales="3, lots", vae=vae_for("sd15"))
    with pytest.raises(ValueError, match="swap them"):
        dynamic(model, vae=vae_for("sd15"), start=0.6, end=0.2)
