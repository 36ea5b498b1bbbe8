"""The leak probe of the server leak test (harness/leak_probe.py) can fail: each thing it watches, planted in this
process, shows in its report."""
import torch

from conftest import run_node, sample
from harness import leak_probe


def _apg(model):
    return run_node("TrainFreeAPG", model=model, eta=0.0, norm_threshold=15.0, momentum=-0.5)[0]


def test_the_probe_sees_state_tensors_and_hooks_the_pack_keeps(tiny, host):
    patched = _apg(tiny("sd15"))
    sample(patched, "sd15", steps=2)
    clean = leak_probe.probe()
    assert clean["scopes_holding_state"] == 0 and not clean["tensors_held_by_pack"]

    scope = next(iter(patched.model_options["transformer_options"]["trainfree_runs"].values()))
    scope.state = object()  # a run that never released its state
    host._planted_for_probe_test = [torch.zeros(3, 5)]  # a tensor kept by a pack module
    try:
        planted = leak_probe.probe()
    finally:
        scope.state = None
        del host._planted_for_probe_test
    assert planted["scopes_holding_state"] == 1
    assert [3, 5] in [shape for shape, _ in sum(planted["tensors_held_by_pack"].values(), [])]

    patched.add_wrapper_with_key("apply_model", "probe_test", lambda executor, *a, **k: executor(*a, **k))
    grown = leak_probe.probe()
    assert grown["model_hooks"] != clean["model_hooks"]
