"""Layer selection as text, the way users type it into a node.

UNet attention blocks are named after ComfyUI's block keys: ``input.4``, ``middle.0``, ``output.1``; a third
number picks one transformer inside the block (``middle.0.3``). DiT blocks are ``double.N`` (joint blocks of
SD3 / double-stream blocks of Flux) and ``single.N`` (Flux single-stream blocks). The last number may be a
range: ``double.7-9``. Entries are separated by commas or spaces.
"""
import re

UNET_KINDS = ("input", "middle", "output")
DIT_KINDS = ("double", "single")
_ENTRY = re.compile(r"^([a-z]+)\.(\d+)(?:-(\d+))?(?:\.(\d+)(?:-(\d+))?)?$")


class LayerSelectionError(ValueError):
    pass


def _span(first, last, entry):
    lo = int(first)
    hi = lo if last is None else int(last)
    if hi < lo:
        raise LayerSelectionError(f"'{entry}': the range {lo}-{hi} runs backwards; write it as {hi}-{lo}")
    return range(lo, hi + 1)


def parse_layers(text):
    """Parse a selection into a sorted list of ``(kind, block, transformer_or_None)`` tuples."""
    entries = [e for e in re.split(r"[,\s]+", text.strip().lower()) if e]
    if not entries:
        raise LayerSelectionError("no layers selected: name at least one block, e.g. 'middle.0' or 'double.1'")
    out = set()
    for entry in entries:
        m = _ENTRY.match(entry)
        if not m or m.group(1) not in UNET_KINDS + DIT_KINDS:
            raise LayerSelectionError(
                f"'{entry}' is not a layer name: use input.N / middle.0 / output.N (optionally .T for one "
                f"transformer) on UNets, double.N / single.N on DiTs; N may be a range like 7-9")
        kind = m.group(1)
        if kind in DIT_KINDS and m.group(4) is not None:
            raise LayerSelectionError(f"'{entry}': DiT blocks take one index (double.N or single.N)")
        transformers = [None] if m.group(4) is None else list(_span(m.group(4), m.group(5), entry))
        for block in _span(m.group(2), m.group(3), entry):
            for t in transformers:
                out.add((kind, block, t))
    return sorted(out, key=lambda x: (x[0], x[1], -1 if x[2] is None else x[2]))


def layer_name(kind, block, transformer=None):
    return f"{kind}.{block}" if transformer is None else f"{kind}.{block}.{transformer}"


def check_layers(selected, available):
    """Check a parsed selection against the model's layers.

    ``available`` maps ``(kind, block)`` to the number of transformers in that block (1 for DiT blocks).
    Every selected layer must exist; the error lists what the model has, so the user can fix the text.
    """
    missing = [s for s in selected
               if (s[0], s[1]) not in available or (s[2] is not None and s[2] >= available[(s[0], s[1])])]
    if missing:
        have = ", ".join(f"{layer_name(k, b)}" + (f" (transformers 0-{n - 1})" if n > 1 else "")
                         for (k, b), n in sorted(available.items()))
        raise LayerSelectionError(
            f"this model has no layer {', '.join(layer_name(*s) for s in missing)}; "
            f"its attention layers are: {have}")
    return selected


def group_by_block(selected):
    """``{(kind, block): None (all transformers) or set of transformer indices}``."""
    groups = {}
    for kind, block, t in selected:
        key = (kind, block)
        if t is None:
            groups[key] = None
        elif key not in groups:
            groups[key] = {t}
        elif groups[key] is not None:
            groups[key].add(t)
    return groups
