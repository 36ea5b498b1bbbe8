import pytest

from guidance_ops.layers import LayerSelectionError, check_layers, group_by_block, parse_layers

UNET = {("input", 1): 1, ("middle", 0): 10, ("output", 1): 2}


def test_parses_unet_and_dit_names_with_ranges():
    assert parse_layers("middle.0, output.1.1") == [("middle", 0, None), ("output", 1, 1)]
    assert parse_layers(" double.7-9 single.0 ") == [("double", 7, None), ("double", 8, None),
                                                     ("double", 9, None), ("single", 0, None)]
    assert parse_layers("middle.0.2-3") == [("middle", 0, 2), ("middle", 0, 3)]


def test_block_1_does_not_match_block_10():
    # diffusers shipped a regex matcher where "blocks.1" also hit "blocks.10"
    selected = check_layers(parse_layers("double.1"), {("double", i): 1 for i in range(12)})
    assert selected == [("double", 1, None)]


@pytest.mark.parametrize("text", ["", "mid", "middle", "middle.x", "double.1.2", "up.1", "double.9-7"])
def test_malformed_text_is_rejected_with_the_syntax(text):
    with pytest.raises(LayerSelectionError):
        parse_layers(text)


def test_unknown_layers_list_what_the_model_has():
    with pytest.raises(LayerSelectionError) as err:
        check_layers(parse_layers("middle.0, output.7"), UNET)
    assert "output.7" in str(err.value) and "middle.0 (transformers 0-9)" in str(err.value)
    with pytest.raises(LayerSelectionError, match="middle.0.10"):
        check_layers(parse_layers("middle.0.10"), UNET)


def test_group_by_block_whole_block_wins_over_single_transformers():
    assert group_by_block(parse_layers("middle.0.1 middle.0 output.1.0")) == {("middle", 0): None,
                                                                              ("output", 1): {0}}
