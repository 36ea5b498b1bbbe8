"""Test-only output nodes that hand what they receive back to the harness instead of writing files."""


def collector(input_name, input_type, take=lambda value: value):
    """``(node class, store)``: each execution keeps ``take(input)`` in ``store[key]`` (key: a string input)."""
    store = {}

    class Collect:
        CATEGORY = "harness"
        FUNCTION = "collect"
        OUTPUT_NODE = True
        RETURN_TYPES = ()

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {input_name: (input_type,), "key": ("STRING", {"default": "0"})}}

        def collect(self, key, **given):
            store[key] = take(given[input_name]).detach().clone()
            return {"ui": {}}

    return Collect, store


def supplier(output_name, output_type):
    """``(node class, store)``: a source node whose output is ``store[key]`` (key: a string input), to hand the
    engine inputs that no built-in node makes (real images as tensors, without files)."""
    store = {}

    class Supply:
        CATEGORY = "harness"
        FUNCTION = "supply"
        RETURN_TYPES = (output_type,)
        RETURN_NAMES = (output_name,)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"key": ("STRING", {"default": "0"})}}

        def supply(self, key):
            if key not in store:
                raise KeyError(f"nothing supplied under {key!r}")
            return (store[key],)

    return Supply, store
