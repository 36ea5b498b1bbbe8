"""Models built from ComfyUI's own classes: the pack's reference models and their parts."""
import torch

import comfy.supported_models
import comfy.text_encoders.flux


def _host_unet_config(unet_config):
    """``unet_config`` with the fields this ComfyUI's Flux requires: newer versions need ``txt_ids_dims``, older
    ones reject it."""
    import comfy.ldm.flux.model as flux
    config = dict(unet_config)
    if config.get("image_model") == "flux":
        if "txt_ids_dims" in flux.FluxParams.__dataclass_fields__:
            config.setdefault("txt_ids_dims", [])
        else:
            config.pop("txt_ids_dims", None)
    return config


def build_diffusion_model(config_name, unet_config, state_dict=None, dtype=torch.float32):
    """A ModelPatcher around ``comfy.supported_models.<config_name>`` with ``unet_config``, weights and inference
    in ``dtype`` (through ``set_inference_dtype`` with no manual cast, as ComfyUI loads a half checkpoint on a GPU
    that computes in it)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    config = getattr(comfy.supported_models, config_name)(_host_unet_config(unet_config))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=torch.device("cpu"))
    if state_dict is not None:  # files use the families' original key names; each host renames them its way
        model.diffusion_model.load_state_dict(config.process_unet_state_dict(dict(state_dict)), strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def flux_state_dict_for_saving(state_dict):
    """A Flux transformer's weights under the original Flux key names (q/k norms as ``*_norm.scale``), which every
    ComfyUI version loads; newer versions name them ``*_norm.weight`` in memory."""
    return {(k[:-len(".weight")] + ".scale" if k.endswith("_norm.weight") else k): v for k, v in state_dict.items()}


def build_sd1_text_encoder(transformer_config, state_dict=None):
    """A CLIP (text encoder + the real SD1 tokenizer) whose transformer has ``transformer_config``."""
    import functools
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    encoder = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(transformer_config),
                                return_projected_pooled=False)

    def build(**params):
        return comfy.sd1_clip.SD1ClipModel(clip_model=encoder, **params)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, build)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    if state_dict is not None:
        clip.cond_stage_model.load_state_dict(state_dict, strict=True)
    return clip


class _SmallFluxTokenizer(comfy.text_encoders.flux.FluxTokenizer):
    """Flux's two tokenizers (the real CLIP and T5 vocabularies), with the T5 sequence padded to ``t5_length``
    tokens instead of 256 (the small reference model is trained on that length)."""
    def __init__(self, embedding_directory=None, tokenizer_data={}, t5_length=16):
        import comfy.sd1_clip
        import comfy.text_encoders.sd3_clip
        self.clip_l = comfy.sd1_clip.SDTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.t5xxl = comfy.text_encoders.sd3_clip.T5XXLTokenizer(
            embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, min_length=t5_length)


class _SmallFluxTextEncoder(comfy.text_encoders.flux.FluxClipModel):
    """ComfyUI's Flux text encoder pair (CLIP-L-class pooled vector + T5-class sequence) at small widths: only the
    two encoders are built from the given configurations; encoding is FluxClipModel's own."""
    def __init__(self, device="cpu", dtype=None, model_options={}, clip_config=None, t5_config=None):
        import comfy.sd1_clip
        import comfy.text_encoders.t5
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=dict(clip_config),
                                                 return_projected_pooled=False, model_options=model_options)
        self.t5xxl = comfy.sd1_clip.SDClipModel(
            device=device, dtype=dtype, textmodel_json_config=dict(t5_config), special_tokens={"end": 1, "pad": 0},
            model_class=comfy.text_encoders.t5.T5, enable_attention_masks=False, return_attention_masks=False,
            model_options={**model_options, "model_name": "t5xxl"})
        self.dtypes = {dtype}


def build_flux_text_encoder(clip_config, t5_config, t5_length, state_dict=None):
    """A CLIP for Flux conditioning (T5 sequence as context, CLIP pooled output as vector) with small encoders."""
    import functools
    import comfy.sd
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(
        functools.partial(_SmallFluxTokenizer, t5_length=t5_length),
        functools.partial(_SmallFluxTextEncoder, clip_config=clip_config, t5_config=t5_config))
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    if state_dict is not None:
        clip.cond_stage_model.load_state_dict(state_dict, strict=True)
    return clip


def build_kl_autoencoder(ddconfig, embed_dim, state_dict=None):
    """The bare ``AutoencoderKL`` module (for training), or a comfy VAE around it when ``state_dict`` is given."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    params = {"ddconfig": dict(ddconfig), "embed_dim": embed_dim}
    if state_dict is None:
        return AutoencoderKL(**params)
    import comfy.sd
    vae = comfy.sd.VAE(sd=state_dict, config={"params": params})
    vae.latent_channels = embed_dim
    return vae


def unpack_weights(tensors):
    """float32 weights from a file's packed form: float16 tensors, and int8 tables stored as ``<name>.int8`` with
    a per-row ``<name>.scale``."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(".int8"):
            name = key[:-len(".int8")]
            out[name] = value.float() * tensors[name + ".scale"].float()
        elif not (key.endswith(".scale") and key[:-len(".scale")] + ".int8" in tensors):
            out[key] = value.float() if value.dtype.is_floating_point else value
    return out


def load_reference_model(path):
    """(MODEL, CLIP, VAE) of a reference model file written by training/train_reference.py."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        info = json.loads(f.metadata()["trainfree_reference"])
    tensors = load_file(path)
    parts = {"unet.": {}, "clip.": {}, "vae.": {}}
    for key, value in tensors.items():
        prefix = key[:key.index(".") + 1]
        parts[prefix][key[len(prefix):]] = value
    parts = {prefix: unpack_weights(part) for prefix, part in parts.items()}
    model = build_diffusion_model(info["model_config"], info["unet_config"], parts["unet."])
    if "t5_config" in info:
        clip = build_flux_text_encoder(info["clip_config"], info["t5_config"], info["t5_length"], parts["clip."])
    else:
        clip = build_sd1_text_encoder(info["clip_config"], parts["clip."])
    vae = build_kl_autoencoder(info["vae_ddconfig"], info["latent_channels"], parts["vae."])
    return model, clip, vae, info
