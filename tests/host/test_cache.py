"""DeepCache and the DiT block cache on the real ComfyUI with the tiny models of every family: a schedule that never
reuses is the uncached result bit for bit; a reuse step equals the full network with the cached part swapped for
what the last full step computed; on reuse steps only the shallow branch / the kept blocks run; every chunk (cond,
uncond, PAG's perturbed pass) keeps its own features; state does not outlive a run; bad schedules and models get
clear errors."""

import pytest
import torch

from conftest import run_node, sample
from harness import tiny_models

UNETS = ("sd15", "sdxl")
DITS = ("sd3", "flux")
STEPS = 6


def deepcache(model, interval=3, branch=0, mode="uniform", start=0.0, end=1.0, schedule=None):
    return run_node("TrainFreeDeepCache", model=model, cache_interval=interval, schedule=mode, start_percent=start,
                    end_percent=end, cache_branch=branch, cache_schedule=schedule)[0]


def block_cache(model, interval=3, first=1, last=-1, mode="uniform", start=0.0, end=1.0, schedule=None):
    return run_node("TrainFreeBlockCache", model=model, cache_interval=interval, schedule=mode, start_percent=start,
                    end_percent=end, first_block=first, last_block=last, cache_schedule=schedule)[0]


def cache(model, family, **kw):
    return (deepcache if family in UNETS else block_cache)(model, **kw)


def report(host, model):
    (only,) = [r for key, r in host.run_reports(model).items() if "cache" in key]
    return only


def blocks_of(model, family):
    """{name: module} of the diffusion model's blocks, in order (UNet: the first layer of each block)."""
    net = model.model.diffusion_model
    if family in UNETS:
        return {**{f"input {i}": b[0] for i, b in enumerate(net.input_blocks)}, "middle": net.middle_block[0],
                **{f"output {i}": b[0] for i, b in enumerate(net.output_blocks)}}
    if family == "flux":
        return {**{f"double {i}": b for i, b in enumerate(net.double_blocks)},
                **{f"single {i}": b for i, b in enumerate(net.single_blocks)}}
    return {f"joint {i}": b for i, b in enumerate(net.joint_blocks)}


class BlockCalls:
    """Counts the calls of each block (forward hooks on ComfyUI's own modules)."""

    def __init__(self, model, family):
        self.calls = {}
        self.hooks = [module.register_forward_hook(lambda m, a, o, name=name: self._count(name))
                      for name, module in blocks_of(model, family).items()]

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def __enter__(self):
        return self


@pytest.mark.parametrize("family", UNETS + DITS)
def test_a_schedule_that_never_reuses_is_the_uncached_result_exactly(tiny, family):
    model = tiny(family)
    assert torch.equal(sample(cache(model, family, interval=1), family, steps=STEPS), sample(model, family, steps=STEPS))


@pytest.mark.parametrize("family", UNETS + DITS)
def test_reuse_changes_the_result_and_is_reported(tiny, family, host):
    model = tiny(family)
    patched = cache(model, family, interval=3)
    assert not torch.equal(sample(patched, family, steps=STEPS), sample(model, family, steps=STEPS))
    rep = report(host, patched)
    # steps 1, 2, 4, 5 of 6 reuse; cond and uncond are one evaluation
    assert rep["evaluations"] == STEPS and rep["reusing_evaluations"] == 4 and rep["full_evaluations"] == 2
    assert sum(rep["reused"].values()) == 4 * len(rep["reused"]) and rep["missed"] == {}


@pytest.mark.parametrize("family,branch", [("sd15", 0), ("sd15", 2), ("sdxl", 1), ("sdxl", 3)])
def test_reuse_steps_run_only_the_shallow_branch(tiny, family, branch):
    model = tiny(family)
    depth = len(model.model.diffusion_model.input_blocks) - 1
    patched = deepcache(model, interval=3, branch=branch)
    with BlockCalls(patched, family) as counter:
        sample(patched, family, steps=STEPS)
    shallow = {f"input {i}" for i in range(branch + 1)} | {f"output {i}" for i in range(depth - branch, depth + 1)}
    for name, calls in counter.calls.items():
        assert calls == (STEPS if name in shallow else 2), name  # 2 full steps of 6
    assert set(counter.calls) == set(blocks_of(model, family))


@pytest.mark.parametrize("family,first,last,kept", [
    ("flux", 1, -1, {"double 0"}), ("flux", 0, 1, {"single 0", "single 1"}), ("flux", 1, 2, {"double 0", "single 1"}),
    ("sd3", 1, -1, {"joint 0"}), ("sd3", 0, 0, {"joint 1"})])
def test_reuse_steps_run_only_the_blocks_outside_the_range(tiny, family, first, last, kept):
    model = tiny(family)
    patched = block_cache(model, interval=3, first=first, last=last)
    with BlockCalls(patched, family) as counter:
        sample(patched, family, steps=STEPS)
    for name, calls in counter.calls.items():
        assert calls == (STEPS if name in kept else 2), name


def two_evaluations(model, family, sigmas, outputs):
    """Sample with a sampler that evaluates the model at sigmas[0] on the noise, then at sigmas[1] on a fixed
    other latent; ``outputs`` receives both denoised predictions."""
    import comfy.sample
    import comfy.samplers

    @torch.no_grad()  # as every sampler runs (with gradients the cache runs in full)
    def sampler(k_model, x, sigmas_, extra_args=None, callback=None, disable=None):
        ones = x.new_ones([x.shape[0]])
        outputs.append(k_model(x, sigmas_[0] * ones, **extra_args))
        outputs.append(k_model(x.flip(-1) * 0.7, sigmas_[1] * ones, **extra_args))
        return outputs[-1]
    latent = torch.zeros(1, tiny_models.LATENT_CHANNELS[family], 16, 16)
    comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 0), 3.0, comfy.samplers.KSAMPLER(sampler),
                               sigmas, tiny_models.conditioning(family, seed=1), tiny_models.conditioning(family, seed=2),
                               latent, disable_pbar=True, seed=0)


def test_a_reuse_step_is_the_full_unet_with_the_deep_feature_of_the_last_full_step(tiny):
    """DeepCache's statement: a retrieve step computes the shallow branch and feeds it the deep feature the last
    full step fed output block L-b. The reference swaps that feature by a plain output-block patch of ours."""
    family, branch = "sd15", 1
    model = tiny(family)
    depth = len(model.model.diffusion_model.input_blocks) - 1
    sigmas = model.get_model_object("model_sampling").sigmas[[999, 600]]
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    cached = []
    two_evaluations(deepcache(model, interval=2, branch=branch), family, sigmas, cached)

    kept = {}

    def swap(h, hsp, transformer_options):
        if transformer_options["block"] == ("output", depth - branch):
            if "h" in kept:
                return kept["h"], hsp
            kept["h"] = h
        return h, hsp
    reference = model.clone()
    reference.set_model_output_block_patch(swap)
    expected = []
    two_evaluations(reference, family, sigmas, expected)
    assert torch.equal(cached[0], expected[0])
    assert torch.allclose(cached[1], expected[1], atol=1e-6, rtol=0)
    plain = []
    two_evaluations(model, family, sigmas, plain)
    assert not torch.allclose(cached[1], plain[1], atol=1e-3)


@pytest.mark.parametrize("family", DITS)
def test_a_reuse_step_adds_the_residual_the_range_made_on_the_last_full_step(tiny, family):
    model = tiny(family)
    blocks = blocks_of(model, family)
    sampling = model.get_model_object("model_sampling")
    sigmas = torch.tensor([float(sampling.percent_to_sigma(0.1)), float(sampling.percent_to_sigma(0.5)), 0.0])
    cached = []
    # the whole model but the first and last block (SD3: joint block 0 is skipped, the last kept)
    first_block, last_block = (0, 0) if family == "sd3" else (1, len(blocks) - 2)
    two_evaluations(block_cache(model, interval=2, first=first_block, last=last_block), family, sigmas, cached)

    # the reference: each kind's skipped blocks form one range (Flux joins text and image between the kinds)
    state = {}
    names = list(blocks)[first_block:last_block + 1]
    ranges = {}
    for name in names:
        ranges.setdefault(name.split()[0], []).append(name)

    def link(name, span):
        def block(args, extra):
            streams = {k: args[k] for k in ("img", "txt") if k in args}
            if name == span[0]:
                state[("enter", span[0])] = {k: v.clone() for k, v in streams.items()}
            if state.get("reusing"):
                out = dict(streams)
                if name == span[-1]:
                    out = {k: v + state[("residual", span[0])][k] for k, v in out.items()}
                return out
            out = extra["original_block"](args)
            if name == span[-1]:
                state[("residual", span[0])] = {k: out[k] - state[("enter", span[0])][k] for k in streams}
            return out
        return block
    reference = model.clone()
    for span in ranges.values():
        for name in span:
            kind = "single_block" if name.startswith("single") else "double_block"
            reference.set_model_patch_replace(link(name, span), "dit", kind, int(name.split()[1]))

    def mark(executor, x, t, *args, **kwargs):
        state["reusing"] = float(t.flatten()[0]) < float(sigmas[0]) - 1e-6
        return executor(x, t, *args, **kwargs)
    import comfy.patcher_extension as pe
    reference.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_mark", mark)
    expected = []
    two_evaluations(reference, family, sigmas, expected)
    assert torch.equal(cached[0], expected[0])
    assert torch.allclose(cached[1], expected[1], atol=1e-5, rtol=0)


class ChunkOutputs:
    """APPLY_MODEL wrapper: per evaluation, the model output of each chunk of the batch."""

    def __init__(self, model):
        import comfy.patcher_extension as pe
        self.evaluations = []
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_chunks", self)

    def __call__(self, executor, x, *args, **kwargs):
        out = executor(x, *args, **kwargs)
        cou = (args[4] if len(args) > 4 else kwargs["transformer_options"])["cond_or_uncond"]
        size = out.shape[0] // len(cou)
        self.evaluations.append({c: out[i * size:(i + 1) * size] for i, c in enumerate(cou)})
        return out


def pag(model, layers="auto"):
    return run_node("TrainFreePAG", model=model, scale=3.0, layers=layers, start_percent=0.0, end_percent=1.0)[0]


@pytest.mark.parametrize("family,order", [("sd15", "pag first"), ("sdxl", "cache first"), ("flux", "pag first"),
                                          ("flux", "cache first"), ("sd3", "pag first")])
def test_the_perturbed_pass_keeps_its_own_cache(tiny, family, order, host):
    """With PAG the sampler's batch holds cond, uncond and the perturbed copy of cond. On reuse steps the
    perturbed chunk must get the features its own (perturbed) full step made: served cond's, it would equal the
    conditional prediction and PAG would silently do nothing there."""
    model = tiny(family)
    layers = "auto" if family != "flux" else "double.0"  # inside the cached range on Flux: first=0
    first = 0 if family in DITS else 1
    kw = {"first": first} if family in DITS else {}
    patched = pag(cache(model, family, interval=3, **kw), layers) if order == "cache first" \
        else cache(pag(model, layers), family, interval=3, **kw)
    chunks = ChunkOutputs(patched)
    out = sample(patched, family, steps=STEPS)
    reused = [e for i, e in enumerate(chunks.evaluations) if i % 3]
    assert len(chunks.evaluations) == STEPS and all(set(e) == {0, 1, 2} for e in chunks.evaluations)
    for evaluation in reused:
        assert not torch.allclose(evaluation[2], evaluation[0], atol=1e-4)
    assert report(host, patched)["missed"] == {}
    assert not torch.equal(out, sample(cache(model, family, interval=3, **kw), family, steps=STEPS))


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_composes_with_apg(tiny, family):
    model = tiny(family)

    def apg(m):
        return run_node("TrainFreeAPG", model=m, eta=0.0, norm_threshold=5.0, momentum=-0.5)[0]
    both = sample(cache(apg(model), family, interval=3), family, steps=STEPS)
    assert not torch.equal(both, sample(apg(model), family, steps=STEPS))
    assert not torch.equal(both, sample(cache(model, family, interval=3), family, steps=STEPS))
    assert torch.equal(sample(apg(cache(model, family, interval=1)), family, steps=STEPS),
                       sample(apg(model), family, steps=STEPS))


@pytest.mark.parametrize("family", UNETS + DITS)
def test_batch_size_resolution_and_steps_may_change_between_runs(tiny, family, host):
    model = tiny(family)
    patched = cache(model, family, interval=2)
    sample(patched, family, steps=4, size=16, batch=1)
    out = sample(patched, family, steps=5, size=24, batch=2)
    rep = report(host, patched)
    assert out.shape[0] == 2 and out.shape[-1] == 24
    assert rep["evaluations"] == 5 and rep["reusing_evaluations"] == 2 and rep["missed"] == {}
    fresh = cache(model, family, interval=2)
    assert torch.equal(out, sample(fresh, family, steps=5, size=24, batch=2))


def test_the_window_limits_reuse_to_its_steps(tiny, host):
    model = tiny("sd15")
    patched = deepcache(model, interval=2, start=0.5, end=1.0)
    sample(patched, "sd15", steps=8)
    rep = report(host, patched)
    assert 0 < rep["reusing_evaluations"] < 4  # the uniform 1:2 schedule alone reuses at 4 of 8 steps


def test_nothing_is_kept_after_a_run_or_an_error(tiny, host):
    model = tiny("sd15")
    patched = deepcache(model, interval=2)
    sample(patched, "sd15", steps=4)
    scope = next(s for k, s in patched.model_options["transformer_options"]["trainfree_runs"].items() if "cache" in k)
    assert scope.state is None

    def fail(executor, *args, **kwargs):
        raise RuntimeError("boom")
    import comfy.patcher_extension as pe
    failing = patched.clone()
    failing.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, "test_fail", fail)
    with pytest.raises(RuntimeError, match="boom"):
        sample(failing, "sd15", steps=4)
    assert scope.state is None


def schedule_of(text, steps=STEPS, unit="branch 0"):
    from guidance_ops import cache_schedule
    return cache_schedule.Schedule.from_json({"format": "trainfree-cache-schedule", "version": 1, "steps": steps,
                                              "compute": {unit: text}})


def test_a_connected_schedule_decides_every_step(tiny, host):
    model = tiny("sd15")
    patched = deepcache(model, mode="from schedule input", schedule=schedule_of("CRRRCR"))
    with BlockCalls(patched, "sd15") as counter:
        sample(patched, "sd15", steps=STEPS)
    assert counter.calls["middle"] == 2 and report(host, patched)["reused"] == {"branch 0": 4}
    same = deepcache(model, mode="from schedule input", schedule=schedule_of("CRRCRR"))
    assert torch.equal(sample(same, "sd15", steps=STEPS), sample(deepcache(model, interval=3), "sd15", steps=STEPS))


@pytest.mark.parametrize("kw,message", [
    ({"mode": "from schedule input"}, "no cache_schedule is connected"),
    ({"schedule": schedule_of("CRRCRR")}, "would ignore it"),
    ({"mode": "from schedule input", "schedule": schedule_of("CRRCRR", unit="branch 1")}, "set the node's branch"),
    ({"branch": 9}, "branches 0 to 3"),
    ({"start": 0.8, "end": 0.2}, "swap them"),
])
def test_bad_settings_are_refused_at_the_node(tiny, kw, message):
    with pytest.raises(ValueError, match=message):
        deepcache(tiny("sd15"), **kw)


def test_a_schedule_for_another_step_count_is_refused_when_sampling(tiny):
    patched = deepcache(tiny("sd15"), mode="from schedule input", schedule=schedule_of("CRRCRR"))
    with pytest.raises(ValueError, match="the schedule has 6 steps but the sampler runs 4: set steps to 6"):
        sample(patched, "sd15", steps=4)


def test_block_ranges_outside_the_model_are_refused(tiny):
    with pytest.raises(ValueError, match="do not fit this model's 4 blocks"):
        block_cache(tiny("flux"), first=2, last=7)
    with pytest.raises(ValueError, match="single 0-1"):
        block_cache(tiny("flux"), first=0, last=-1, mode="from schedule input",
                    schedule=schedule_of("CRRCRR", unit="single 0-1"))


@pytest.mark.parametrize("node,family,message", [(deepcache, "flux", "use the Block Cache node"),
                                                 (block_cache, "sd15", "use DeepCache")])
def test_a_model_it_cannot_serve_is_refused(tiny, node, family, message):
    with pytest.raises(ValueError, match=message):
        node(tiny(family))


def test_evaluations_that_carry_gradients_run_in_full(tiny, host):
    """Null-text inversion differentiates through the model: a reuse step would cut the deep path out of the
    gradient, so evaluations made with gradients on run in full (and are counted)."""
    outputs = []
    model = tiny("sd15")
    sigmas = model.get_model_object("model_sampling").sigmas[[999, 600]]
    patched = deepcache(model, interval=2)
    with torch.enable_grad():
        two_evaluations_with_gradients(patched, sigmas, outputs)
    rep = report(host, patched)
    assert rep["full_for_gradients"] == 2 and rep["reusing_evaluations"] == 0


def two_evaluations_with_gradients(model, sigmas, outputs):
    import comfy.sample
    import comfy.samplers

    def sampler(k_model, x, sigmas_, extra_args=None, callback=None, disable=None):
        with torch.enable_grad():
            ones = x.new_ones([x.shape[0]])
            for sigma in sigmas_[:2]:
                outputs.append(k_model(x, sigma * ones, **extra_args))
        return outputs[-1].detach()
    latent = torch.zeros(1, 4, 16, 16)
    comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 0), 3.0, comfy.samplers.KSAMPLER(sampler),
                               torch.cat([sigmas, sigmas.new_zeros(1)]), tiny_models.conditioning("sd15", seed=1),
                               tiny_models.conditioning("sd15", seed=2), latent, disable_pbar=True, seed=0)


def test_two_deepcaches_on_one_model_are_refused(tiny):
    with pytest.raises(ValueError, match="keep one DeepCache node"):
        deepcache(deepcache(tiny("sd15")))


class InjectControl:
    """APPLY_MODEL wrapper outside the cache: hands the UNet ControlNet-style residuals (one per block, in the
    order ComfyUI pops them), as a ControlNet node does, recording what the model computed at each block."""

    def __init__(self, model, scale=0.5):
        import comfy.patcher_extension as pe
        self.scale = scale
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_control", self)

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        b, (h, w) = x.shape[0], x.shape[-2:]
        shapes = [(32, h, w), (32, h, w), (32, h // 2, w // 2), (64, h // 2, w // 2)]  # tiny SD1.5's input blocks
        ones = [torch.full((b, *s), self.scale) for s in shapes]
        control = {"input": ones[::-1], "middle": [torch.full((b, 64, h // 2, w // 2), self.scale)],
                   "output": list(ones)}  # output block i pops hs[3 - i]'s shape from the end
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def test_controlnet_residuals_of_skipped_blocks_are_left_out_and_the_rest_applied(tiny, caplog):
    import logging
    model = tiny("sd15")
    controlled = model.clone()
    InjectControl(controlled)
    with caplog.at_level(logging.WARNING):
        neutral = sample(deepcache(controlled, interval=1), "sd15", steps=STEPS)
        assert torch.equal(neutral, sample(controlled, "sd15", steps=STEPS))
        with_control = sample(deepcache(controlled, interval=3), "sd15", steps=STEPS)
    assert "control could not be applied" not in caplog.text
    assert not torch.equal(with_control, sample(deepcache(model, interval=3), "sd15", steps=STEPS))


@pytest.mark.parametrize("family", ("sd15", "flux"))
def test_inside_a_frecas_cascade_each_stage_gets_its_own_schedule(tiny, family, host):
    """FreCaS hands the sampler every stage's sigmas one after another; each stage starts with a full step (its
    latent has a new size) and follows the 1:N schedule for its own steps."""
    from test_frecas import frecas, guided
    model = tiny(family)

    def cascade(m):
        sampler, sigmas, latent = frecas(m, family, steps="4, 3", ends="200, 0", width=128, base=64, fa=False, ca=0.0)
        return guided(m, family, sampler, sigmas, latent["samples"])
    assert torch.equal(cascade(cache(model, family, interval=1)), cascade(model))
    patched = cache(model, family, interval=2)
    out = cascade(patched)
    rep = report(host, patched)
    assert rep["evaluations"] == 7 and rep["steps"] == 7
    assert rep["reusing_evaluations"] == 2 + 1 and rep["missed"] == {}  # steps 1, 3 of stage 1; step 1 of stage 2
    assert not torch.equal(out, cascade(model))


@pytest.mark.parametrize("order", ["cache last", "cache first"])
def test_composes_with_core_freeu_pag_and_scalecrafter(tiny, order, host):
    """Core FreeU (an output-block patch like the cache point), core PAG (a post-CFG pass of its own) and
    ScaleCrafter (re-dilated convolutions and a weak unconditional pass): with a schedule that never reuses the
    result is theirs exactly, in either order; with reuse every pass finds its own kept feature."""
    model = tiny("sd15")

    def others(m):
        m = run_node("FreeU_V2", model=m, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]
        m = run_node("PerturbedAttentionGuidance", model=m, scale=1.5)[0]
        return run_node("TrainFreeScaleCrafter", model=m, preset="generic 16x pixels", dilate_percent=-1.0,
                        progressive="preset default", noise_damped="on", disperse_percent=0.0)[0]

    def stack(interval):
        if order == "cache first":
            return others(deepcache(model, interval=interval))
        return deepcache(others(model), interval=interval)
    assert torch.equal(sample(stack(1), "sd15", steps=STEPS), sample(others(model), "sd15", steps=STEPS))
    patched = stack(3)
    out = sample(patched, "sd15", steps=STEPS)
    rep = report(host, patched)
    assert rep["missed"] == {} and rep["reusing_evaluations"] > 4  # main, PAG's and the weak passes reuse
    assert not torch.equal(out, sample(others(model), "sd15", steps=STEPS))


def test_clones_of_one_model_with_other_branches_take_turns(tiny):
    """ComfyUI keeps one clone's object patches on shared weights: two DeepCache clones of one model (other
    branches), sampled in turns, each give what they give alone."""
    model = tiny("sd15")
    alone = {b: sample(deepcache(tiny_models.make_model("sd15"), interval=2, branch=b), "sd15", steps=STEPS)
             for b in (0, 2)}
    first, second = deepcache(model, interval=2, branch=0), deepcache(model, interval=2, branch=2)
    for patched, branch in ((first, 0), (second, 2), (first, 0), (second, 2)):
        assert torch.equal(sample(patched, "sd15", steps=STEPS), alone[branch])


def take_patches_off_mid_run(model):
    """What loading another model that shares the weights does to this one's module patches (ComfyUI keeps one
    clone's object patches on shared weights): taken off before the second evaluation."""
    import comfy.patcher_extension as pe
    seen = []

    def wrapper(executor, x, *args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            model.unpatch_model()
        return executor(x, *args, **kwargs)
    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_unpatch", wrapper)
    return model


def test_patches_taken_off_by_a_model_sharing_the_weights_stop_it_with_a_clear_error(tiny):
    patched = deepcache(take_patches_off_mid_run(tiny("sd15").clone()), interval=2)
    with pytest.raises(ValueError, match="Load that other model from its own loader node"):
        sample(patched, "sd15", steps=STEPS)


def test_a_guide_on_the_same_weights_leaves_the_gates_in_place(tiny, host):
    """Two-model guidance whose guide is a clone of the main model's weights: the guide is not loaded as a model of
    its own (it already is), so DeepCache's gates stay on and every planned reuse happens."""
    from test_guidance import two_model
    model = tiny("sd15")
    patched = deepcache(two_model(model, model.clone()), interval=2)
    out = sample(patched, "sd15", steps=STEPS)
    assert torch.isfinite(out).all() and report(host, patched)["reusing_evaluations"] == STEPS // 2
