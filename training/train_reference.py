"""Train the pack's reference model on real handwritten digits (see training/digits.py), CPU only.

Three parts, all built from ComfyUI's own classes through the pack's host adapter, so the loader node rebuilds
exactly what was trained:
- a small KL autoencoder (128x128 RGB <-> 16x16x4 latents, SD1.5's conventions, latent scale 0.18215),
- a small SD1-style CLIP text encoder with the real SD1 tokenizer, frozen at its seeded random init,
- a small SD1.5 UNet (spatial transformers at 8x8 and 4x4 plus the middle block), trained as an
  eps-prediction model on SD1.5's noise schedule with 10% caption dropout (for classifier-free guidance).

Deterministic (fixed seeds), resumable (checkpoints in training/work/, re-run the same command to go on):

    python -m training.train_reference --vae-steps 600 --unet-steps 4500
"""
import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from harness import comfy_host
from harness.tiny_models import init_fan_in
from training import digits

WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work")
OUT = os.path.join(comfy_host.PACK_DIR, "reference_model", "trainfree_digits.safetensors")
SEED = 20261124

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 16, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64,  # output depths are popped from the end
    "use_temporal_resblock": False, "use_temporal_attention": False}
CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 64, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 256, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1,
    "projection_dim": 64, "torch_dtype": "float32", "vocab_size": 49408}
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": digits.SIZE, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
LATENT_CHANNELS = 4
LATENT_SCALE = 0.18215  # SD1.5's latent format: the VAE's latents are scaled to about unit std by this
RENDERS_PER_SCAN = 4


def checkpoint_path(name):
    os.makedirs(WORK, exist_ok=True)
    return os.path.join(WORK, name)


# ---------------------------------------------------------------- autoencoder

def vae_step(ae, images, kl_weight=1e-6):
    x = images * 2 - 1
    moments = ae.quant_conv(ae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    recon = ae.decoder(ae.post_quant_conv(z))
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    return F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * kl


def train_vae(host, scans, labels, train_idx, steps, batch=16, crop=64, ddconfig=VAE_DDCONFIG,
              channels=LATENT_CHANNELS, name="vae.pt", warm_start=None):
    """Train (or resume) a KL autoencoder; ``warm_start``: a state dict whose same-shaped tensors start it."""
    path = checkpoint_path(name)
    ae = host.build_kl_autoencoder(ddconfig, channels)
    init_fan_in(ae, SEED)
    if warm_start is not None:
        own = ae.state_dict()
        ae.load_state_dict({k: v for k, v in warm_start.items() if k in own and own[k].shape == v.shape},
                           strict=False)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3, weight_decay=0.0)
    step = 0
    if os.path.exists(path):
        state = torch.load(path)
        ae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    started = time.time()
    while step < steps:
        images = digits.examples(scans, labels, train_idx, batch, seed=SEED + step)[0]
        g = torch.Generator().manual_seed(step)
        y, x = torch.randint(0, digits.SIZE - crop + 1, (2,), generator=g).tolist()
        images = images[:, :, y:y + crop, x:x + crop] if crop < digits.SIZE else images
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = vae_step(ae, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0 or step == steps:
            print(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
            torch.save({"model": ae.state_dict(), "opt": opt.state_dict(), "step": step}, path)
    return ae


def normalise_latent_scale(ae, latents_mean, latents_std, channels=LATENT_CHANNELS, scale=LATENT_SCALE, shift=0.0):
    """Reparametrise the encoder's output and the decoder's input so that latents have mean ``shift`` and std
    1 / ``scale``, which the family's latent format expects; the autoencoder's function is unchanged."""
    k = (1.0 / scale) / latents_std
    c = shift - k * latents_mean
    with torch.no_grad():
        qc, pqc = ae.quant_conv, ae.post_quant_conv
        qc.weight[:channels] *= k
        qc.bias[:channels] = qc.bias[:channels] * k + c
        qc.bias[channels:] += 2 * math.log(k)
        pqc.bias -= pqc.weight.sum(dim=(1, 2, 3)) * c / k  # the decoder sees (z' - c) / k
        pqc.weight /= k


@torch.no_grad()
def encode(ae, images, batch=64):
    out = []
    for i in range(0, len(images), batch):
        moments = ae.quant_conv(ae.encoder(images[i:i + batch] * 2 - 1))
        out.append(moments.chunk(2, dim=1)[0])
    return torch.cat(out)


def dataset_latents(ae, scans, labels, train_idx, name="latents.pt"):
    path = checkpoint_path(name)
    if os.path.exists(path):
        return torch.load(path)
    count = len(train_idx) * RENDERS_PER_SCAN
    latents, captions = [], []
    for start in range(0, count, 512):
        images, caps = digits.examples(scans, labels, train_idx, min(512, count - start), seed=SEED + 10**6 + start)[:2]
        latents.append(encode(ae, images))
        captions += caps
        print(f"encoded {start + len(caps)}/{count}", flush=True)
    data = {"latents": torch.cat(latents), "captions": captions}
    torch.save(data, path)
    return data


def prepare_autoencoder(host, scans, labels, train_idx, vae_steps, name="vae", latent_scale=LATENT_SCALE,
                        latent_shift=0.0, **vae_options):
    """The trained autoencoder with its latents normalised to the family's format, and the training set's latents."""
    ae = train_vae(host, scans, labels, train_idx, vae_steps, name=f"{name}.pt", **vae_options)
    channels = vae_options.get("channels", LATENT_CHANNELS)
    if not os.path.exists(checkpoint_path(f"{name}_normalised.pt")):
        probe = encode(ae, digits.examples(scans, labels, train_idx, 256, seed=SEED + 7)[0])
        normalise_latent_scale(ae, probe.mean().item() if latent_shift else 0.0, probe.std().item(), channels,
                               latent_scale, latent_shift)
        torch.save({"model": ae.state_dict(), "opt": {}, "step": vae_steps, "normalised": True},
                   checkpoint_path(f"{name}_normalised.pt"))
    else:
        ae.load_state_dict(torch.load(checkpoint_path(f"{name}_normalised.pt"))["model"])
    data = dataset_latents(ae, scans, labels, train_idx, name=f"{name}_latents.pt" if name != "vae" else "latents.pt")
    print(f"latent mean {data['latents'].mean().item():.3f} std {data['latents'].std().item():.3f} "
          f"(target {latent_shift:.3f}, {1 / latent_scale:.3f})", flush=True)
    return ae, data


# ---------------------------------------------------------------- text encoder and UNet

def frozen_text_encoder(host, clip, name, seed):
    """``clip`` at its seeded random init (kept in training/work/``name``), with exactly the weights the exported
    file stores, so the denoiser trains on the embeddings users get: token tables int8 per row, the rest float16."""
    path = checkpoint_path(name)
    if os.path.exists(path):
        state = torch.load(path)
    else:
        init_fan_in(clip.cond_stage_model, seed)
        state = clip.cond_stage_model.state_dict()
        torch.save(state, path)
    clip.cond_stage_model.load_state_dict(host.unpack_weights(pack_text_encoder(state)))
    return clip


def pack_text_encoder(state):
    """Shrink a text encoder for the file: its token tables (CLIP's 49408 rows, T5's 32128) as int8 with one scale
    per row, the rest as float16."""
    packed = {}
    for key, value in state.items():
        if key.endswith(("token_embedding.weight", "shared.weight")):
            scale = value.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
            packed[key + ".int8"] = (value / scale).round().to(torch.int8)
            packed[key + ".scale"] = scale.float()
        elif value.dtype.is_floating_point:
            packed[key] = value.to(torch.float16)
        else:
            packed[key] = value
    return packed


@torch.no_grad()
def embed(clip, texts):
    """{text: (cross-attention sequence, pooled vector)} from the frozen text encoder."""
    out = {}
    for text in texts:
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        out[text] = (cond[0], pooled[0] if pooled is not None else None)
    return out


def copies_for_backward():
    """ComfyUI's models are inference implementations that add residuals in place; under this context autograd
    keeps its own copies of the tensors it saves for the backward pass, so training through them is correct."""
    return torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved)


def train_denoiser(net, batch_loss, name, steps, lr, warmup=500, ema_decay=0.999, seed=SEED + 3, save_every=500):
    """AdamW (weight decay 0.01, gradient clip 1, linear warm-up) on ``batch_loss(generator)`` up to ``steps`` steps
    in all, with an EMA of ``net``'s weights; checkpointed to training/work/``name`` every ``save_every`` steps and
    resumed from there. Step n draws from a generator seeded with ``seed + n``, so a resumed run equals an
    uninterrupted one.
    Returns (EMA state, steps, seconds)."""
    path = checkpoint_path(name)
    ema = copy.deepcopy(net.state_dict())
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    step, spent = 0, 0.0
    if os.path.exists(path):
        state = torch.load(path)
        net.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        ema, step, spent = state["ema"], state["step"], state["seconds"]
    g = torch.Generator()
    started = time.time() - spent

    def save():
        torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step,
                    "seconds": time.time() - started}, path)
    net.train()
    first = step
    while step < steps:
        loss = batch_loss(g.manual_seed(seed + step))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for k, v in net.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)
        if step % 100 == 0:
            elapsed = time.time() - started
            print(f"{name} step {step} loss {loss.item():.4f} ({elapsed:.0f} s, {elapsed / step:.2f} s/step)",
                  flush=True)
        if step % save_every == 0:
            save()
    if step > first:  # a run asked for no more steps than were done exports the checkpoint without rewriting it
        save()
    return ema, step, time.time() - started


def draw_examples(g, x0_all, batch, drop):
    """(indices, clean latents, caption-dropout mask) of one training batch."""
    idx = torch.randint(len(x0_all), (batch,), generator=g)
    return idx, x0_all[idx], torch.rand(batch, generator=g) < drop


def train_unet(host, latents, captions, embeddings, steps, batch=64, lr=5e-4, drop=0.1):
    patcher = host.build_diffusion_model("SD15", UNET_CONFIG)
    model = patcher.model
    net = model.diffusion_model
    init_fan_in(net, SEED + 2)
    sigmas = model.model_sampling.sigmas
    x0_all = model.latent_format.process_in(latents)
    empty = embeddings[""][0]
    cond_all = torch.stack([embeddings[c][0] for c in captions])

    def batch_loss(g):
        idx, x0, flip = draw_examples(g, x0_all, batch, drop)
        context = torch.where(flip[:, None, None], empty[None], cond_all[idx])
        t = torch.randint(0, len(sigmas), (batch,), generator=g)
        sigma = sigmas[t]
        noise = torch.randn(x0.shape, generator=g)
        noisy = x0 + noise * sigma[:, None, None, None]
        denoised = model.apply_model(noisy, sigma, c_crossattn=context)
        eps = (noisy - denoised) / sigma[:, None, None, None]
        return F.mse_loss(eps, noise)
    return train_denoiser(net, batch_loss, "unet.pt", steps, lr)


def export(parts, config, path=OUT):
    """Write ``parts`` ({"unet": state, "vae": state, "clip": packed state}) in float16 with ``config`` as metadata."""
    from safetensors.torch import save_file
    tensors = {}
    for prefix, state in parts.items():
        for k, v in state.items():
            v = v.detach()
            tensors[f"{prefix}.{k}"] = (v.to(torch.float16) if v.dtype == torch.float32 else v).contiguous()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata={"trainfree_reference": json.dumps(config)})
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")


def load_data():
    scans, labels = digits.load_scans()
    return scans, labels, digits.split(labels)[0]


def start(doc, seed, **step_options):
    """Parse a training script's options (``--threads`` and the given step counts), seed torch, boot ComfyUI on
    the CPU; returns (options, the pack's host adapter)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    for name, default in step_options.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    comfy_host.boot()
    return args, comfy_host.pack_module("nodes.host")


def main():
    args, host = start(__doc__, SEED, vae_steps=600, unet_steps=4500)
    scans, labels, train_idx = load_data()
    ae, data = prepare_autoencoder(host, scans, labels, train_idx, args.vae_steps)
    clip = frozen_text_encoder(host, host.build_sd1_text_encoder(CLIP_CONFIG), "clip.pt", SEED + 1)
    embeddings = embed(clip, [""] + digits.all_captions())
    ema, steps, seconds = train_unet(host, data["latents"], data["captions"], embeddings, args.unet_steps)
    config = {"unet_config": UNET_CONFIG, "clip_config": CLIP_CONFIG, "vae_ddconfig": VAE_DDCONFIG,
              "latent_channels": LATENT_CHANNELS, "model_config": "SD15", "unet_steps": steps,
              "unet_seconds": round(seconds), "vae_steps": args.vae_steps, "seed": SEED,
              "train_scans": len(train_idx), "renders_per_scan": RENDERS_PER_SCAN}
    export({"unet": ema, "vae": ae.state_dict(), "clip": pack_text_encoder(clip.cond_stage_model.state_dict())},
           config)


if __name__ == "__main__":
    main()
