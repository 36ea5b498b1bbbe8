"""What every MODEL -> MODEL patch node of the pack shares (V1 node API)."""


class ModelPatchNode:
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"


def model_input(tooltip="Any model (SD1.5, SDXL, SD3, Flux)."):
    return ("MODEL", {"tooltip": tooltip})
