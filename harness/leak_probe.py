"""A test-only output node that looks inside the server process for what the pack could leak.

Put it at the end of a prompt (it takes the decoded images, so it runs after sampling has ended). It reports:
- ``run_scopes`` / ``scopes_holding_state``: the pack's per-run scopes alive, and those still holding a run's state;
- ``tensors_held_by_pack``: tensors reachable from the pack's own objects (module globals, the per-run state and
  reports of its scopes, the closures of the hooks it registered), not counting the models those hold nor the
  inputs a patch keeps for the patched model's life (``runs.PatchInput``: the prompts the user connected; the
  judges connected to it);
- ``model_hooks``: per ModelPatcher alive, how many wrappers, callbacks, patches and option entries it carries;
- ``gc_types``: gc-tracked objects per type, and the number and bytes of all live tensors; ``rss_mib``.
"""
import collections
import gc
import os
import types
import warnings

import psutil
import torch

from harness import comfy_host

_PACK = os.path.realpath(comfy_host.PACK_DIR)
_PACK_CODE = tuple(os.path.join(_PACK, folder) + os.sep for folder in ("nodes", "guidance_ops"))


def _is_pack_file(path):
    """Whether ``path`` is the pack's own code (what ComfyUI loads of it), not its harness, tests or a host tree."""
    real = os.path.realpath(path or "")
    return real.startswith(_PACK_CODE) or real == os.path.join(_PACK, "__init__.py")


def _pack_modules():
    return [m for m in list(__import__("sys").modules.values()) if _is_pack_file(getattr(m, "__file__", None))]


def _is_pack_function(fn):
    return isinstance(fn, types.FunctionType) and _is_pack_file(fn.__code__.co_filename)


def _tensors_reachable(roots):
    """Tensors reachable from ``roots`` without passing through models, modules, classes or ComfyUI functions:
    ``{root: [[shape, path], ...]}``, a root named by its type (and function name). One walk serves every root (an
    object shared by several is visited once, for the first); the path to a tensor is spelled out only when one is
    found."""
    import comfy.model_patcher
    stop = (types.ModuleType, type, torch.nn.Module, comfy.model_patcher.ModelPatcher,
            comfy_host.pack_module("nodes.host.runs").PatchInput,  # what the user connected: not per-run state
            comfy_host.pack_module("guidance_ops.judges").Judge)
    found, seen, parent = {}, set(), {}
    for root in roots:
        todo = [root]
        while todo:
            obj = todo.pop()
            if id(obj) in seen or obj is None or isinstance(obj, stop):
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.Tensor):
                name = getattr(root, "__qualname__", type(root).__qualname__)
                found.setdefault(name, []).append([list(obj.shape), _path(obj, parent)[:12]])
                continue
            for ref in _referents(obj):
                parent.setdefault(id(ref), (obj, ref))
                todo.append(ref)
    return found


def _referents(obj):
    """What the walk follows from ``obj``: a pack function's closure only (other code is not the pack's), else
    everything the object refers to."""
    if isinstance(obj, types.FunctionType):
        if not _is_pack_function(obj):
            return []
        return [cell.cell_contents for cell in (obj.__closure__ or ()) if _cell_filled(cell)]
    return gc.get_referents(obj)


def _path(obj, parent):
    """How the walk reached ``obj``, nearest holder first: each holder's type (a function's name, a dict's key)."""
    chain, key = [], id(obj)
    while key in parent and len(chain) < 64:
        holder, held = parent[key]
        if isinstance(holder, types.FunctionType):
            chain.append("fn " + holder.__qualname__)
        elif isinstance(holder, dict):
            chain.append("dict " + ",".join(str(k)[:20] for k, v in holder.items() if v is held)[:60])
        else:
            chain.append(type(holder).__qualname__)
        key = id(holder)
    return chain


def _cell_filled(cell):
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def _nested_size(value):
    if isinstance(value, dict):
        return sum(1 + _nested_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(1 + _nested_size(v) for v in value)
    return 0


def _hook_sizes(patcher):
    options = patcher.model_options
    return {"wrappers": _nested_size(patcher.wrappers), "callbacks": _nested_size(patcher.callbacks),
            "model_options": _nested_size(options),
            "transformer_options": _nested_size(options.get("transformer_options", {})),
            "additional_models": _nested_size(getattr(patcher, "additional_models", {}))}


def probe():
    import comfy.model_patcher
    gc.collect()
    objects = gc.get_objects()
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated lazy objects warns
        warnings.simplefilter("ignore")
        tensors = [o for o in objects if isinstance(o, torch.Tensor)]
    scopes = [o for o in objects if type(o).__name__ == "RunScope" and _is_pack_file(
        getattr(__import__("sys").modules.get(type(o).__module__), "__file__", None))]
    patchers = [o for o in objects if isinstance(o, comfy.model_patcher.ModelPatcher)]
    roots = [vars(m) for m in _pack_modules()]
    roots += [s.state for s in scopes] + [s.last_report for s in scopes]
    for patcher in patchers:  # the closures of every hook the pack registered on a live model
        for hooks in (patcher.wrappers, patcher.callbacks, patcher.model_options):
            roots += [f for f in _functions(hooks) if _is_pack_function(f)]
    return {
        "run_scopes": len(scopes),
        "scopes_holding_state": sum(s.state is not None for s in scopes),
        "tensors_held_by_pack": _tensors_reachable(roots),
        "model_hooks": sorted((_hook_sizes(p) for p in patchers), key=lambda d: sorted(d.items())),
        "live_tensors": len(tensors),
        "live_tensor_mib": round(sum(t.element_size() * t.nelement() for t in tensors) / 2**20, 2),
        "gc_types": dict(collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)),
        "rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
    }


def _functions(value):
    if callable(value) and not isinstance(value, (dict, list, tuple, type)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _functions(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _functions(v)


class HarnessLeakProbe:
    CATEGORY = "harness"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # never cached: every prompt looks again

    def run(self, images):
        del images
        return {"ui": {"trainfree_probe": [probe()]}}
