"""CLIP as a judge: image embeddings from a CLIP vision model loaded by ComfyUI's CLIPVisionLoader, and the
prompts' text embeddings projected into the same space by the text encoder of a ComfyUI CLIP."""
import torch

from ...guidance_ops import clip_judge
from .family import UnsupportedModel

_FIX = ("load a matching pair: for SD1.5, the ViT-L CLIP vision model (clip_vision ViT-L/14) with a CLIP-L text "
        "encoder file that carries its text projection (the clip_l.safetensors of SD3 / Flux, through CLIPLoader "
        "type stable_diffusion; an SD1.5 checkpoint's own CLIP has none); for SDXL, the checkpoint's CLIP with the "
        "ViT-bigG CLIP vision model (clip_vision_g)")


def image_encoder(clip_vision):
    """``(width, encode)``: the width of the CLIP vision model's image embeddings and ``encode(pixels)`` mapping
    [B, 3, H, W] in 0..1 to those embeddings (ComfyUI's own preprocessing: resize, centre crop, normalise)."""
    model = getattr(clip_vision, "model", None)
    if getattr(clip_vision, "return_all_hidden_states", False) or not hasattr(model, "visual_projection"):
        raise UnsupportedModel(f"this vision model ({type(model).__name__}, {getattr(clip_vision, 'model_type', '')})"
                               f" is no CLIP image tower with a projection into CLIP's joint space (SigLIP scores "
                               f"with a sigmoid, DINO has no text side): {_FIX}")
    projection = model.visual_projection
    width = getattr(projection, "out_features", None)
    if width is None:
        raise UnsupportedModel(f"this CLIP vision file has no visual projection, so its image embeddings are not in "
                               f"the space of CLIP's text embeddings: {_FIX}")
    if clip_judge.looks_untrained(projection.weight):
        raise UnsupportedModel(f"the CLIP vision model's visual projection holds no trained weights (the file lacks "
                               f"it): {_FIX}")

    def encode(pixels):
        out = clip_vision.encode_image(pixels.movedim(1, -1).float(), crop=True)
        return out["image_embeds"].float().to(pixels.device)
    return width, encode


def text_encoders(clip, tokens):
    """``{token key: text encoder}`` of the CLIP-style encoders in a ComfyUI CLIP that have a text projection."""
    model = clip.cond_stage_model
    found = {}
    for key in tokens:
        name = model.clip if getattr(model, "clip_name", None) == key and isinstance(getattr(model, "clip", None),
                                                                                        str) else f"clip_{key}"
        encoder = getattr(model, name, None)
        projection = getattr(getattr(encoder, "transformer", None), "text_projection", None)
        if projection is not None and hasattr(encoder, "encode_token_weights"):
            found[key] = encoder
    return found


def text_embeddings(clip, prompts, width):
    """``(embeds [K, width], logit_scale)``: each prompt's pooled text embedding through CLIP's text projection,
    from the encoder of ``clip`` whose projection has ``width`` outputs, and that encoder's temperature."""
    tokens = [clip.tokenize(text) for text in prompts]
    encoders = text_encoders(clip, tokens[0])
    widths = {key: enc.transformer.text_projection.weight.shape[0] for key, enc in encoders.items()}
    matching = [key for key, w in widths.items() if w == width]
    if not matching:
        have = ", ".join(f"clip_{k} {w}" for k, w in widths.items()) or "none"
        raise UnsupportedModel(f"the CLIP vision model embeds images in {width} dimensions, but this CLIP has no "
                               f"text encoder projecting into {width} (text projections: {have}; encoders: "
                               f"{', '.join(sorted(tokens[0]))}): {_FIX}")
    key = matching[0]
    encoder = encoders[key]
    if clip_judge.looks_untrained(encoder.transformer.text_projection.weight):
        raise UnsupportedModel(f"the text projection of this CLIP's clip_{key} encoder holds no trained weights (its "
                               f"file lacks it, as SD1.5 checkpoints do, and ComfyUI leaves it unset): {_FIX}")
    clip.cond_stage_model.reset_clip_options()
    clip.load_model()
    try:
        encoder.set_clip_options({"projected_pooled": True, "execution_device": clip.patcher.load_device})
        pooled = [encoder.encode_token_weights(t[key])[1] for t in tokens]
    finally:
        encoder.reset_clip_options()
    embeds = torch.cat([p.reshape(1, -1).float().cpu() for p in pooled])
    return embeds, clip_judge.logit_scale(encoder.logit_scale)


def clip_judge_from(clip_vision, clip, prompts):
    width, encode = image_encoder(clip_vision)
    embeds, scale = text_embeddings(clip, prompts, width)
    return clip_judge.CLIPJudge(prompts, embeds, scale, encode)
