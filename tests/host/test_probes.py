"""The host adapter's feature probes say what this ComfyUI does (each host takes one branch; scripts/test.sh
checks across the hosts that both branches of every probe are taken)."""
import copy

from conftest import run_node, sample


def test_the_clone_probe_says_whether_clone_deep_copies_a_patch_s_run_scope(tiny, host):
    patched = run_node("TrainFreeAPG", model=tiny("sd15"), eta=0.0, norm_threshold=15.0, momentum=-0.5)[0]
    (scope,) = patched.model_options["transformer_options"]["trainfree_runs"].values()
    copies = []
    scope_type = type(scope)
    original = scope_type.__deepcopy__
    scope_type.__deepcopy__ = lambda self, memo: copies.append(self) or original(self, memo)
    try:
        clone = patched.clone()
    finally:
        scope_type.__deepcopy__ = original
    assert bool(copies) == host.CLONE_DEEP_COPIES_OBJECTS
    # Either way, the clone keeps the one scope of the patch (its wrapper reads the same object).
    assert clone.model_options["transformer_options"]["trainfree_runs"][scope.key] is scope
    assert copy.deepcopy(scope) is scope


def test_every_probe_has_a_kind(host):
    for name, (value, kind) in host.probes().items():
        assert kind in ("branch", "requirement"), name
        assert kind == "branch" or value, f"{name}: a hook the pack needs is missing on this ComfyUI"


def test_the_img_slice_probe_says_what_flux_passes_its_single_blocks(tiny, host):
    """Record what a Flux single block receives; the probe must agree with it."""
    model = tiny("flux").clone()
    seen = []

    def single(args, extra):
        seen.append("img_slice" in args["transformer_options"])
        return extra["original_block"](args)
    model.set_model_patch_replace(single, "dit", "single_block", 0)
    sample(model, "flux", steps=1, size=8)
    assert seen and set(seen) == {host.FLUX_STATES_IMG_SLICE}
