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
