"""Per-run state: a ``RunScope`` per patch, made when sampling starts and dropped when it ends (also on error or
interrupt), so batch size, resolution and step count may change freely between runs; and the latent check every
patch registers once per model."""
import uuid

import comfy.patcher_extension
import comfy.utils

from .family import FAMILY_NAMES, model_family

Wrappers = comfy.patcher_extension.WrappersMP
# Feature probe: ComfyUI 0.3.75's ModelPatcher.clone deep-copies model_options with copy.deepcopy, which would give
# each clone its own copy of a patch's RunScope unless the scope copies to itself (RunScope.__deepcopy__); later
# versions copy only the dicts and lists (comfy.utils.deepcopy_list_dict) and leave the objects in them shared.
CLONE_DEEP_COPIES_OBJECTS = not hasattr(comfy.utils, "deepcopy_list_dict")
_RUNS = "trainfree_runs"
# transformer_options flag of a side pass: a model call a patch makes to read something (a judge's denoising, a
# reference prompt's prediction), not one of the sampling trajectory's own rows. Controls that follow the
# trajectory's rows (prompt-to-prompt's source / target pairs) leave such calls alone.
SIDE_PASS = "trainfree_side_pass"


class PatchInput:
    """A value the user connected to a patch (a prompt's conditioning), kept as long as the patched model lives, as
    the patch's settings are; not per-run state (the server tests' leak probe does not count what it holds)."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def new_key(technique):
    return f"trainfree_{technique}_{uuid.uuid4().hex[:8]}"


class RunScope:
    """Per-run state of one patch.

    ``state`` is ``make_state(guider, noise, latent_image, ...)`` (the guider and the arguments of its
    outer_sample) while a sampling run is under way, None otherwise. ``finish(state)`` runs when the run ends,
    also on error or interrupt, and returns the report kept in ``last_report`` (numbers, no tensors).
    """

    def __init__(self, model, key, make_state, finish=None):
        self.key = key
        self.state = None
        self.last_report = None
        self._make_state, self._finish = make_state, finish
        guard_latent(model)
        model.add_wrapper_with_key(Wrappers.OUTER_SAMPLE, key, self._outer_sample)
        model.model_options.setdefault("transformer_options", {}).setdefault(_RUNS, {})[key] = self

    def __deepcopy__(self, memo):  # ComfyUI 0.3.75 deep-copies model_options on clone; the scope is shared
        return self

    def _outer_sample(self, executor, *args, **kwargs):
        outer = self.state  # a nested run (a sampler inside a sampler) gets its own state
        self.state = self._make_state(executor.class_obj, *args)
        try:
            return executor(*args, **kwargs)
        finally:
            if self._finish is not None:
                self.last_report = self._finish(self.state)
            self.state = outer


def step_of(sigmas, sigma):
    """The sampling step of an evaluation at ``sigma``: where it lies among the run's sample sigmas (a sigma between
    two of them, as multi-stage samplers evaluate, belongs to the step that starts above it)."""
    above = sum(1 for s in sigmas if s >= sigma * (1 - 1e-6))
    return min(max(above - 1, 0), len(sigmas) - 2)


_LATENT_GUARD = "trainfree_latent_guard"


def guard_latent(model):
    """Check the latent's channels once per run, before sampling (one wrapper however many patches ask for it)."""
    if not model.wrappers.get(Wrappers.OUTER_SAMPLE, {}).get(_LATENT_GUARD):
        model.add_wrapper_with_key(Wrappers.OUTER_SAMPLE, _LATENT_GUARD, _check_latent_wrapper)


def _check_latent_wrapper(executor, noise, latent_image, *args, **kwargs):
    check_latent(executor.class_obj.model_patcher, latent_image)
    return executor(noise, latent_image, *args, **kwargs)


def check_latent(model, latent):
    """A latent from another family's empty-latent node or VAE fails deep inside the model; say so plainly."""
    expected = getattr(model.model.latent_format, "latent_channels", None)
    if expected is not None and latent.ndim >= 4 and latent.shape[1] != expected:
        family = FAMILY_NAMES.get(model_family(model), type(model.model.diffusion_model).__name__)
        raise ValueError(f"the latent has {latent.shape[1]} channels but this model ({family}) works on "
                         f"{expected}-channel latents: make the latent with this model's empty-latent node "
                         f"(EmptyLatentImage for SD1.5 / SDXL, EmptySD3LatentImage for SD3 / Flux) or encode it "
                         f"with this model's VAE")


def run_reports(model):
    """``{key: last_report}`` of every patch on ``model`` that keeps a run scope (what the last run did)."""
    return {key: scope.last_report for key, scope in model.model_options.get("transformer_options", {})
            .get(_RUNS, {}).items()}
