"""Hooks on the sampler's model evaluations: post-CFG guidance terms, a CFG scale per evaluation, a second
model's prediction in the unconditional slot, and one extra conditional pass batched into ComfyUI's own call."""
from .family import UnsupportedModel
from .runs import PatchInput, Wrappers, guard_latent

_GUIDANCE_OFF = "trainfree_guidance_off"  # model_options flag: a patch switched guidance off for this evaluation


def add_post_cfg(model, fn):
    model.set_model_sampler_post_cfg_function(fn)


def add_guidance_delta(model, technique, needs_uncond, with_options=False):
    """Register a guidance technique that replaces plain CFG's combination of the two denoised predictions.

    ``technique(cond, uncond, scale, sigma, x)`` returns the technique's denoised prediction; the patch adds its
    difference from plain CFG to whatever the sampler has so far, so patches before and after it still act.
    With ``needs_uncond`` the unconditional pass also runs at cfg 1 (the technique has its own scales). With
    ``with_options`` the technique also gets the evaluation's model_options (to make model calls of its own).
    """
    def post_cfg(args):
        if args["uncond"] is None or args["model_options"].get(_GUIDANCE_OFF):
            return args["denoised"]  # no unconditional prediction, or a patch turned guidance off here
        cond, uncond, scale = args["cond_denoised"], args["uncond_denoised"], args["cond_scale"]
        plain = uncond + (cond - uncond) * scale
        extra = (args["model_options"],) if with_options else ()
        return args["denoised"] + (technique(cond, uncond, scale, args["sigma"], args["input"], *extra) - plain)
    guard_latent(model)
    model.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=needs_uncond)


def _reads_cfg(guider):
    """Whether the guider combines its passes with ``guider.cfg`` (CFGGuider, as KSampler uses it). Guiders that
    bring their own predict_noise (DualCFGGuider, PerpNegGuider) read other scales, so a per-step cfg would be
    ignored."""
    import comfy.samplers
    return type(guider).predict_noise is comfy.samplers.CFGGuider.predict_noise


def override_cfg_per_evaluation(model, scope, choose, after=None, title="This patch"):
    """A PREDICT_NOISE wrapper: ``choose(state, sigma, x, model_options, sampler_cfg)`` gives the CFG scale for
    this model evaluation or None to keep the sampler's. 1.0 switches guidance off: ComfyUI skips the
    unconditional pass unless a patch forces it, and techniques registered with ``add_guidance_delta`` stand
    aside as well. Then ``after(state, denoised, sigma, x, sampler_cfg)`` may rewrite the result. The
    sampler's scale is restored afterwards."""
    def predict_noise(executor, x, timestep, model_options, seed):
        state = scope.state
        guider = executor.class_obj
        if state is None:
            return executor(x, timestep, model_options, seed)
        if not _reads_cfg(guider):
            raise UnsupportedModel(f"{title} sets the CFG scale step by step, which the {type(guider).__name__} "
                                   f"guider does not read (it combines its passes its own way): sample with "
                                   f"KSampler, SamplerCustom or the CFGGuider node, or remove {title}")
        sampler_cfg = guider.cfg
        cfg = choose(state, timestep, x, model_options, sampler_cfg)
        if cfg is not None:
            guider.cfg = cfg
            if cfg == 1.0:
                model_options = {**model_options, _GUIDANCE_OFF: True}
        try:
            out = executor(x, timestep, model_options, seed)
        finally:
            guider.cfg = sampler_cfg
        return out if after is None else after(state, out, timestep, x, sampler_cfg)
    model.add_wrapper_with_key(Wrappers.PREDICT_NOISE, scope.key, predict_noise)


def uncond_pass_runs(model_options):
    """Whether ComfyUI runs the unconditional pass at cfg 1 (a patch asked for it)."""
    return bool(model_options.get("disable_cfg1_optimization", False))


def process_latent_in(model, latent):
    return model.model.process_latent_in(latent)


def predict_with(other, conds, x, sigma):
    """The denoised prediction of another (already loaded) model for one conditioning."""
    import comfy.samplers
    other.pre_run()
    return comfy.samplers.calc_cond_batch(other.model, [conds], x, sigma, other.model_options)[0]


def attach_model(model, key, other):
    """Have ComfyUI load ``other`` together with ``model`` for sampling. A second model on the same weights is
    loaded already; loading it as a model of its own would take the first one's module patches (DeepCache's
    gates, ScaleCrafter's convolutions) off the weights, which ComfyUI holds for one of them at a time."""
    if other.model is model.model:
        if other.patches_uuid != model.patches_uuid:
            raise UnsupportedModel("the second model shares its weights with the first but carries other weight "
                                   "patches (a LoRA); ComfyUI cannot hold both at once. Load it from its own loader.")
        return
    model.set_additional_models(key, [other])


def add_run_conditioning(model, key, conditioning):
    """Have the sampler prepare one more conditioning (a CONDITIONING value) with its own prompts on every run:
    areas, masks, the model's extra inputs and ControlNets, exactly as for the positive prompt. During the run
    ``run_conditioning(guider, key)`` hands it out in the form ``predict_with`` takes."""
    import comfy.sampler_helpers
    held = PatchInput(conditioning)

    def outer_sample(executor, *args, **kwargs):
        conds = executor.class_obj.conds
        conds[key] = comfy.sampler_helpers.convert_cond(held.value)
        try:
            return executor(*args, **kwargs)
        finally:  # a guider may be reused (a cached SamplerCustomAdvanced input): leave its conds as they were
            conds.pop(key, None)
    model.add_wrapper_with_key(Wrappers.OUTER_SAMPLE, key, outer_sample)


def run_conditioning(guider, key):
    return guider.conds[key]


def replace_uncond_with_guide(model, guide, scope, use_negative_prompt):
    """Two-model guidance: on the sampler's main evaluation, the unconditional slot is filled by ``guide``'s
    prediction (with the positive prompt for autoguidance, the negative one for NPO-style guidance), so CFG and
    every other patch combine the main model's conditional prediction with the guide's."""
    attach_model(model, scope.key, guide)

    def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
        state = _take_main_evaluation(scope)
        if state is None:
            return executor(model_, conds, x_in, timestep, model_options)
        main = executor(model_, [conds[0], None] + list(conds[2:]), x_in, timestep, model_options)
        if conds[1] is None:  # cfg 1 (or guidance switched off): the unconditional slot is not used
            return main
        guide_conds = conds[1] if use_negative_prompt else conds[0]
        guided = predict_with(guide, guide_conds, x_in, timestep)
        state.guide_passes += 1
        return [main[0], guided] + list(main[2:])

    _track_main_evaluation(model, scope)
    model.add_wrapper_with_key(Wrappers.CALC_COND_BATCH, scope.key, calc_cond_batch)


# ---------------------------------------------------------------- the sampler's main evaluation

def _track_main_evaluation(model, scope):
    """Mark each model evaluation of the sampler, so that a CALC_COND_BATCH wrapper can tell the sampler's own
    cond/uncond batch (the first one after the mark) from the extra passes other patches make."""
    def predict_noise(executor, *args, **kwargs):
        state = scope.state
        if state is None:
            return executor(*args, **kwargs)
        state.main_pending = True
        try:
            return executor(*args, **kwargs)
        finally:
            state.main_pending = False
    model.add_wrapper_with_key(Wrappers.PREDICT_NOISE, scope.key, predict_noise)


def _take_main_evaluation(scope):
    """The run state if this cond batch is the sampler's main one (consuming the mark), else None."""
    state = scope.state
    if state is None or not state.main_pending:
        return None
    state.main_pending = False
    return state


# ---------------------------------------------------------------- extra conditional pass

def add_extra_cond_pass(model, scope, wanted, extra_conds=None):
    """Batch one more copy of the positive conditioning (or ``extra_conds(state, positive_conds)``, a
    conditioning made from it) into ComfyUI's own cond/uncond model call.

    Only the sampler's main evaluation is extended (the first cond batch after each PREDICT_NOISE), never the
    extra passes other patches make. ``wanted(state, sigma)`` decides per evaluation; when it says yes,
    ``transformer_options[scope.key]`` holds the chunk index of the extra copy during that call (attention
    patches read it to find their rows) and ``state.extra_output`` receives its denoised prediction.
    """
    key = scope.key

    def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
        state = _take_main_evaluation(scope)
        if state is not None:
            state.extra_output = None
        if state is None or conds[0] is None or not wanted(state, timestep):
            return executor(model_, conds, x_in, timestep, model_options)
        options = dict(model_options)
        options["transformer_options"] = {**model_options.get("transformer_options", {}), key: len(conds)}
        extra = conds[0] if extra_conds is None else extra_conds(state, conds[0])
        out = executor(model_, list(conds) + [extra], x_in, timestep, options)
        state.extra_output = out[-1]
        state.extra_passes += 1
        return out[:-1]

    _track_main_evaluation(model, scope)
    model.add_wrapper_with_key(Wrappers.CALC_COND_BATCH, key, calc_cond_batch)
