"""What ComfyUI sees of the pack: V1 registration, ids, categories, tooltips, no collision with core nodes."""
import pytest


@pytest.fixture(scope="module")
def ours(pack):
    return pack.NODE_CLASS_MAPPINGS


def test_the_pack_registers_through_the_v1_api_with_display_names(pack, ours):
    import nodes
    assert ours and set(ours) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in ours.items():  # ComfyUI skips a custom id that a core node has: this catches collisions
        assert nodes.NODE_CLASS_MAPPINGS[node_id] is cls
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].endswith("(TrainFree)")


def test_ids_categories_descriptions_and_tooltips(ours):
    for node_id, cls in ours.items():
        assert node_id.startswith("TrainFree") and cls.CATEGORY.startswith("trainfree/")
        assert cls.DESCRIPTION and cls.FUNCTION and (cls.RETURN_TYPES or getattr(cls, "OUTPUT_NODE", False))
        for section, inputs in cls.INPUT_TYPES().items():
            for name, spec in inputs.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"

