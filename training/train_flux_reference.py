"""Train the pack's Flux-class reference model on the same digits, captions and split as the SD1.5 one, CPU only.

Built from ComfyUI's own Flux classes through the host adapter, so the loader rebuilds exactly what was trained:
- a 16-channel KL autoencoder (128x128 RGB <-> 16x16x16 latents) normalised to Flux's latent format
  (scale 0.3611, shift 0.1159), warm-started from the SD1.5 reference model's autoencoder body,
- Flux's text-encoder pair at small widths, frozen at their seeded random init: a CLIP-L-class encoder (the real
  CLIP tokenizer; its pooled output is Flux's vector input) and a T5-class encoder (the real T5 tokenizer, 16 tokens;
  its sequence is Flux's context),
- a small Flux transformer (double and single blocks, patch size 2), trained as a rectified-flow (velocity) model
  on the noise levels ComfyUI's Flux sampling settings visit (time shift 1.15), with 10% caption dropout.
  No guidance embedding (like Flux schnell's configuration): classifier-free guidance with cfg > 1 and a negative
  prompt; FluxGuidance has no effect on it.

Deterministic (fixed seeds), resumable (checkpoints in training/work/flux_*, re-run the same command to go on):

    python -m training.train_flux_reference --vae-steps 300 --model-steps 4000 --threads 1
"""
import os

import torch
import torch.nn.functional as F

from harness import comfy_host
from harness.tiny_models import init_fan_in
from training import digits
from training import finetune_reference
from training import train_reference as common

OUT = os.path.join(comfy_host.PACK_DIR, "reference_model", "trainfree_digits_flux.safetensors")
SEED = common.SEED + 100
WIDTH = 64
FLUX_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": WIDTH,
               "context_in_dim": WIDTH, "hidden_size": 128, "num_heads": 4, "axes_dim": [8, 12, 12],
               "mlp_ratio": 3.0, "depth": 2, "depth_single_blocks": 4, "theta": 10000, "patch_size": 2,
               "qkv_bias": True, "guidance_embed": False}
CLIP_CONFIG = dict(common.CLIP_CONFIG)
T5_CONFIG = {"d_ff": 128, "d_kv": 16, "d_model": WIDTH, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
             "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_heads": 4, "num_layers": 2,
             "relative_attention_num_buckets": 32, "vocab_size": 32128}
T5_LENGTH = 16
LATENT_CHANNELS = 16
VAE_DDCONFIG = dict(common.VAE_DDCONFIG, z_channels=LATENT_CHANNELS)
LATENT_SCALE, LATENT_SHIFT = 0.3611, 0.1159  # comfy.latent_formats.Flux


def init_transformer(net):
    """Fan-in init, norm scales at 1, and adaLN-Zero: modulations and the output layer start at zero, so every
    block starts as the identity (Peebles and Xie, DiT)."""
    init_fan_in(net, SEED + 2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("scale") or "_norm." in name and name.endswith("weight"):
                p.fill_(1.0)
            elif ".lin." in name or "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()


def train_transformer(host, latents, captions, embeddings, steps, batch=32, lr=6e-4, drop=0.1):
    patcher = host.build_diffusion_model("Flux", FLUX_CONFIG)
    model = patcher.model
    net = model.diffusion_model
    init_transformer(net)
    sampling = model.model_sampling
    x0_all = model.latent_format.process_in(latents)
    empty_context, empty_pooled = embeddings[""]
    context_all = torch.stack([embeddings[c][0] for c in captions])
    pooled_all = torch.stack([embeddings[c][1] for c in captions])

    def batch_loss(g):
        idx, x0, flip = common.draw_examples(g, x0_all, batch, drop)
        context = torch.where(flip[:, None, None], empty_context[None], context_all[idx])
        pooled = torch.where(flip[:, None], empty_pooled[None], pooled_all[idx])
        # the sampler's noise levels: ComfyUI's Flux time shift applied to uniform times
        sigma = sampling.sigma(torch.rand(batch, generator=g)).clamp_min(1e-3)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma[:, None, None, None]
        noisy = (1 - s) * x0 + s * noise
        with common.copies_for_backward():
            denoised = model.apply_model(noisy, sigma, c_crossattn=context, y=pooled)
        return F.mse_loss((noisy - denoised) / s, noise - x0)
    ema, steps, seconds = common.train_denoiser(net, batch_loss, "flux_model.pt", steps, lr, warmup=200,
                                                ema_decay=0.998, seed=SEED + 3)
    return host.flux_state_dict_for_saving(ema), steps, seconds


def main():
    args, host = common.start(__doc__, SEED, vae_steps=300, model_steps=4000)
    scans, labels, train_idx = common.load_data()
    sd15_vae = host.load_reference_model(finetune_reference.start_weights())[2].first_stage_model.state_dict()
    ae, data = common.prepare_autoencoder(host, scans, labels, train_idx, args.vae_steps, name="flux_vae",
                                          latent_scale=LATENT_SCALE, latent_shift=LATENT_SHIFT,
                                          ddconfig=VAE_DDCONFIG, channels=LATENT_CHANNELS, warm_start=sd15_vae)
    clip = common.frozen_text_encoder(host, host.build_flux_text_encoder(CLIP_CONFIG, T5_CONFIG, T5_LENGTH),
                                      "flux_text.pt", SEED + 1)
    embeddings = common.embed(clip, [""] + digits.all_captions())
    ema, steps, seconds = train_transformer(host, data["latents"], data["captions"], embeddings, args.model_steps)
    config = {"unet_config": FLUX_CONFIG, "clip_config": CLIP_CONFIG, "t5_config": T5_CONFIG, "t5_length": T5_LENGTH,
              "vae_ddconfig": VAE_DDCONFIG, "latent_channels": LATENT_CHANNELS, "model_config": "Flux",
              "unet_steps": steps, "unet_seconds": round(seconds), "vae_steps": args.vae_steps, "seed": SEED,
              "train_scans": len(train_idx), "renders_per_scan": common.RENDERS_PER_SCAN}
    common.export({"unet": ema, "vae": ae.state_dict(),
                   "clip": common.pack_text_encoder(clip.cond_stage_model.state_dict())}, config, OUT)


if __name__ == "__main__":
    main()
