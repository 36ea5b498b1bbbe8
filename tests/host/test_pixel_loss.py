"""Decoding with gradients inside ComfyUI's inference mode: the pixels equal ComfyUI's own VAE decode, the gradient
of a pixel loss reaches the latent and matches a finite difference, and the VAE's stored weights and ordinary
decodes are untouched afterwards."""
import pytest
import torch

from harness import tiny_models

FAMILY_CHANNELS = {"sd15": 4, "flux": 16}


@pytest.mark.parametrize("family", list(FAMILY_CHANNELS))
def test_decode_is_comfyuis_and_differentiable(tiny, host, family):
    model = tiny(family)
    vae = tiny_models.make_vae(FAMILY_CHANNELS[family])
    decoder = host.PixelDecoder(vae, model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, FAMILY_CHANNELS[family], 4, 4, generator=g)
    target = torch.rand(2, 32, 32, 3, generator=g)
    weights = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}

    with host.differentiating(model, "test"):
        latent = x.clone().requires_grad_(True)
        pixels = decoder.decode(latent)
        loss = ((pixels - target) ** 2).sum()
        grad, = torch.autograd.grad(loss, latent)

        direction = torch.randn(x.shape, generator=g)
        step = 1e-2
        with torch.no_grad():
            ahead = ((decoder.decode(x + step * direction) - target) ** 2).sum()
            behind = ((decoder.decode(x - step * direction) - target) ** 2).sum()
    finite = (ahead - behind) / (2 * step)
    assert torch.isclose((grad * direction).sum(), finite, rtol=2e-2), ((grad * direction).sum(), finite)

    ordinary = vae.decode(model.model.process_latent_out(x))
    assert torch.allclose(pixels.detach().clamp(0, 1), ordinary, atol=1e-5)
    assert all(torch.equal(v, weights[k]) for k, v in vae.first_stage_model.state_dict().items())
    assert torch.equal(vae.decode(model.model.process_latent_out(x)), ordinary)
