"""Adaptive Guidance (Castillo et al., AAAI 2025, arXiv 2312.12487): CFG's updates align with the plain conditional
ones as denoising goes on; once the cosine similarity between the conditional and the guided prediction reaches a
threshold, guidance stops for the rest of the run and the unconditional pass is no longer computed.

The similarity is taken on the denoised (x0) predictions: in noise space both predictions are dominated by the
shared noise and their cosine is near 1 from the first step (a known pitfall on SD / SDXL)."""
import torch

PAPER_THRESHOLD = 0.991  # the paper's gamma-bar that switches CFG off about half-way through 20 steps


def similarity(cond, guided):
    """The smallest, over the batch, cosine similarity between each sample's conditional and guided prediction."""
    c, g = cond.flatten(1).double(), guided.flatten(1).double()
    return float(torch.nn.functional.cosine_similarity(c, g, dim=1).min())


def stops_guidance(cond, guided, threshold):
    """Whether guidance ends here; a threshold of 1 keeps CFG for the whole run."""
    return threshold < 1.0 and similarity(cond, guided) >= threshold
