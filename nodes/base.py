"""What every MODEL -> MODEL patch node of the pack shares (V1 node API)."""
import math


class ModelPatchNode:
    CATEGORY = "trainfree/guidance"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    def apply(self, **inputs):
        check_numbers(type(self).__name__, self.INPUT_TYPES(), inputs)
        return self.patch(**inputs)


def check_numbers(node, input_types, values):
    """ComfyUI checks min / max when it validates a prompt but lets NaN through (every comparison with NaN is
    false), and a prompt built by a script may skip validation: refuse both here, naming the input and its range."""
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            value = values.get(name)
            if kind not in ("FLOAT", "INT") or value is None:
                continue
            low, high = options.get("min", -math.inf), options.get("max", math.inf)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise ValueError(f"{node}: input '{name}' is {value!r}; enter a finite number from {low} to {high} "
                                 f"(default {options.get('default')})")


def model_input(tooltip="Any model (SD1.5, SDXL, SD3, Flux)."):
    return ("MODEL", {"tooltip": tooltip})


def prompt_lines(text, name):
    """The distinct non-empty lines of a multiline prompt input, in order; a clear error when there are none."""
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not lines:
        raise ValueError(f"{name} is empty: write at least one prompt (one per line)")
    return lines
