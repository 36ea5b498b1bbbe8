"""What the search samplers share: the scorer they maximise, the VAE that decodes what it reads, the budget."""
from .scorers import SCORER

CATEGORY = "trainfree/search"
BUDGET_TOOLTIP = ("Model evaluations per image: one call of the guider's denoiser on one image (CFG's two passes "
                  "count as one evaluation). The search never spends more; one path costs one evaluation per step, "
                  "so the minimum is the step count (beam search: the step count times the beams). The report "
                  "(logged, and on the sampler) says what was used.")


def search_inputs(budget_default):
    return {
        "scorer": (SCORER, {"tooltip": "What the search maximises (TrainFree Digit Scorer, TrainFree Judge Scorer): "
                                       "a log-probability of the decoded image, higher is better."}),
        "vae": ("VAE", {"tooltip": "The model's VAE: finished paths (and lookahead estimates) are decoded to be "
                                   "scored."}),
        "budget": ("INT", {"default": budget_default, "min": 1, "max": 100000, "tooltip": BUDGET_TOOLTIP}),
    }


def check_search_inputs(node, scorer, vae):
    if not callable(getattr(scorer, "score", None)):
        raise ValueError(f"{node}: 'scorer' must come from a TrainFree scorer node (got {type(scorer).__name__})")
    if getattr(scorer, "reads", "pixels") != "pixels":
        raise ValueError(f"{node}: this scorer reads {scorer.reads!r}; the search scores decoded images: use a "
                         f"scorer that reads pixels (Digit Scorer, Judge Scorer with an image judge)")
    if vae is None or not hasattr(vae, "decode"):
        raise ValueError(f"{node}: connect the model's VAE (Load Checkpoint's VAE output or a VAE loader); the "
                         f"search scores decoded images")
