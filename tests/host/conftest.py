"""Fixtures for tests that run the real ComfyUI (in-process, CPU) on tiny models of the four image families and
one video family."""
import pytest
import torch

from harness import comfy_host, tiny_models

FAMILIES = tiny_models.FAMILIES


@pytest.fixture(scope="session")
def pack():
    return comfy_host.boot()


@pytest.fixture(scope="session")
def host(pack):
    return comfy_host.pack_module("nodes.host")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny(pack):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_models.make_model(family)
        return cache[family]
    return get


@pytest.fixture
def folders(pack, tmp_path, monkeypatch):
    """ComfyUI's output and input folders in the test's own temporary folder."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path / "input"))
    return tmp_path


@pytest.fixture(scope="session")
def clip(pack):
    """The tiny SD1.5 text encoder."""
    return tiny_models.make_clip()


def run_node(class_type, **inputs):
    """Execute one node's function the way the engine does (V1 or V3 class) and return its outputs."""
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "define_schema"):
        return cls.execute(**inputs).args
    return getattr(cls(), cls.FUNCTION)(**inputs)


def sample(model, family, steps=4, cfg=3.0, size=16, batch=1, seed=0, tokens=8, sampler="euler",
           scheduler="normal", pos=None, neg=None, frames=None):
    """Sample ``family``; with ``frames``, a 5-D video latent [batch, C, frames, size, size]."""
    import comfy.sample
    video = () if frames is None else (frames,)
    latent = torch.zeros(batch, tiny_models.LATENT_CHANNELS[family], *video, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos = pos or tiny_models.conditioning(family, tokens=tokens, seed=1)
    neg = neg or tiny_models.conditioning(family, tokens=tokens, seed=2)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent, seed=seed,
                               disable_pbar=True)


class ModelCallCounter:
    """Counts the model evaluations and the batch rows ComfyUI pushes through the model (an APPLY_MODEL wrapper)."""

    def __init__(self, model):
        import comfy.patcher_extension as pe
        self.calls, self.rows = 0, 0
        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_counter", self)

    def __call__(self, executor, x, *args, **kwargs):
        self.calls += 1
        self.rows += x.shape[0]
        return executor(x, *args, **kwargs)


class FirstEvaluation:
    """A post-CFG function added after the patches: keeps the first evaluation's ``keys`` of the post-CFG args."""

    def __init__(self, model, keys=("input", "sigma", "cond_denoised", "uncond_denoised", "denoised")):
        model.set_model_sampler_post_cfg_function(self)
        self.keys, self.args = keys, None

    def __call__(self, args):
        if self.args is None:
            self.args = {k: args[k] for k in self.keys}
        return args["denoised"]


class EveryEvaluation:
    """A post-CFG function added after the patches: keeps every evaluation's ``keys`` of the post-CFG args."""

    def __init__(self, model, keys=("input", "sigma", "cond_denoised", "denoised")):
        model.set_model_sampler_post_cfg_function(self)
        self.keys, self.args = keys, []

    def __call__(self, args):
        self.args.append({k: args[k] for k in self.keys})
        return args["denoised"]


class AttentionOverride:
    """Base of the tests' attention recorders: installs itself as the model's attention override and survives
    ComfyUI 0.3.75's deep copy of model_options on clone."""

    def __init__(self, model):
        model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = self
        self.calls = []

    def __deepcopy__(self, memo):
        return self
