"""Every tensor the pack creates while sampling takes its device and dtype from the tensors it is combined with.

No GPU is here to catch a tensor left on the CPU, so ``StrayTensorCheck`` watches every tensor factory call made
from the pack's own files (``nodes/``, ``guidance_ops/``) during real sampling runs of every node on half-precision
models: each must name its device and dtype, or take them from a tensor (``*_like``, ``Tensor.new_*``). The checker
itself is shown to catch a planted stray, in a copy of a pack module run through the real sampler.
"""
import importlib.util
import os

import pytest
import torch

from conftest import run_node, sample
from harness import comfy_host, tiny_models
from harness.stray_tensors import StrayTensorCheck
from test_guidance import AUTO, NEGATIVE, apg, damped, fdg, interval, residual, two_model
from test_half_precision import one_thread  # noqa: F401 (an autouse fixture)

PACK_ROOTS = [os.path.join(comfy_host.PACK_DIR, folder) for folder in ("nodes", "guidance_ops")]
SINE = "SINE (guide is a fine-tuned model mixed into the prompt branch)"
DTYPES = {"sd15": torch.float16, "sd3": torch.bfloat16, "flux": torch.bfloat16,
          tiny_models.VIDEO_FAMILY: torch.bfloat16}


def pag(model, other):
    return run_node("TrainFreePAG", model=model, scale=2.0, layers="auto", start_percent=0.0, end_percent=0.8,
                    adaptive_scale=0.0005, rescale=0.7)[0]


# Each node with the settings that run most of its code: clipping, projection and momentum; FDG + APG; steps on
# both sides of every window.
NODES = {
    "pag": pag,
    "apg": lambda m, other: apg(m, 0.5, 1.0, -0.5),
    "fdg": lambda m, other: fdg(m, levels=3, eta_low=0.5, eta_high=0.5),
    "interval": lambda m, other: interval(m, 0.5, 3.0),
    "noise_damped": lambda m, other: damped(m, other, 0.5),
    "residual_one_time": lambda m, other: residual(m, "one-time negative", delta=0.8),
    "residual_self": lambda m, other: residual(m, "self-negative"),
    "autoguidance": lambda m, other: two_model(m, other, AUTO),
    "negative_model": lambda m, other: two_model(m, other, NEGATIVE),
    "sine": lambda m, other: two_model(m, other, SINE),
}
CASES = [(node, family) for node in NODES for family in DTYPES
         if not (node == "pag" and family == tiny_models.VIDEO_FAMILY)]


@pytest.fixture(scope="module")
def models(pack):
    cache = {}

    def get(family, seed=0):
        if (family, seed) not in cache:
            cache[family, seed] = tiny_models.make_model(family, seed=seed, dtype=DTYPES[family])
        return cache[family, seed]
    return get


def video_sample(model, family):
    frames = 2 if family == tiny_models.VIDEO_FAMILY else None
    return sample(model, family, steps=3, size=8, frames=frames)


@pytest.mark.parametrize("node,family", CASES)
def test_the_pack_creates_no_tensor_on_a_default_device_or_dtype(models, node, family):
    patched = NODES[node](models(family), models(family, seed=7))
    with StrayTensorCheck(PACK_ROOTS) as check:
        out = video_sample(patched, family)
    assert torch.isfinite(out).all()
    assert check.strays == [], f"made without the device / dtype of their inputs: {sorted(set(check.strays))}"


def test_the_check_sees_the_pack_create_tensors(models):
    with StrayTensorCheck(PACK_ROOTS) as check:  # PAG builds a row mask per perturbed attention call
        video_sample(pag(models("sd15"), None), "sd15")
    assert check.seen > 0 and check.strays == []


PLANTED = "    delta = cond - uncond\n"


def _copy_of_apg(folder, planted):
    """guidance_ops/apg.py copied to ``folder``, its guidance difference made with ``planted``, imported."""
    with open(os.path.join(comfy_host.PACK_DIR, "guidance_ops", "apg.py")) as f:
        source = f.read()
    assert source.index(PLANTED) < source.index("def comfy_core_apg")  # the first one is in apg()
    path = os.path.join(folder, "apg_copy.py")
    with open(path, "w") as f:
        f.write(source.replace(PLANTED, planted, 1))
    spec = importlib.util.spec_from_file_location(f"apg_copy_{abs(hash(planted))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path, source[:source.index(PLANTED)].count("\n") + 1


@pytest.mark.parametrize("planted,stray", [
    ("    delta = (cond - uncond) * torch.tensor(1.0)\n", "tensor"),
    ("    delta = cond - uncond + torch.zeros(cond.shape, dtype=cond.dtype)\n", "zeros"),
    ("    delta = cond - uncond + torch.zeros(cond.shape, dtype=cond.dtype, device='cpu')\n", "zeros"),
    ("    delta = (cond - uncond).cpu()\n", "cpu"),
    ("    delta = (cond - uncond) * torch.tensor(1.0, dtype=cond.dtype, device=cond.device)\n", None),
    ("    delta = cond - uncond + torch.zeros_like(cond)\n", None),
], ids=["default_device_and_dtype", "default_device", "device_written_out", "pinned_to_cpu", "named", "like"])
def test_the_check_catches_a_stray_planted_in_a_copy_of_a_pack_module(models, host, tmp_path, planted, stray):
    copy, path, line = _copy_of_apg(str(tmp_path), planted)
    model = models("sd15").clone()
    host.add_guidance_delta(model, lambda cond, uncond, scale, sigma, x: copy.apg(cond, uncond, scale),
                            needs_uncond=False)
    with StrayTensorCheck([str(tmp_path)]) as check:
        video_sample(model, "sd15")
    assert check.seen == 3  # the planted line runs once per step
    assert check.strays == ([] if stray is None else [(stray, f"{path}:{line}")] * 3)
