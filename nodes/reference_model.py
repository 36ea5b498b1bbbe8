"""Loader for the pack's own small reference model (trained on real handwritten digits; see MODEL_CARD.md)."""
import os

from . import host

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_model")


def available():
    return sorted(f for f in os.listdir(FOLDER) if f.endswith(".safetensors")) if os.path.isdir(FOLDER) else []


class TrainFreeReferenceModel:
    DESCRIPTION = ("Loads one of the pack's built-in reference models, trained on real handwritten digits (128x128, "
                   "prompts like 'a red digit seven on a dark background'): trainfree_digits.safetensors is "
                   "SD1.5-class, trainfree_digits_flux.safetensors is Flux-class (rectified flow, no guidance "
                   "embedding: use cfg > 1 with a negative prompt; FluxGuidance has no effect on it). Runs workflows of "
                   "that family on a CPU in seconds with nothing to download. Use it where 'Load Checkpoint' goes.")
    CATEGORY = "trainfree/loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_file": (available() or ["trainfree_digits.safetensors"],
                           {"tooltip": "The reference model file in the pack's reference_model/ folder; the file "
                                       "chooses the family: trainfree_digits.safetensors (SD1.5-class) or "
                                       "trainfree_digits_flux.safetensors (Flux-class)."}),
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
