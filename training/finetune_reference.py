"""Reference model v2 (SD1.5-class): fine-tune v1 so that it gets the prompt right, CPU only.

Same classes, data, split, captions and file format as v1 (training/train_reference.py); what changes:
- the text encoder is trained with the UNet (v1 kept it at its random init, which left colour words hard to tell
  apart): all of its weights, token table included, get gradients through the UNet's cross-attention,
- min-SNR-5 loss weighting (Hang et al. 2023) instead of the plain eps loss, which spends the small budget on the
  noise levels that decide the image's content rather than on the nearly clean ones,
- offset noise (``--offset-noise``: a per-image, per-channel constant added to the training noise, Guttenberg
  2023): SD1.5's schedule leaves the image's mean visible at its highest noise level, so without it the model
  takes the background's brightness from the starting noise instead of the prompt (v1 drew the prompted
  background in 50-71% of images),
- starts from v1's weights (UNet, text encoder; the autoencoder is kept as is), copied once to training/work/.

Deterministic (fixed seeds, step n draws from seed + n), resumable (re-run the same command to go on). The
shipped v2 was made in two stages, the second continuing the first's checkpoint:

    python -m training.finetune_reference --steps 500 --threads 1
    python -m training.finetune_reference --steps 1100 --offset-noise 0.1 --threads 1
"""
import os
import shutil

import torch
import torch.nn.functional as F

from training import digits
from training import train_reference as common

SEED = common.SEED + 200
MIN_SNR = 5.0


def start_weights():
    """v1's file, copied to training/work/ the first time (the export overwrites reference_model/)."""
    path = common.checkpoint_path("sd15_v1.safetensors")
    if not os.path.exists(path):
        shutil.copyfile(common.OUT, path)
    return path


def caption_encoder(clip):
    """(all captions, function giving their cross-attention sequences [len(captions), 77, width] with gradients):
    the text encoder's own weighted-token path, all captions as one batch."""
    captions = [""] + digits.all_captions()
    sections = [clip.tokenize(c)["l"] for c in captions]
    assert all(len(s) == 1 for s in sections), "every caption fits in one 77-token section"
    batch = {"l": [s[0] for s in sections]}
    encoder = clip.cond_stage_model

    def encode():
        with common.copies_for_backward():
            cond = encoder.encode_token_weights(batch)[0]  # sections are concatenated along the tokens
        return cond.reshape(len(captions), -1, cond.shape[-1])
    return captions, encode


def finetune(host, model, clip, latents, captions, steps, offset_noise=0.0, batch=64, lr=2e-4, drop=0.1):
    unet = model.model.diffusion_model
    text = clip.cond_stage_model
    for p in text.parameters():
        p.requires_grad_(True)
    net = torch.nn.ModuleDict({"unet": unet, "clip": text})
    all_captions, encode = caption_encoder(clip)
    caption_idx = torch.tensor([all_captions.index(c) for c in captions])
    sampling = model.model.model_sampling
    sigmas = sampling.sigmas
    x0_all = model.model.latent_format.process_in(latents)

    def batch_loss(g):
        idx, x0, flip = common.draw_examples(g, x0_all, batch, drop)
        context = encode()[torch.where(flip, 0, caption_idx[idx])]
        sigma = sigmas[torch.randint(0, len(sigmas), (batch,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        if offset_noise:
            noise = noise + offset_noise * torch.randn(batch, x0.shape[1], 1, 1, generator=g)
        s = sigma[:, None, None, None]
        noisy = x0 + noise * s
        eps = (noisy - model.model.apply_model(noisy, sigma, c_crossattn=context)) / s
        snr = sigma.pow(-2)
        weight = snr.clamp(max=MIN_SNR) / snr
        return (weight * F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
    return common.train_denoiser(net, batch_loss, "sd15_v2.pt", steps, lr, warmup=100, seed=SEED, save_every=100)


def main():
    args, host = common.start(__doc__, SEED, steps=1000, offset_noise=0.0)
    model, clip, vae, info = host.load_reference_model(start_weights())
    scans, labels, train_idx = common.load_data()
    data = common.dataset_latents(vae.first_stage_model, scans, labels, train_idx, name="sd15_v1_latents.pt")
    ema, steps, seconds = finetune(host, model, clip, data["latents"], data["captions"], args.steps, args.offset_noise)
    unet_state = {k[len("unet."):]: v for k, v in ema.items() if k.startswith("unet.")}
    clip_state = {k[len("clip."):]: v for k, v in ema.items() if k.startswith("clip.")}
    info = {k: v for k, v in info.items() if not k.startswith("v2_")}
    info.update(v2_steps=steps, v2_seconds=round(seconds), v2_seed=SEED, v2_min_snr=MIN_SNR,
                v2_offset_noise=args.offset_noise, v2_offset_noise_from_step=500, v2_text_encoder="trained")
    common.export({"unet": unet_state, "vae": vae.first_stage_model.state_dict(),
                   "clip": common.pack_text_encoder(clip_state)}, info)


if __name__ == "__main__":
    main()
