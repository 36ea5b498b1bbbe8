"""High resolution on the Flux-class reference model at 2x its training side (256 px): FreCaS (the benchmark's
settings: 16 + 4 steps, stage ends at timesteps 200 and 0, FA-CFG 35, the VAE transition) against direct sampling
at 256 px with the same 20 steps, prompts and seeds, through ComfyUI's engine, judged at 128 px by the digit
oracle and the connected-component count of bench/highres_quality.py.

Measured (10 prompts x 1 seed, the first seed of each prompt in ``python -m bench.highres_quality``; ComfyUI
0.3.75): digit adherence 0.7 with FreCaS against 0.0 direct (the benchmark's second seed: 0.6 against 0.1); mean
component count 2.7 against 4.8 (second seed: 2.6 against 5.7): direct sampling tiles the canvas with small
repeated digits, the cascade keeps one digit from its 128 px stage. The bounds leave about half the margin.
The SD1.5-class model shows the same direction with a margin too small for 10 images (docs/quality.md).
"""
import pytest

from bench import highres_quality as bench
from bench.quality import __main__ as quality
from bench.quality import oracle

PROMPTS = 10


@pytest.fixture(scope="module")
def scored():
    bench.boot()
    captions, judge = quality.prompt_set(PROMPTS), oracle.load()
    found = {}
    for method in ("direct", "frecas"):
        images, _ = bench.run_cell("flux", method, 2, captions, 1, seed=0)
        found[method] = bench.score(images.float() / 255, captions, 1, judge)
    return found


def test_frecas_reads_as_the_prompted_digit_far_more_often_than_direct_sampling(scored):
    assert scored["frecas"]["digit_adherence"] >= scored["direct"]["digit_adherence"] + 0.3, scored


def test_direct_sampling_breaks_into_more_components_than_frecas(scored):
    assert scored["direct"]["mean_components"] >= scored["frecas"]["mean_components"] + 1.0, scored
