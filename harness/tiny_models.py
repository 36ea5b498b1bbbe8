"""Tiny random-weight SD1.5 / SDXL / SD3 / Flux models, and a Wan 2.1 video model, built from ComfyUI's own classes.

ComfyUI then treats them as the real families: real model classes, model_sampling, latent formats and
conditioning plumbing. Weights get a fan-in initialisation (ComfyUI's layers leave them uninitialised), so
activations stay O(1) and patches have visible effects. One tiny SD1-style text encoder with the real SD1
tokenizer serves every family; its width (64) is the context and pooled width of all the tiny models.

The video model (``VIDEO_FAMILY``, Wan 2.1 text-to-video: 0.15 M params) takes 5-D latents [B, 16, T, H, W]. It
is not in ``FAMILIES``, so the image tests that run on every family leave it out.
"""
import functools

import torch

WIDTH = 64
FAMILIES = ("sd15", "sdxl", "sd3", "flux")
VIDEO_FAMILY = "wan21"
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "sd3": 16, "flux": 16, VIDEO_FAMILY: 16}

_SD15 = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": WIDTH,
    "use_temporal_resblock": False, "use_temporal_attention": False}
_SDXL = dict(_SD15, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=WIDTH + 6 * 256,
             transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2], transformer_depth_middle=2)
_SD3 = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
        "adm_in_channels": WIDTH, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": WIDTH, "out_features": 128}},
        "num_patches": 64 * 64, "pos_embed_max_size": 64, "x_block_self_attn_layers": []}
_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": WIDTH, "context_in_dim": WIDTH,
         "hidden_size": 64, "num_heads": 2, "axes_dim": [8, 12, 12], "mlp_ratio": 2.0, "depth": 2,
         "depth_single_blocks": 2, "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
# Head width 32: Wan's rotary embedding splits it into (12, 10, 10) for frames, rows and columns.
_WAN21 = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16,
          "dim": 64, "ffn_dim": 128, "freq_dim": 64, "text_dim": WIDTH, "num_heads": 2, "num_layers": 2}


def init_fan_in(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if name.endswith("pos_embed"):  # SD3 keeps its position table as an uninitialised buffer
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


_CONFIGS = {"sd15": ("SD15", _SD15), "sdxl": ("SDXL", _SDXL), "sd3": ("SD3", _SD3), "flux": ("Flux", _FLUX),
            VIDEO_FAMILY: ("WAN21_T2V", _WAN21)}


def make_model(family, seed=0, dtype=torch.float32, **unet_config):
    """A ModelPatcher around a tiny random model of ``family`` (``unet_config`` entries override the tiny
    config's) whose weights and inference are in ``dtype``, built by the host adapter the way it builds the
    reference models; the weights are the float32 ones of ``seed`` rounded to ``dtype``."""
    from harness import comfy_host
    config_name, unet = _CONFIGS[family]
    model = comfy_host.pack_module("nodes.host").build_diffusion_model(config_name, {**unet, **unet_config},
                                                                       dtype=dtype)
    init_fan_in(model.model.diffusion_model, seed)
    return model


_CLIP_CONFIG = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
                "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": WIDTH, "initializer_factor": 1.0,
                "initializer_range": 0.02, "intermediate_size": 4 * WIDTH, "layer_norm_eps": 1e-05,
                "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 2,
                "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": WIDTH, "torch_dtype": "float32",
                "vocab_size": 49408}


def clip_target(config=None):
    """A ClipTarget for an SD1-style text encoder of the given width with the real SD1 tokenizer."""
    import comfy.sd1_clip
    import comfy.supported_models_base
    encoder = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(config or _CLIP_CONFIG),
                                return_projected_pooled=False)

    def build(**params):
        return comfy.sd1_clip.SD1ClipModel(clip_model=encoder, **params)
    return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, build)


def make_clip(seed=0):
    import comfy.sd
    clip = comfy.sd.CLIP(target=clip_target(), model_options={"dtype": torch.float32})
    init_fan_in(clip.cond_stage_model, seed)
    return clip


def vae_ddconfig(channels, width=32):
    return {"double_z": True, "z_channels": channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": width, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def make_vae(channels, seed=0, state_dict=None, width=32):
    """A comfy.sd.VAE around a small KL autoencoder (8x down-sampling, ``channels`` latent channels)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    params = {"ddconfig": vae_ddconfig(channels, width), "embed_dim": channels}
    if state_dict is None:
        ae = AutoencoderKL(**params)
        init_fan_in(ae, seed)
        state_dict = ae.state_dict()
    vae = comfy.sd.VAE(sd=state_dict, config={"params": params})
    vae.latent_channels = channels
    return vae


def conditioning(family, batch=1, tokens=8, seed=0, scale=1.0):
    """CONDITIONING as CLIPTextEncode would give it for ``family`` (random text embedding)."""
    g = torch.Generator().manual_seed(seed)
    cross = torch.randn(batch, tokens, WIDTH, generator=g) * scale
    pooled = torch.randn(batch, WIDTH, generator=g)
    extra = {"pooled_output": pooled}
    if family == "sdxl":
        extra.update(width=128, height=128)
    if family == "flux":
        extra["guidance"] = 3.5
    return [[cross, extra]]


_CLIP_VISION_CONFIG = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
                       "image_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-05,
                       "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
                       "num_hidden_layers": 2, "patch_size": 8, "projection_dim": WIDTH, "torch_dtype": "float32"}


def make_clip_vision(seed=0, **config):
    """A comfy.clip_vision.ClipVisionModel (CLIP ViT, 32x32 input, 8x8 patches) whose image embeddings have the tiny
    text encoder's width unless ``config`` says otherwise (``projection_dim=None``: no projection). Built from a json
    config as CLIPVisionLoader does (some ComfyUI versions take only a file name)."""
    import json
    import tempfile

    import comfy.clip_vision
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/clip_vision_tiny.json"
        with open(path, "w") as f:
            json.dump({k: v for k, v in {**_CLIP_VISION_CONFIG, **config}.items() if v is not None}, f)
        clip_vision = comfy.clip_vision.ClipVisionModel(path)
    init_fan_in(clip_vision.model, seed)
    return clip_vision
