"""Degradation operators of plug-and-play restoration: the observed image is y = A(x) + n, n ~ N(0, noise_level^2).

Images are ComfyUI's IMAGE layout, B x H x W x C with values in [0, 1]. Each operator has

- ``forward(x)``: A(x), the measurement a clean image would give;
- ``adjoint(y)``: A^T(y), for the gradient of ||y - A(x)||^2 without autograd;
- ``right_inverse(y)``: an image whose measurement is exactly y, the natural starting point of a restoration
  (the Moore-Penrose pseudo-inverse, except for colourisation, where the tinted pseudo-inverse w y / |w|^2 is
  replaced by the grey image y (1, 1, 1), which also measures to y because the weights sum to 1).

RED-diff (Mardani et al. 2023) and Steered Diffusion (Nair et al. 2023) both restore under any such operator. In
latent models the measurement is taken on the VAE-decoded image.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma: what "grey" means in ComfyUI's and most editors' greyscale conversions.
LUMA = (0.299, 0.587, 0.114)
KINDS = ("inpainting", "super-resolution", "denoising", "colourisation")


class Operator:
    """What every operator shares: its ``kind`` and the sizes it maps between (the identity for all but
    super-resolution). Each operator defines ``forward``, ``adjoint`` and ``right_inverse`` itself."""
    kind = ""

    def measured_size(self, height, width):
        """The (height, width) of the measurement of an image of this size."""
        return height, width

    def restored_size(self, height, width):
        """The (height, width) of the image a measurement of this size comes from."""
        return height, width


class Identity(Operator):
    """Denoising: the image itself is observed (its noise is the measurement noise)."""
    kind = "denoising"

    def forward(self, x):
        return x

    def adjoint(self, y):
        return y

    def right_inverse(self, y):
        return y


@dataclass
class Inpainting(Operator):
    """Pixels under the mask are missing. ``mask`` is ComfyUI's MASK convention, 1 where the image is to be
    filled in, shaped H x W or B x H x W."""
    mask: torch.Tensor
    kind = "inpainting"

    def keep(self, like):
        keep = 1.0 - self.mask.to(like.device, like.dtype)
        return (keep if keep.dim() == 3 else keep.unsqueeze(0)).unsqueeze(-1)

    def forward(self, x):
        return x * self.keep(x)

    def adjoint(self, y):
        return y * self.keep(y)

    def right_inverse(self, y):
        return y * self.keep(y)


@dataclass
class SuperResolution(Operator):
    """The observed image is the clean one averaged over ``factor`` x ``factor`` blocks."""
    factor: int
    kind = "super-resolution"

    def forward(self, x):
        return F.avg_pool2d(x.movedim(-1, 1), self.factor).movedim(1, -1)

    def adjoint(self, y):
        return self.right_inverse(y) / self.factor ** 2

    def right_inverse(self, y):
        return y.repeat_interleave(self.factor, dim=1).repeat_interleave(self.factor, dim=2)

    def measured_size(self, height, width):
        return height // self.factor, width // self.factor

    def restored_size(self, height, width):
        return height * self.factor, width * self.factor


class Colourisation(Operator):
    """Only the luma of the image is observed (one channel)."""
    kind = "colourisation"

    def weights(self, like):
        return torch.tensor(LUMA, device=like.device, dtype=like.dtype)

    def forward(self, x):
        return (x * self.weights(x)).sum(-1, keepdim=True)

    def adjoint(self, y):
        return y * self.weights(y)

    def right_inverse(self, y):
        return y.expand(*y.shape[:-1], 3)


def operator(kind, mask=None, factor=4):
    """The operator of ``kind`` (one of ``KINDS``)."""
    if kind == "inpainting":
        if mask is None:
            raise ValueError("inpainting needs a mask: connect a MASK (1 where the image is to be filled in)")
        return Inpainting(mask)
    if kind == "super-resolution":
        if factor < 2:
            raise ValueError(f"the super-resolution factor must be 2 or more (got {factor})")
        return SuperResolution(int(factor))
    if kind == "denoising":
        return Identity()
    if kind == "colourisation":
        return Colourisation()
    raise ValueError(f"unknown degradation {kind!r}: choose one of {', '.join(KINDS)}")


@dataclass
class Measurement:
    """What was observed and how: ``observed`` = A(clean) + noise of std ``noise_level`` (pixel units)."""
    operator: Operator
    observed: torch.Tensor
    noise_level: float = 0.0

    def residual(self, x):
        """y - A(x) for a (restored) image x."""
        return self.observed.to(x.device, x.dtype) - self.operator.forward(x)

    def start(self):
        """The image restoration starts from: consistent with the observation, at the restored size."""
        return self.operator.right_inverse(self.observed).clamp(0, 1)

    def restored_size(self):
        return self.operator.restored_size(*self.observed.shape[1:3])


def degrade(image, op, noise_level=0.0, generator=None):
    """A clean image's observation under ``op`` with Gaussian noise of std ``noise_level``, kept in [0, 1]."""
    y = op.forward(image)
    if noise_level > 0:
        y = y + noise_level * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
    return y.clamp(0, 1)
