"""LinearAG on the real ComfyUI (tiny SD1.5 and its text encoder): the calibration fits coefficients that predict
the unconditional prediction of runs it has not seen; the patch skips the unconditional pass on every other step
(counted model rows) and stays near CFG, much nearer than dropping guidance on those steps; bad files and step
counts are refused."""
import pytest
import torch

from conftest import run_node

STEPS = 8


def calibrate(model, clip, steps=STEPS, cfg=5.0):
    return run_node("TrainFreeLinearAGCalibrate", model=model, clip=clip, calibration_prompts="a red seven\na blue one",
                    negative_prompt="", runs_per_prompt=2, seed=0, steps=steps, cfg=cfg, sampler_name="euler",
                    scheduler="normal", width=128, height=128, filename_prefix="tiny")


def run(model, clip, steps=STEPS, seed=11, prompt="a green two"):
    import comfy.sample
    latent = torch.zeros(1, 4, 16, 16)
    rows = []

    def count(executor, x, *args, **kwargs):
        rows.append(x.shape[0])
        return executor(x, *args, **kwargs)
    import comfy.patcher_extension as pe
    model = model.clone()
    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_rows", count)
    out = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, 5.0, "euler", "normal",
                              clip.encode_from_tokens_scheduled(clip.tokenize(prompt)),
                              clip.encode_from_tokens_scheduled(clip.tokenize("")), latent, seed=seed,
                              disable_pbar=True)
    return out, rows


def test_every_other_step_regresses_the_unconditional_pass_and_stays_near_cfg(tiny, clip, folders):
    model = tiny("sd15")
    summary = calibrate(model, clip)["result"][1]
    assert "tiny_00001.json" in summary and (folders / "output" / "linear_ag" / "tiny_00001.json").is_file()
    patched = run_node("TrainFreeLinearAG", model=model, calibration_file="tiny_00001.json")[0]
    out, rows = run(patched, clip)
    assert rows == [2, 1] * (STEPS // 2)  # steps 1, 3, 5, 7 run the conditional pass alone
    cfg, _ = run(model, clip)
    # the same steps with the unconditional prediction set to the conditional one (no guidance there)
    import json
    path = folders / "output" / "linear_ag" / "tiny_00001.json"
    data = json.loads(path.read_text())
    data["coefficients"] = {k: [1.0, 0.0, 0.0] for k in data["coefficients"]}  # D_u := D_c: no guidance
    (folders / "output" / "linear_ag" / "off_00001.json").write_text(json.dumps(data))
    off, _ = run(run_node("TrainFreeLinearAG", model=model, calibration_file="off_00001.json")[0], clip)
    assert not torch.equal(out, cfg)
    assert (out - cfg).norm() < (off - cfg).norm()  # the regression stands in for the pass better than nothing


def test_a_calibration_for_another_step_count_is_refused(tiny, clip, folders):
    calibrate(tiny("sd15"), clip, steps=6)
    patched = run_node("TrainFreeLinearAG", model=tiny("sd15"), calibration_file="tiny_00001.json")[0]
    with pytest.raises(ValueError, match="is for 6 steps but the sampler runs 8: set steps to 6"):
        run(patched, clip)


@pytest.mark.parametrize("text,message", [('{"format": "x"}', "not a LinearAG calibration"),
                                          ('{"format": "trainfree-linear-ag", "version": 1, "steps": 4, '
                                           '"coefficients": {"9": [1, 0, 0]}}', "step '9'"),
                                          ("{", "not valid JSON")])
def test_a_malformed_calibration_file_is_refused_naming_the_file(tiny, folders, text, message):
    (folders / "input" / "linear_ag").mkdir(parents=True)
    (folders / "input" / "linear_ag" / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=f"bad.json: .*{message}"):
        run_node("TrainFreeLinearAG", model=tiny("sd15"), calibration_file="bad.json")


def test_calibrating_at_cfg_one_is_refused(tiny, clip, folders):
    with pytest.raises(ValueError, match="cfg is 1"):
        calibrate(tiny("sd15"), clip, cfg=1.0)


def test_the_calibration_output_feeds_the_patch_directly(tiny, clip, folders):
    model = tiny("sd15")
    calibration = calibrate(model, clip)["result"][0]
    direct = run_node("TrainFreeLinearAG", model=model, calibration_file="(from the calibration input)",
                      calibration=calibration)[0]
    saved = run_node("TrainFreeLinearAG", model=model, calibration_file="tiny_00001.json")[0]
    assert torch.equal(run(direct, clip)[0], run(saved, clip)[0])
    with pytest.raises(ValueError, match="nothing is connected"):
        run_node("TrainFreeLinearAG", model=model, calibration_file="(from the calibration input)")
    with pytest.raises(ValueError, match="would leave it unused"):
        run_node("TrainFreeLinearAG", model=model, calibration_file="tiny_00001.json", calibration=calibration)
