"""The digit oracle: a small CNN trained on the real digit scans (train split only) that reads the prompted digit
off a generated image, and whose penultimate features give the Fréchet distance.

It sees the image's ink map (distance from the background colour), so colour and background do not matter.
Train once, deterministically: ``python -m bench.quality.oracle`` (about a minute on a CPU).
"""
import torch
import torch.nn.functional as F

from guidance_ops.digit_oracle import SIDE, WEIGHTS, DigitOracle, load  # noqa: F401 (the benches' import point)


def _augment(images, g):
    blur = torch.rand((), generator=g).item() * 1.5
    if blur > 0.3:
        k = torch.tensor([blur / 2, 1.0, blur / 2])
        k = (k[:, None] * k[None]) / (k.sum() ** 2)
        images = F.conv2d(images, k.expand(3, 1, 3, 3), padding=1, groups=3)
    return (images + 0.03 * torch.randn(images.shape, generator=g)).clamp(0, 1)


def _pool(scans, labels, indices, count, seed):
    """Oracle inputs for ``count`` augmented renderings, made once (rendering dominates the cost)."""
    from training import digits
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for start in range(0, count, 500):
        images, _, target, _, _ = digits.examples(scans, labels, indices, min(500, count - start), seed=seed + start)
        xs.append(DigitOracle.prepare(_augment(images, g)))
        ys.append(target)
    return torch.cat(xs), torch.cat(ys)


def train(steps=3000, batch=128, pool=12000, seed=0):
    from training import digits
    torch.manual_seed(seed)
    scans, labels = digits.load_scans()
    train_idx, test_idx = digits.split(labels)
    inputs, targets = _pool(scans, labels, train_idx, pool, seed)
    oracle = DigitOracle()
    opt = torch.optim.Adam(oracle.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(inputs), (batch,), generator=g)
        loss = F.cross_entropy(oracle.classify_prepared(inputs[idx]), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0:
            print(f"oracle step {step} loss {loss.item():.3f}", flush=True)
    oracle.eval()
    return oracle, accuracy(oracle, scans, labels, test_idx)


@torch.no_grad()
def accuracy(oracle, scans, labels, indices, count=1000, seed=123):
    from training import digits
    images, _, target, _, _ = digits.examples(scans, labels, indices, count, seed=seed)
    return (oracle(images).argmax(1) == target).float().mean().item()


if __name__ == "__main__":
    from safetensors.torch import save_file
    model, acc = train()
    print(f"held-out accuracy: {acc:.3f}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, WEIGHTS)
    print(f"wrote {WEIGHTS}")
