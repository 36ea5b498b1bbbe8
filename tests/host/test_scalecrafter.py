"""TrainFree ScaleCrafter on the real ComfyUI: tiny SD1.5 / SDXL UNets (generic presets: they have two levels), the
official presets' module paths on the full SD1.5 / SDXL structures (built on the meta device, never run)."""
import pytest
import torch

from conftest import ModelCallCounter, run_node, sample
from harness import tiny_models

UNETS = ("sd15", "sdxl")
STEPS = 5


def crafter(model, preset="generic 16x pixels", percent=-1.0, progressive="preset default", damped="preset default",
            disperse=0.0):
    return run_node("TrainFreeScaleCrafter", model=model, preset=preset, dilate_percent=percent,
                    progressive=progressive, noise_damped=damped, disperse_percent=disperse)[0]


def report(host, model):
    (only,) = [r for key, r in host.run_reports(model).items() if "scalecrafter" in key]
    return only


def full_unet(family):
    """The real SD1.5 / SDXL UNet structure (ComfyUI's own class, meta tensors)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    sd15 = dict(tiny_models._SD15, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2] * 4,
                transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                context_dim=768, num_heads=8)
    sdxl = dict(sd15, channel_mult=[1, 2, 4], num_res_blocks=[2] * 3, transformer_depth=[0, 0, 2, 2, 10, 10],
                transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                context_dim=2048, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816,
                num_heads=-1, num_head_channels=64)
    config = {"sd15": sd15, "sdxl": sdxl}[family]
    return UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)


def resnets(*blocks):
    return [f"{b}.{conv}" for b in blocks for conv in ("in_layers.2", "out_layers.3")]


def test_official_presets_on_the_full_sd15_and_sdxl_unets(pack, host):
    from guidance_ops import redilation
    sites, levels = host.unet_conv_sites(full_unet("sd15"))
    assert levels == 4
    preset = redilation.PRESETS["SD1.5 1024x1024 (4x pixels)"]
    # techniques.md 0.3: down_blocks.1-3 = input_blocks.4-5 / 7-8 / 10-11, downsamplers input_blocks.6 / 9,
    # up_blocks.0-2 = output_blocks.0-2 / 3-5 / 6-8, upsample conv in the last of each (after its attention)
    expected = (resnets(*(f"input_blocks.{n}.0" for n in (4, 5, 7, 8, 10, 11)), "middle_block.0", "middle_block.2",
                        *(f"output_blocks.{n}.0" for n in range(9)))
                + ["input_blocks.6.0.op", "input_blocks.9.0.op", "output_blocks.2.1.conv", "output_blocks.5.2.conv",
                   "output_blocks.8.2.conv"])
    factors = redilation.conv_factors(preset, preset.table, sites, levels)
    assert sorted(factors) == sorted(expected) and len(factors) == 39  # the settings file's 39 lines
    assert set(factors.values()) == {2}
    strong = redilation.PRESETS["SD1.5 2048x2048 (16x pixels)"]
    factors = redilation.conv_factors(strong, strong.table, sites, levels)
    assert factors["input_blocks.9.0.op"] == 3 and factors["output_blocks.2.1.conv"] == 4
    assert factors["output_blocks.8.2.conv"] == 2 and factors["middle_block.2.out_layers.3"] == 4

    sites, levels = host.unet_conv_sites(full_unet("sdxl"))
    assert levels == 3
    preset = redilation.PRESETS["SDXL 2048x2048 (4x pixels)"]
    factors = redilation.conv_factors(preset, preset.table, sites, levels)
    # the settings file's 15 lines less the 4 of down_blocks.3, which SDXL lacks
    assert sorted(factors) == sorted(resnets("middle_block.0", "middle_block.2", "output_blocks.0.0",
                                             "output_blocks.1.0", "output_blocks.2.0") + ["output_blocks.2.2.conv"])
    big = redilation.PRESETS["SDXL 4096x4096 (16x pixels)"]
    factors = redilation.conv_factors(big, big.table, sites, levels)
    assert factors["input_blocks.7.0.in_layers.2"] == 4 and factors["output_blocks.5.2.conv"] == 3
    assert factors["output_blocks.8.0.out_layers.3"] == 2 and "input_blocks.6.0.op" not in factors
    with pytest.raises(redilation.PresetMismatch, match=r"down_blocks\.3.*'SDXL 2048x2048 \(4x pixels\)'"):
        sd15 = redilation.PRESETS["SD1.5 2048x2048 (16x pixels)"]
        redilation.conv_factors(sd15, sd15.table, sites, levels)


@pytest.mark.parametrize("family", UNETS)
def test_dilate_percent_zero_is_exactly_the_unpatched_result(tiny, family, host):
    base = sample(tiny(family), family, steps=STEPS)
    patched = crafter(tiny(family), percent=0.0)
    assert patched.object_patches, "the wrappers are installed and stand aside"
    assert torch.equal(sample(patched, family, steps=STEPS), base)
    assert report(host, patched)["dilated"] == 0


def conv_hooks(model):
    """Counts the calls of every Conv2d of the diffusion model as ComfyUI built it (the wrapped modules)."""
    calls, handles = {}, []
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            def hook(_module, _inputs, name=name):
                calls[name] = calls.get(name, 0) + 1
            handles.append(module.register_forward_pre_hook(hook))
    return calls, handles


class Sigmas:
    def __init__(self, model):
        import comfy.patcher_extension as pe
        self.sigmas = []
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_sigmas", self)

    def __call__(self, executor, x, t, *args, **kwargs):
        self.sigmas.append(float(t.max()))
        return executor(x, t, *args, **kwargs)


@pytest.mark.parametrize("family", UNETS)
def test_only_the_listed_convolutions_are_redilated_and_only_inside_the_window(tiny, family, host):
    model = tiny(family)
    patched = crafter(model, "generic 4x pixels", percent=0.6)
    listed = {k.removeprefix("diffusion_model.") for k in patched.object_patches}
    # generic 4x on two levels: level 1 (input_blocks.3), the middle block, up_blocks.0 and its upsampler
    assert listed == set(resnets("input_blocks.3.0", "middle_block.0", "middle_block.2", "output_blocks.0.0",
                                 "output_blocks.1.0")) | {"output_blocks.1.2.conv"}
    sigmas = Sigmas(patched)
    calls, handles = conv_hooks(model)
    try:
        out = sample(patched, family, steps=STEPS)
    finally:
        for handle in handles:
            handle.remove()
    assert (out - sample(model, family, steps=STEPS)).abs().max() > 1e-3
    inside = [s for s in sigmas.sigmas if s > model.get_model_object("model_sampling").percent_to_sigma(0.6)]
    assert 0 < len(inside) < len(sigmas.sigmas) == STEPS
    got = report(host, patched)
    assert got["dilated"] == len(inside) and got["conv_calls"] == {path: len(inside) for path in listed}
    for name, n in calls.items():  # a wrapped conv runs itself only outside the window; every other conv always
        assert n == STEPS - (len(inside) if name in listed else 0), name


@pytest.mark.parametrize("family", UNETS)
def test_the_input_model_is_not_mutated(tiny, family):
    import comfy.utils
    model = tiny(family)
    options_before, patches_before = repr(model.model_options), dict(model.object_patches)
    modules = {name: m for name, m in model.model.diffusion_model.named_modules()}
    base = sample(model, family, steps=3)
    patched = crafter(model)
    sample(patched, family, steps=3)
    assert repr(model.model_options) == options_before and model.object_patches == patches_before
    assert torch.equal(sample(model, family, steps=3), base)
    after = dict(model.model.diffusion_model.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    assert all(type(comfy.utils.get_attr(model.model, k)) is not type(v) for k, v in patched.object_patches.items())


@pytest.mark.parametrize("family", UNETS)
def test_noise_damped_runs_one_weak_unconditional_pass_per_damped_step(tiny, family, host):
    base_model = tiny(family).clone()
    base_counter = ModelCallCounter(base_model)
    sample(base_model, family, steps=STEPS)
    plain = crafter(tiny(family), damped="off")
    damped = crafter(tiny(family))  # generic 16x: damped by default
    counter = ModelCallCounter(damped)
    out_plain, out = sample(plain, family, steps=STEPS), sample(damped, family, steps=STEPS)
    got = report(host, damped)
    assert 0 < got["dilated"] < STEPS and got["weak_passes"] == got["dilated"]
    assert counter.calls == base_counter.calls + got["dilated"]
    assert counter.rows == base_counter.rows + got["dilated"], "one unconditional row per damped step"
    assert (out - out_plain).abs().max() > 1e-3
    # the weak pass ran with the weak table (two levels: the middle block only), progressively
    weak = {k.removesuffix(" (weak)") for k in got["factors"] if k.endswith("(weak)")}
    assert weak == set(resnets("middle_block.0", "middle_block.2"))
    assert got["factors"]["middle_block.0.in_layers.2 (weak)"] == got["factors"]["middle_block.0.in_layers.2"]
    assert report(host, plain)["weak_passes"] == 0


def test_progressive_decays_the_factor_over_the_dilated_steps(tiny, host):
    patched = crafter(tiny("sd15"), progressive="on", damped="off")
    sample(patched, "sd15", steps=10)
    factors = report(host, patched)["factors"]
    assert factors["middle_block.0.in_layers.2"] == [2, 3, 4]
    fixed = crafter(tiny("sd15"), progressive="off", damped="off")
    sample(fixed, "sd15", steps=10)
    assert report(host, fixed)["factors"]["middle_block.0.in_layers.2"] == [4]


def test_weight_patches_act_on_the_redilated_convolution(tiny):
    target = "diffusion_model.middle_block.0.in_layers.2.weight"
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(tiny("sd15").get_model_object(target[:-len(".weight")]).weight.shape, generator=g) * 0.5
    lora = tiny("sd15").clone()
    lora.add_patches({target: (delta,)}, 1.0)
    out = sample(crafter(lora, damped="off"), "sd15", steps=3)
    edited = tiny_models.make_model("sd15")  # the same seed: the same weights, then the patch written in
    with torch.no_grad():
        edited.get_model_object(target[:-len(".weight")]).weight += delta
    assert torch.allclose(out, sample(crafter(edited, damped="off"), "sd15", steps=3), atol=1e-4)
    assert (out - sample(crafter(tiny("sd15"), damped="off"), "sd15", steps=3)).abs().max() > 1e-3


@pytest.mark.parametrize("family", UNETS)
def test_composes_with_pag_in_both_orders(tiny, family, host):
    def pag(model):
        return run_node("TrainFreePAG", model=model, scale=3.0, layers="auto", start_percent=0.0,
                        end_percent=1.0)[0]
    first = sample(pag(crafter(tiny(family))), family, steps=4)
    second_model = crafter(pag(tiny(family)))
    second = sample(second_model, family, steps=4)
    assert torch.allclose(first, second, atol=1e-4)
    assert report(host, second_model)["weak_passes"] > 0
    for alone in (sample(pag(tiny(family)), family, steps=4), sample(crafter(tiny(family)), family, steps=4)):
        assert (first - alone).abs().max() > 1e-3


@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_dits_are_refused_naming_frecas(tiny, family, host):
    with pytest.raises(host.UnsupportedModel, match="FreCaS"):
        crafter(tiny(family))


@pytest.mark.parametrize("family", UNETS)
def test_presets_for_another_architecture_are_refused(tiny, family):
    with pytest.raises(ValueError, match=r"has 2: choose 'generic 4x pixels' or 'generic 16x"):
        crafter(tiny(family), "SD1.5 1024x1024 (4x pixels)")
    with pytest.raises(ValueError, match="written for a UNet with 3 resolution levels"):
        crafter(tiny(family), "SDXL 4096x4096 (16x pixels)")
    with pytest.raises(ValueError, match="no weak table"):
        crafter(tiny(family), "generic 4x pixels", damped="on")


@pytest.mark.parametrize("family", UNETS)
def test_dispersion_spreads_the_listed_kernels_in_its_share_of_the_steps_at_half_dilation(tiny, family, host):
    model = tiny(family)
    plain = sample(crafter(model, progressive="off", damped="off"), family, steps=STEPS)
    patched = crafter(model, progressive="off", damped="off", disperse=0.35)
    sigmas = Sigmas(patched)
    out = sample(patched, family, steps=STEPS)
    got = report(host, patched)
    inside = [s for s in sigmas.sigmas if s > model.get_model_object("model_sampling").percent_to_sigma(0.35)]
    assert 0 < got["dispersed"] == len(inside) < got["dilated"]
    # generic 16x on two levels: factor 4 everywhere it dilates, 2 where (and while) dispersed
    assert all(f == [2.0, 4] for path, f in got["factors"].items()), got["factors"]
    assert (out - plain).abs().max() > 1e-3


def test_dispersion_needs_a_16x_preset_and_fits_inside_the_dilated_steps(tiny):
    with pytest.raises(ValueError, match="no dispersion sites"):
        crafter(tiny("sd15"), "generic 4x pixels", disperse=0.2)
    with pytest.raises(ValueError, match="exceeds dilate_percent"):
        crafter(tiny("sd15"), percent=0.3, disperse=0.5)


def test_casting_convolutions_take_their_weights_through_comfys_cast():
    """Modules that cast their weights (manual-cast ops, offloaded or low-VRAM layers) are run with the weight and
    bias ComfyUI's cast gives: with nothing to convert, the same result as the plain path."""
    plain, casting = tiny_models.make_model("sd15"), tiny_models.make_model("sd15")
    for module in casting.model.diffusion_model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.comfy_cast_weights = True
    expected = sample(crafter(plain, damped="off", disperse=0.3), "sd15", steps=3)
    assert torch.allclose(sample(crafter(casting, damped="off", disperse=0.3), "sd15", steps=3), expected,
                          atol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_stays_in_its_dtype(dtype, host):
    model = tiny_models.make_model("sd15", dtype=dtype)
    seen = []

    def record(executor, x, t, *args, **kwargs):
        out = executor(x, t, *args, **kwargs)
        seen.append(out.dtype)
        return out
    import comfy.patcher_extension as pe
    base = sample(model, "sd15", steps=3)
    patched = crafter(model, disperse=0.3)
    patched.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test_dtype", record)
    out = sample(patched, "sd15", steps=3)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-2
    assert set(seen) == {dtype} and report(host, patched)["weak_passes"] > 0


def test_patches_taken_off_by_a_model_sharing_the_weights_stop_it_with_a_clear_error(tiny):
    """ComfyUI keeps one clone's module patches on shared weights: a second model from the same checkpoint loaded
    alongside takes the wrappers off, and re-dilation would silently not happen."""
    from test_cache import take_patches_off_mid_run
    patched = crafter(take_patches_off_mid_run(tiny("sd15").clone()), "generic 4x pixels", percent=1.0)
    with pytest.raises(ValueError, match="ScaleCrafter found its module patches taken off"):
        sample(patched, "sd15", steps=STEPS)
