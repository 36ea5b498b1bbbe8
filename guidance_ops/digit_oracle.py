"""The digit oracle: a small CNN trained on the real digit scans' train split (``bench/quality/oracle.py`` trains
it) that reads the digit off an image of the pack's reference models. It sees the image's ink map, the distance of
each pixel from the background colour, so the digit's colour and the background do not matter."""
import os

import torch
import torch.nn.functional as F

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_model",
                       "digit_oracle.safetensors")
SIDE = 32
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {"red": (0.90, 0.15, 0.12), "yellow": (0.95, 0.82, 0.10), "green": (0.12, 0.70, 0.22),
           "blue": (0.15, 0.30, 0.95), "purple": (0.62, 0.20, 0.85)}  # the reference models' digit colours


def border_colour(images, width=4):
    """Per-image background estimate: the median colour of the outer ``width`` pixels of [N, 3, H, W] images."""
    n, c, h, w = images.shape
    mask = torch.ones(h, w, dtype=torch.bool, device=images.device)
    mask[width:h - width, width:w - width] = False
    return images[:, :, mask].median(dim=2).values


def ink_map(images):
    """How far each pixel is from the image's background colour, scaled to 0..1 per image: ``[N, 1, H, W]``."""
    distance = (images - border_colour(images)[:, :, None, None]).norm(dim=1, keepdim=True)
    return distance / distance.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]


class DigitOracle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1),
                                          torch.nn.Conv2d(32, 64, 3, padding=1)])
        self.features = torch.nn.Linear(64 * 4 * 4, 64)
        self.head = torch.nn.Linear(64, 10)

    @staticmethod
    def prepare(images):
        return F.interpolate(ink_map(images), size=(SIDE, SIDE), mode="area")

    def embed_prepared(self, x):
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return F.relu(self.features(x.flatten(1)))

    def classify_prepared(self, x):
        return self.head(self.embed_prepared(x))

    def embed(self, images):
        return self.embed_prepared(self.prepare(images))

    def forward(self, images):
        return self.classify_prepared(self.prepare(images))


def network_logits(network, images):
    """``network(images)``; when autograd is recording and the weights are inference tensors (a node loaded them
    under ComfyUI's inference mode), with ordinary copies of them, so that the logits can be differentiated."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return network(images)
    state = {**dict(network.named_parameters()), **dict(network.named_buffers())}
    if not any(t.is_inference() for t in state.values()):
        return network(images)
    return torch.func.functional_call(network, {k: v.clone() for k, v in state.items()}, (images,))


def load(path=WEIGHTS):
    from safetensors.torch import load_file
    oracle = DigitOracle()
    oracle.load_state_dict(load_file(path))
    return oracle.eval()
