"""Loader for the pack's own small reference model (trained on real handwritten digits; see MODEL_CARD.md)."""
import os

from . import host

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_model")


def available():
    return sorted(f for f in os.listdir(FOLDER) if f.endswith(".safetensors")) if os.path.isdir(FOLDER) else []


class TrainFreeReferenceModel:
    DESCRIPTION = ("Loads the pack's built-in reference model: a small SD1.5-architecture model trained on real "
                   "handwritten digits (128x128, prompts like 'a red digit seven on a dark background'). Runs any "
                   "SD1.5 workflow on a CPU in seconds with nothing to download. Use it where "
                   "'Load Checkpoint' goes.")
    CATEGORY = "trainfree/loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_file": (available() or ["trainfree_digits.safetensors"],
                           {"tooltip": "The reference model file in the pack's reference_model/ folder."}),
        }}

    def load(self, model_file):
        path = os.path.join(FOLDER, model_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference model {model_file} is missing from {FOLDER}: reinstall the pack "
                                    f"(the file ships with it)")
        model, clip, vae, _ = host.load_reference_model(path)
        return (model, clip, vae)


NODE_CLASS_MAPPINGS = {"TrainFreeReferenceModel": TrainFreeReferenceModel}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeReferenceModel": "Reference Model Loader (TrainFree)"}
