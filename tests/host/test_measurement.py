"""The measurement nodes inside ComfyUI: Degrade makes the observation a restorer expects (checked against core
ComfyUI's own image ops where one exists), Measurement keeps it with its operator and a start image consistent
with it, and bad combinations are refused by name."""
import pytest
import torch

from conftest import run_node


def _image(size=32, batch=1, seed=0):
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


def _both(image, **settings):
    settings = {"factor": 4, "noise_level": 0.0, **settings}
    observed, = run_node("TrainFreeDegrade", image=image, seed=0, **settings)
    measurement, start = run_node("TrainFreeMeasurement", image=observed, **settings)
    return observed, measurement, start


def test_super_resolution_observes_what_comfyui_area_downscaling_gives(pack):
    import comfy.utils
    image = _image()
    observed, measurement, start = _both(image, degradation="super-resolution")
    area = comfy.utils.common_upscale(image.movedim(-1, 1), 8, 8, "area", "disabled").movedim(1, -1)
    assert torch.allclose(observed, area, atol=1e-6)
    assert start.shape == image.shape
    assert torch.allclose(measurement.operator.forward(start), observed, atol=1e-6)


def test_inpainting_keeps_the_unmasked_pixels_and_starts_from_them(pack):
    image = _image()
    mask = torch.zeros(1, 32, 32)
    mask[:, 16:] = 1
    observed, measurement, start = _both(image, degradation="inpainting", mask=mask)
    assert torch.equal(start[:, :16], image[:, :16]) and not start[:, 16:].any()
    assert torch.equal(measurement.residual(image), torch.zeros_like(image))


def test_colourisation_gives_a_grey_image_and_a_grey_start(pack):
    observed, measurement, start = _both(_image(), degradation="colourisation")
    assert torch.equal(observed[..., 0], observed[..., 2]) and torch.allclose(start, observed, atol=1e-6)
    assert measurement.observed.shape[-1] == 1


def test_denoising_adds_the_noise_asked_for_and_keeps_its_level(pack):
    image = torch.full((1, 64, 64, 3), 0.5)
    observed, measurement, _ = _both(image, degradation="denoising", noise_level=0.1)
    assert abs((observed - image).std().item() - 0.1) < 0.005 and measurement.noise_level == pytest.approx(0.1)


@pytest.mark.parametrize("settings, words", [
    ({"degradation": "denoising", "noise_level": 0.0}, "noise_level"),
    ({"degradation": "inpainting"}, "mask"),
    ({"degradation": "super-resolution", "mask": torch.zeros(1, 32, 32)}, "disconnect the mask"),
    ({"degradation": "inpainting", "mask": torch.zeros(1, 16, 16)}, "the image's size"),
    ({"degradation": "super-resolution", "factor": 2.0 * float("nan")}, "factor"),
])
def test_bad_settings_are_refused_by_name(settings, words, pack):
    with pytest.raises(ValueError, match=words):
        _both(_image(), **{"factor": 4, "noise_level": 0.0, **settings})


def test_a_restored_size_latent_models_cannot_take_is_refused(pack):
    with pytest.raises(ValueError, match="multiples of 8"):
        run_node("TrainFreeMeasurement", image=_image(size=3), degradation="super-resolution", factor=3,
                 noise_level=0.0)
