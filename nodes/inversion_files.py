"""Inversions saved to and loaded from ComfyUI's folders, so one inversion serves many edits, on any worker."""
from . import host
from .inversion import CATEGORY, INVERSION


class TrainFreeSaveInversion:
    DESCRIPTION = ("Saves an inversion (noise, trajectory, schedule, prompts, null-text embeddings) as a safetensors "
                   "file in ComfyUI's output/inversions folder. Copy it to another worker's input/inversions or "
                   "output/inversions folder to edit there with TrainFree Load Inversion.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "inversion": (INVERSION, {"tooltip": "The inversion to keep."}),
            "filename_prefix": ("STRING", {"default": "trainfree_inversion",
                                           "tooltip": "File name start; a 5-digit counter and .safetensors are added. "
                                                      "A plain name: the file always goes to output/inversions."}),
        }}

    def save(self, inversion, filename_prefix):
        name = host.save_inversion(inversion, filename_prefix)
        return {"ui": {"text": [f"{host.SUBFOLDER}/{name}"]}}


class TrainFreeLoadInversion:
    DESCRIPTION = ("Loads an inversion saved by TrainFree Save Inversion from ComfyUI's output/inversions or "
                   "input/inversions folder. Sampling from it checks that the model is the one it was made with.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (INVERSION,)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "inversion_file": (host.saved_inversions() or ["(none saved yet)"],
                               {"tooltip": "An inversion file in output/inversions or input/inversions."}),
        }}

    @classmethod
    def IS_CHANGED(cls, inversion_file):
        return host.inversion_file_stamp(inversion_file)

    def load(self, inversion_file):
        return (host.load_inversion(inversion_file),)


NODE_CLASS_MAPPINGS = {"TrainFreeSaveInversion": TrainFreeSaveInversion,
                       "TrainFreeLoadInversion": TrainFreeLoadInversion}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainFreeSaveInversion": "Save Inversion (TrainFree)",
                              "TrainFreeLoadInversion": "Load Inversion (TrainFree)"}
