"""CLIP as a judge (Radford et al. 2021, zero-shot classification): the log-probability of each prompt for an
image is the log-softmax, over the prompts, of CLIP's logit scale times the cosine between the image embedding and
the prompt's projected text embedding."""
import torch

from .judges import Judge

MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learnt temperature exp(logit_scale) at 100 during training


class CLIPJudge(Judge):
    """Judges images by CLIP zero-shot classification over ``labels`` (the prompts). ``encode_image`` maps pixels
    [B, 3, H, W] in 0..1 to image embeddings [B, D]; ``text_embeds`` [K, D] are the prompts' projected text
    embeddings, in the same space."""
    reads = "pixels"

    def __init__(self, labels, text_embeds, logit_scale, encode_image):
        if len(labels) != text_embeds.shape[0]:
            raise ValueError(f"{len(labels)} labels but {text_embeds.shape[0]} text embeddings")
        self.labels = tuple(labels)
        self.text_embeds = text_embeds.float()
        self.logit_scale = float(logit_scale)
        self.encode_image = encode_image

    @torch.no_grad()
    def log_probs(self, pixels):
        return zero_shot_log_probs(self.encode_image(pixels), self.text_embeds, self.logit_scale)


def logit_scale(raw):
    """CLIP's temperature from its stored ``logit_scale`` parameter (a log): exp, capped as in training."""
    return min(float(torch.as_tensor(raw).detach().float().exp()), MAX_LOGIT_SCALE)


def zero_shot_log_probs(image_embeds, text_embeds, scale):
    """``[B, K]`` float32: log_softmax over the prompts of ``scale * cos(image_b, text_k)``."""
    image = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    text = torch.nn.functional.normalize(text_embeds.float().to(image.device), dim=-1)
    return torch.log_softmax(scale * image @ text.T, dim=-1)


def looks_untrained(weight):
    """Whether a projection matrix is evidently not a trained one: ComfyUI leaves a projection that a file lacks as
    uninitialised memory (non-finite values, zeros, denormals), which trained weights never show in bulk."""
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        return True
    return bool((w.abs() < 1e-30).float().mean() > 0.01)
