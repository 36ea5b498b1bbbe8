"""Scorers for inference-time search and classifier guidance: the reference models' digit oracle (the prompted
digit and colour), and any judge that reads images (a Digit Oracle Judge, a CLIP Judge from ComfyUI's Load CLIP
Vision and Load CLIP) scoring one of its labels."""
from ..guidance_ops import scorers

SCORER = "TRAINFREE_SCORER"


class TrainFreeDigitScorer:
    CATEGORY = "trainfree/scorers"
    DESCRIPTION = ("The reference models' built-in scorer: the log-probability that an image shows the digit and "
                   "the colour its prompt names (the pack's digit oracle for the digit, the ink's hue among the "
                   "reference palette for the colour). Reads pixels: the node using it needs the VAE. Made for the "
                   "pack's reference models; on other models it scores, but means little.")
    RETURN_TYPES = (SCORER,)
    RETURN_NAMES = ("scorer",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompt": ("STRING", {"multiline": True, "default": "a red digit seven on a dark background",
                                  "tooltip": "The prompt to reward, as the reference models are captioned: its digit "
                                             "word (zero to nine) and colour word (red, yellow, green, blue, "
                                             "purple); either may be left out. Usually the positive prompt."}),
        }}

    def make(self, prompt):
        return (scorers.DigitColourScorer(prompt),)


class TrainFreeJudgeScorer:
    CATEGORY = "trainfree/scorers"
    DESCRIPTION = ("A judge as a scorer: the judge's log-probability of the target label. Takes judges that read "
                   "images: TrainFree Digit Oracle Judge, or TrainFree CLIP Judge (a CLIP vision model from Load "
                   "CLIP Vision with a matching CLIP from Load CLIP / the checkpoint), whose first prompt is "
                   "usually the target. The Prompt Judge reads the sampled model and is refused.")
    RETURN_TYPES = (SCORER,)
    RETURN_NAMES = ("scorer",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "judge": ("TRAINFREE_JUDGE", {"tooltip": "A judge that reads images (Digit Oracle Judge, CLIP Judge)."}),
            "target": ("STRING", {"default": "1", "tooltip": "The label to reward: its text (e.g. 'seven', or a "
                                                            "CLIP Judge prompt) or its number from 1."}),
        }}

    def make(self, judge, target):
        return (scorers.JudgeScorer(judge, target),)


NODE_CLASS_MAPPINGS = {"TrainFreeDigitScorer": TrainFreeDigitScorer, "TrainFreeJudgeScorer": TrainFreeJudgeScorer}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeDigitScorer": "Digit Scorer (TrainFree)",
                              "TrainFreeJudgeScorer": "Judge Scorer (TrainFree)"}
