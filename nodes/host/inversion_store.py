"""Inversions as files in ComfyUI's folders, conditioning in and out of an inversion, and the model fingerprint
that ties an inversion to the model it was made with."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ...guidance_ops.inversion import Inversion
from .family import FAMILY_NAMES, is_flow_model, model_family
from .files import FileStore

SUBFOLDER = "inversions"
_FIELDS = ("sampler", "guidance", "model", "source_extra", "report")


def fingerprint(model):
    """Family, sampling type, latent format, size and a weight checksum (to 4 digits, so the same checkpoint in
    another precision still matches)."""
    net = model.model.diffusion_model
    first = next(iter(net.parameters()))
    count = sum(p.numel() for p in net.parameters())
    checksum = float(first.detach().float().flatten()[:4096].abs().sum())
    family = FAMILY_NAMES.get(model_family(model), type(net).__name__)
    kind = "flow" if is_flow_model(model) else type(model.model.model_sampling).__name__
    return f"{family}|{kind}|{type(model.model.latent_format).__name__}|{count}|{checksum:.4g}"


def conditioning_tensors(conditioning, input_name):
    """The text embedding, pooled output and numeric extras of a one-entry CONDITIONING."""
    if len(conditioning) != 1:
        raise ValueError(f"'{input_name}' holds {len(conditioning)} combined prompts; an inversion keeps one prompt: "
                         f"connect a single text encode")
    cross, extra = conditioning[0]
    tensors = {"cross": cross.detach().float().cpu()}
    if torch.is_tensor(extra.get("pooled_output")):
        tensors["pooled"] = extra["pooled_output"].detach().float().cpu()
    numbers = {k: v for k, v in extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return tensors, numbers


def as_conditioning(tensors, numbers):
    extra = dict(numbers)
    if "pooled" in tensors:
        extra["pooled_output"] = tensors["pooled"]
    return [[tensors["cross"], extra]]


_STORE = FileStore(SUBFOLDER, ".safetensors", "inversion", "save one with TrainFree Save Inversion")
folders, saved_names, _path, file_stamp = _STORE.folders, _STORE.names, _STORE.path, _STORE.stamp


def save(inversion, prefix):
    """Write to ComfyUI's output/inversions as ``<prefix>_NNNNN.safetensors``; returns the file name."""
    name, path = _STORE.new_path(prefix)
    tensors = {"pivots": inversion.pivots, "sigmas": inversion.sigmas}
    tensors.update({f"source.{k}": v for k, v in inversion.source.items()})
    if inversion.null_embeddings is not None:
        tensors["null_embeddings"] = inversion.null_embeddings
        tensors.update({f"null_source.{k}": v for k, v in inversion.null_source.items()})
    meta = {"trainfree_inversion": json.dumps({f: getattr(inversion, f) for f in _FIELDS})}
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path, metadata=meta)
    return name


def load(name):
    """Read an inversion saved by ``save`` (from output/inversions or input/inversions); only listed names."""
    path = _path(name)
    with safe_open(path, "pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("trainfree_inversion", "null") or "null")
    if meta is None:
        raise ValueError(f"{name} is not an inversion saved by this pack (its metadata is missing)")
    tensors = load_file(path)

    def group(prefix):
        found = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        return found or None
    return Inversion(pivots=tensors["pivots"], sigmas=tensors["sigmas"], source=group("source"),
                     null_embeddings=tensors.get("null_embeddings"), null_source=group("null_source"), **meta)
