"""Real-image inversion and editing on the reference models: reconstruction PSNR / SSIM per inversion method, and
prompt edits (colour word, digit word) judged by the digit oracle and by PSNR outside the edited region.

    python -m bench.inversion_quality --model sd15 --out docs/bench --grid-dir docs/quality
    python -m bench.inversion_quality --model flux --out docs/bench --grid-dir docs/quality

Held-out real digits (never trained on) are encoded with the model's VAE and inverted with their true captions as
source prompts; everything runs through ComfyUI's execution engine (one API prompt per digit). Writes
``inversion_<model>.json`` (raw rows) to --out and ``inversion_<model>.png`` (one row per digit: source, VAE
round trip, the reconstructions, the colour edits, the digit edits; columns in ``COLUMNS``) to --grid-dir, and
prints the tables as markdown.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from bench.quality import __main__ as quality
from bench.quality import metrics, oracle
from harness import collect, comfy_host, run_workflows
from training import digits

OUT = os.path.join(comfy_host.PACK_DIR, "bench", "output", "inversion")
# Per model: sampling steps and scheduler, the CFG scale of the edits, CFG++'s lambda, fixed-point iterations.
SETTINGS = {"sd15": {"steps": 50, "scheduler": "normal", "cfg": 7.5, "cfgpp_lambda": 0.6, "fixed_point": 5},
            "flux": {"steps": 30, "scheduler": "simple", "cfg": 5.0, "cfgpp_lambda": 0.6, "fixed_point": 5}}
UNCOND = {"plain": "negative prompt", "nti": "null-text (from the inversion)",
          "npi": "negative-prompt inversion (source prompt)", "proximal": "proximal guidance (source prompt + ProxEdit)",
          "proximal_no_pull": "proximal guidance (source prompt + ProxEdit)"}
# proximal_no_pull: proximal guidance without the late steps' pull back to the inversion (proximal_recon_lr 0).
EDIT_METHODS = ("plain", "npi", "nti", "proximal", "proximal_no_pull", "p2p_npi", "p2p_nti", "flowopt")
# p2p_*: Prompt-to-Prompt word swap (cross 0.8, self 0.4, local blend on the swapped words) from the same inversion,
# with negative-prompt inversion or null-text inversion as the unconditional branch; UNet models only.
P2P_UNCOND = {"p2p_npi": UNCOND["npi"], "p2p_nti": UNCOND["nti"]}


# flowopt: FlowOpt from the plain inversion (flow models only): for reconstruction the source prompt at cfg 1 through
# every step, 10 iterations; for edits the target prompt at the edit's cfg through the last 13/15 of the steps,
# 8 iterations (the official editing setting), the official eta.
FLOWOPT = {"reconstruction": (1.0, 1.0, 10), "edit": (None, 13 / 15, 8)}


def edit_methods(model, nti):
    return [m for m in EDIT_METHODS if (nti or not m.endswith("nti")) and (model != "flux" or m not in P2P_UNCOND)
            and (model == "flux" or m != "flowopt")]


def reconstruction_methods(model, nti):
    return [m for m in RECONSTRUCTIONS if (nti or m != "nti")] + (["flowopt"] if model == "flux" else [])


def flowopt(p, links, inversion, positive, cfg, steps, share, iterations):
    extra = {"negative": links["empty"]} if cfg != 1.0 else {}
    return p.add("TrainFreeFlowOpt", model=["model", 0], inversion=inversion, positive=positive, cfg=cfg,
                 n_max=round(share * steps), iterations=iterations, eta=0.0, **extra)
RECONSTRUCTIONS = ("plain", "nti", "npi", "proximal", "cfgpp", "fixed_point", "plain_cfg1")
INK_THRESHOLD, INK_MARGIN = 0.1, 2  # background: ink below 0.1, and at least 2 px from any pixel with more ink
SEED = 11

HarnessSupplyImage, _supplied = collect.supplier("image", "IMAGE")
HarnessCollectImages, _collected = collect.collector("images", "IMAGE")


def held_out(count, seed=SEED):
    """``count`` held-out real digits: (images [N, 3, H, W], captions, digits, colours, backgrounds)."""
    scans, labels = digits.load_scans()
    _, test_idx = digits.split(labels)
    images, captions, numbers, colours, backgrounds = digits.examples(scans, labels, test_idx, count, seed=seed)
    return images, captions, [int(d) for d in numbers], colours, backgrounds


def colour_edit(colour):
    """The colour an edit asks for instead: three places on in digits.COLOURS (red -> blue)."""
    names = list(digits.COLOURS)
    return names[(names.index(colour) + 3) % len(names)]


def digit_edit(digit):
    """The digit an edit asks for instead: seven -> one, and so on (four on)."""
    return (digit + 4) % 10


class Prompt:
    """An API-format prompt built node by node; ``add`` returns the link to the node's first output."""

    def __init__(self):
        self.nodes, self._count = {}, 0

    def add(self, class_type, node_id=None, **inputs):
        node_id = node_id or f"n{self._count}"
        self._count += 1
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]

    def text(self, text):
        return self.add("CLIPTextEncode", text=text, clip=["model", 1])

    def collect(self, latent, key):
        image = self.add("VAEDecode", samples=latent, vae=["model", 2])
        self.add("HarnessCollectImages", images=image, key=key)


def base_prompt(model, image_key, caption, steps, scheduler):
    """Loader, the supplied image encoded, source prompt, empty negative, schedule: (prompt, links)."""
    p = Prompt()
    p.add("TrainFreeReferenceModel", node_id="model", model_file=quality.MODELS[model])
    image = p.add("HarnessSupplyImage", key=image_key)
    links = {"latent": p.add("VAEEncode", pixels=image, vae=["model", 2]), "source": p.text(caption),
             "empty": p.text(""),
             "sigmas": p.add("BasicScheduler", model=["model", 0], scheduler=scheduler, steps=steps, denoise=1.0)}
    return p, links


def invert(p, links, sampler="euler", guidance=1.0, fixed_point=0, negative=True):
    extra = {"negative": links["empty"]} if negative and (sampler == "cfg++" or guidance != 1.0) else {}
    return p.add("TrainFreeInvert", model=["model", 0], positive=links["source"], latent=links["latent"],
                 sigmas=links["sigmas"], sampler=sampler, guidance=guidance, fixed_point_iterations=fixed_point, **extra)


def sample(p, links, inversion, positive, cfg, method):
    extra = {"negative": links["empty"]} if method == "plain" else {}
    if method == "proximal_no_pull":
        extra["proximal_recon_lr"] = 0.0
    return p.add("TrainFreeSampleFromInversion", model=["model", 0], inversion=inversion, positive=positive, cfg=cfg,
                 unconditional=UNCOND[method], **extra)


def null_text(p, links, inversion, cfg, inner_steps=10, learning_rate=0.01, early_stop=True):
    return p.add("TrainFreeNullTextInversion", model=["model", 0], inversion=inversion, negative=links["empty"],
                 cfg=cfg, inner_steps=inner_steps, learning_rate=learning_rate, early_stop=early_stop)


def digit_prompt(model, i, caption, edits, nti):
    """Every method on digit ``i``: reconstructions keyed ``rec|<method>|i``, edits ``<kind>|<method>|i``."""
    s = SETTINGS[model]
    p, links = base_prompt(model, str(i), caption, s["steps"], s["scheduler"])
    p.collect(links["latent"], f"rec|vae|{i}")
    pivot = invert(p, links)
    inversions = {"plain": pivot, "npi": pivot, "proximal": pivot, "proximal_no_pull": pivot}
    if nti:
        inversions["nti"] = null_text(p, links, pivot, s["cfg"])
    for method, inversion in inversions.items():
        if method in RECONSTRUCTIONS:
            p.collect(sample(p, links, inversion, links["source"], s["cfg"], method), f"rec|{method}|{i}")
    p.collect(sample(p, links, pivot, links["source"], 1.0, "plain"), f"rec|plain_cfg1|{i}")
    cfgpp = invert(p, links, "cfg++", s["cfgpp_lambda"])
    p.collect(sample(p, links, cfgpp, links["source"], s["cfgpp_lambda"], "plain"), f"rec|cfgpp|{i}")
    if model == "flux":
        cfg, share, iterations = FLOWOPT["reconstruction"]
        found = flowopt(p, links, pivot, links["source"], cfg, s["steps"], share, iterations)
        p.collect(found, f"rec|flowopt|{i}")
    fixed = invert(p, links, "euler", s["cfg"], s["fixed_point"])
    p.collect(sample(p, links, fixed, links["source"], s["cfg"], "plain"), f"rec|fixed_point|{i}")
    for kind, text in edits.items():
        target = p.text(text)
        for method in edit_methods(model, nti):
            if method == "flowopt":
                _, share, iterations = FLOWOPT["edit"]
                p.collect(flowopt(p, links, pivot, target, s["cfg"], s["steps"], share, iterations),
                          f"{kind}|{method}|{i}")
            elif method in P2P_UNCOND:
                inversion = inversions["nti"] if method == "p2p_nti" else pivot
                p.collect(prompt_to_prompt(p, inversion, caption, text, s["cfg"], P2P_UNCOND[method]),
                          f"{kind}|{method}|{i}")
            elif method in inversions:
                p.collect(sample(p, links, inversions[method], target, s["cfg"], method), f"{kind}|{method}|{i}")
    return p.nodes


def prompt_to_prompt(p, inversion, source, target, cfg, unconditional):
    """A word swap whose local blend follows the swapped words (the source's and the target's)."""
    swapped = [w for a, b in zip(source.split(), target.split()) if a != b for w in (a, b)]
    return p.add("TrainFreePromptToPrompt", model=["model", 0], clip=["model", 1], inversion=inversion,
                 source_text=source, target_text=target, edit="word swap", cfg=cfg, unconditional=unconditional,
                 cross_replace=0.8, self_replace=0.4, blend_words=", ".join(swapped))


def null_text_refusal(model):
    """Run null-text inversion alone on ``model``; the engine's error message if it refuses, else None."""
    s = SETTINGS[model]
    images, captions, *_ = held_out(1)
    _supplied["refusal"] = images[:1].permute(0, 2, 3, 1).contiguous()
    p, links = base_prompt(model, "refusal", captions[0], 2, s["scheduler"])
    p.collect(sample(p, links, null_text(p, links, invert(p, links), s["cfg"], inner_steps=1), links["source"],
                     s["cfg"], "nti"), "refusal")
    return comfy_host.refusal(p.nodes)


def masked_psnr(a, b, mask):
    """PSNR over the pixels where ``mask`` [N, 1, H, W] is true (all channels), averaged over images."""
    weight = mask.float().expand_as(a)
    mse = ((a - b).pow(2) * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-12))).mean().item()


def grow(mask):
    """``mask`` [N, 1, H, W] bool grown by INK_MARGIN pixels."""
    return F.max_pool2d(mask.float(), 2 * INK_MARGIN + 1, stride=1, padding=INK_MARGIN) > 0


def source_background(source):
    """The source's background: ink (metrics.ink_map) below INK_THRESHOLD, INK_MARGIN px away from the digit."""
    return ~grow(metrics.ink_map(source) >= INK_THRESHOLD)


def drawn_in(images, source, colours):
    """Pixels of ``images`` nearer to the digit colour ``colours`` (names) than to the source's background."""
    fg = torch.tensor([digits.COLOURS[c] for c in colours], dtype=images.dtype)[:, :, None, None]
    bg = metrics.border_colour(source)[:, :, None, None]
    return ((images - fg).norm(dim=1, keepdim=True) < (images - bg).norm(dim=1, keepdim=True))


def score_reconstruction(images, source):
    return {"psnr": metrics.psnr(images, source), "ssim": metrics.ssim(images, source),
            "psnr_each": [metrics.psnr(a[None], b[None]) for a, b in zip(images, source)]}


def share(found, wanted):
    return sum(a == b for a, b in zip(found, wanted)) / len(wanted)


def score_edit(kind, images, source, judge, source_digits, source_colours, target_digits, target_colours):
    """Adherence to the edit, what should stay (the other attribute), and PSNR outside the edited region: for a
    colour edit the source's background; for a digit edit the source's background less the pixels that the edit
    draws in the digit's colour (grown by INK_MARGIN), so the new digit's strokes do not count but any other change
    of the background does."""
    with torch.no_grad():
        read = judge(images).argmax(1).tolist()
    colours = metrics.nearest_colour(metrics.foreground_colour(images), digits.COLOURS)
    outside = source_background(source)
    if kind == "digit":
        outside &= ~grow(drawn_in(images, source, target_colours))
    row = {"digit_adherence": share(read, target_digits), "colour_adherence": share(colours, target_colours),
           "psnr_outside_edit": masked_psnr(images, source, outside),
           "outside_share": outside.float().mean().item()}
    if kind == "colour":
        row["digit_kept"] = share(read, source_digits)
    else:
        row["colour_kept"] = share(colours, source_colours)
    return row


def run(model, count=8, out=OUT, grid_dir=None):
    run_workflows.boot()
    import nodes
    nodes.NODE_CLASS_MAPPINGS.update(HarnessSupplyImage=HarnessSupplyImage, HarnessCollectImages=HarnessCollectImages)
    s = SETTINGS[model]
    images, captions, numbers, colours, backgrounds = held_out(count)
    refusal = null_text_refusal(model)
    nti = refusal is None
    _collected.clear()
    started = time.perf_counter()
    for i, (caption, d, c, b) in enumerate(zip(captions, numbers, colours, backgrounds)):
        _supplied[str(i)] = images[i:i + 1].permute(0, 2, 3, 1).contiguous()
        edits = {"colour": digits.caption(d, colour_edit(c), b), "digit": digits.caption(digit_edit(d), c, b)}
        comfy_host.execute_prompt(digit_prompt(model, i, caption, edits, nti))
    seconds = time.perf_counter() - started
    got = lambda key: torch.cat([_collected[f"{key}|{i}"] for i in range(count)]).permute(0, 3, 1, 2).float()  # noqa
    common = {"model": model, "model_file": quality.MODELS[model], "digits": count, "seed": SEED, **s,
              "host": comfy_host.host_label().split(" ")[0]}
    rows = [{**common, "kind": "reconstruction", "method": "vae_round_trip", **score_reconstruction(got("rec|vae"), images)}]
    methods = reconstruction_methods(model, nti)
    for method in methods:
        cfg = {"plain_cfg1": 1.0, "cfgpp": s["cfgpp_lambda"], "flowopt": FLOWOPT["reconstruction"][0]}.get(
            method, s["cfg"])
        rows.append({**common, "kind": "reconstruction", "method": method, "sampling_cfg": cfg,
                     **score_reconstruction(got(f"rec|{method}"), images)})
    judge = oracle.load()
    targets = {"colour": (numbers, [colour_edit(c) for c in colours]),
               "digit": ([digit_edit(d) for d in numbers], colours)}
    for kind, (target_digits, target_colours) in targets.items():
        outside = source_background(images)
        rows.append({**common, "kind": f"{kind} edit", "method": "vae_round_trip",
                     "psnr_outside_edit": masked_psnr(got("rec|vae"), images, outside),
                     "outside_share": outside.float().mean().item()})
        for method in edit_methods(model, nti):
            rows.append({**common, "kind": f"{kind} edit", "method": method, "sampling_cfg": s["cfg"],
                         **score_edit(kind, got(f"{kind}|{method}"), images, judge, numbers, colours, target_digits,
                                      target_colours)})
    result = {"command": f"python -m bench.inversion_quality --model {model} --count {count}", "seconds": seconds,
              "outside_the_edit": "colour edit: the source's background (metrics.ink_map below 0.1, 2 px from the "
                                  "digit); digit edit: that, less the pixels the edit draws in the digit's colour "
                                  "(nearer to it than to the source's background colour), grown by 2 px",
              "null_text_refusal": refusal, "captions": captions,
              "edits": {"colour": [colour_edit(c) for c in colours], "digit": [digit_edit(d) for d in numbers]},
              "columns": grid_columns(model, methods, nti), "rows": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"inversion_{model}.json"), "w") as f:
        json.dump(result, f, indent=1)
    grid_dir = grid_dir or out
    os.makedirs(grid_dir, exist_ok=True)
    columns = [images] + [got(key) for key in result["columns"][1:]]
    quality.save_grid(torch.stack(columns, 1).flatten(0, 1).clamp(0, 1), len(columns),
                      os.path.join(grid_dir, f"inversion_{model}.png"))
    return result


def grid_columns(model, methods, nti):
    edits = [f"{kind}|{m}" for kind in ("colour", "digit") for m in edit_methods(model, nti)]
    return ["source", "rec|vae"] + [f"rec|{m}" for m in methods] + edits


def tables(result):
    rows = result["rows"]
    lines = ["| reconstruction | sampling cfg | PSNR (dB) | SSIM |", "|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "reconstruction":
            lines.append(f"| {r['method']} | {r.get('sampling_cfg', '-')} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    lines += ["", "| edit | method | edit adherence | other attribute kept | PSNR outside the edit (dB) | share of "
              "pixels outside |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"].endswith("edit") and r["method"] == "vae_round_trip":
            lines.append(f"| {r['kind']} | VAE round trip (source background; the ceiling) | - | - | "
                         f"{r['psnr_outside_edit']:.2f} | {r['outside_share']:.2f} |")
        elif r["kind"] == "colour edit":
            lines.append(f"| colour edit | {r['method']} | colour {r['colour_adherence']:.2f} | digit "
                         f"{r['digit_kept']:.2f} | {r['psnr_outside_edit']:.2f} | {r['outside_share']:.2f} |")
        elif r["kind"] == "digit edit":
            lines.append(f"| digit edit | {r['method']} | digit {r['digit_adherence']:.2f} | colour "
                         f"{r['colour_kept']:.2f} | {r['psnr_outside_edit']:.2f} | {r['outside_share']:.2f} |")
    if result["null_text_refusal"]:
        lines += ["", f"null-text inversion refused: {result['null_text_refusal']}"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="sd15")
    parser.add_argument("--count", type=int, default=8, help="held-out digits")
    parser.add_argument("--out", default=OUT, help="folder for inversion_<model>.json")
    parser.add_argument("--grid-dir", help="folder for inversion_<model>.png (default: --out)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args.model, args.count, args.out, args.grid_dir)
    print(tables(result))
    print(f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
