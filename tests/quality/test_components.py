"""The connected-component counter of the high-resolution benchmark on hand-made masks with known answers."""
import torch

from bench.quality import metrics


def canvas(n=1, side=24):
    return torch.zeros(n, 1, side, side, dtype=torch.bool)


def test_one_blob_is_one_component():
    mask = canvas()
    mask[0, 0, 4:12, 6:14] = True
    assert metrics.component_sizes(mask) == [[64]]
    assert metrics.component_count(mask, min_pixels=10) == [1]


def test_two_separate_blobs_are_two_components():
    mask = canvas()
    mask[0, 0, 2:7, 2:7] = True  # 25 px
    mask[0, 0, 12:20, 12:16] = True  # 32 px, two empty rows and columns away
    assert metrics.component_sizes(mask) == [[32, 25]]
    assert metrics.component_count(mask, min_pixels=10) == [2]


def test_specks_below_the_size_threshold_do_not_count():
    mask = canvas()
    mask[0, 0, 3:13, 3:13] = True  # the blob, 100 px
    mask[0, 0, 20, 20] = True  # a single pixel
    mask[0, 0, 0:2, 18:21] = True  # a 6 px speck
    assert metrics.component_sizes(mask) == [[100, 6, 1]]
    assert metrics.component_count(mask, min_pixels=7) == [1]
    assert metrics.component_count(mask, min_pixels=6) == [2]


def test_diagonal_neighbours_join_and_a_long_winding_stroke_is_one_component():
    mask = canvas(2)
    for i in range(10):  # a diagonal line of single pixels: 8-connected
        mask[0, 0, i, i] = True
    for row in range(0, 24, 4):  # a serpentine: rows joined alternately at the right and the left end
        mask[1, 0, row, :] = True
        if row + 4 < 24:
            column = 23 if row % 8 == 0 else 0
            mask[1, 0, row:row + 4, column] = True
    assert metrics.component_count(mask, min_pixels=1) == [1, 1]
    assert metrics.component_sizes(mask)[0] == [10]


def test_images_of_a_batch_are_counted_separately():
    mask = canvas(3)
    mask[1, 0, 1:5, 1:5] = True
    mask[2, 0, 1:5, 1:5] = True
    mask[2, 0, 1:5, 10:14] = True
    mask[2, 0, 10:14, 1:5] = True
    assert metrics.component_count(mask, min_pixels=1) == [0, 1, 3]
