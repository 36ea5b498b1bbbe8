"""TrainFree NASA on the real ComfyUI with tiny SD1.5 / SDXL / SD3 / Flux models."""
import pytest
import torch

from conftest import ModelCallCounter, run_node, sample
from harness import tiny_models


def nasa(model, negative, alpha=0.5, start=0.0, end=1.0):
    return run_node("TrainFreeNASA", model=model, negative=negative, alpha=alpha, start_percent=start,
                    end_percent=end)[0]


def negative_of(family, tokens=8, seed=5):
    return tiny_models.conditioning(family, tokens=tokens, seed=seed, scale=3.0)


def report(host, model):
    return list(host.run_reports(model).values())[0]


def test_smoke(tiny, family, host):
    base = sample(tiny(family), family, cfg=1.0)
    patched = nasa(tiny(family), negative_of(family))
    out = sample(patched, family, cfg=1.0)
    print(family, (out - base).abs().max(), report(host, patched))
    assert (out - base).abs().max() > 1e-3
