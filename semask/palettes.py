"""Colour palettes for label maps: the official ADE20K and Cityscapes palettes, and a generated one otherwise.

ADE20K: the 150 colours of the MIT scene-parsing benchmark (as in mmsegmentation's `ADE20KDataset`; two classes
share a colour there, kept as published). Cityscapes: the official colours of the 19 evaluation classes
(cityscapesScripts `labels.py`). Both are in label-index order of `semask.presets.DATASET_LABELS`.
"""

import colorsys

import numpy as np

from .presets import DATASET_LABELS

# fmt: off
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230),
    (119, 11, 32),
)

# fmt: on

DATASET_PALETTES = {"ade20k": ADE20K_PALETTE, "cityscapes": CITYSCAPES_PALETTE}
GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def dataset_of_labels(id2label: dict[int, str]) -> str | None:
    """The dataset key of `semask.presets.DATASET_LABELS` whose class names `id2label` lists in order, or None."""
    names = tuple(str(name).strip().lower() for _, name in sorted(id2label.items()))
    for dataset, labels in DATASET_LABELS.items():
        if names == tuple(label.strip().lower() for label in labels):
            return dataset
    return None


def generated_palette(num_labels: int) -> np.ndarray:
    """`num_labels` distinct, deterministic colours (uint8, (num_labels, 3)): golden-ratio hue steps."""
    colours = []
    for index in range(num_labels):
        hue = (index * GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation = 0.55 + 0.45 * ((index // 3) % 2)
        value = 0.65 + 0.35 * ((index // 2) % 2)
        colours.append([round(255 * channel) for channel in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.array(colours, dtype=np.uint8).reshape(num_labels, 3)


def palette_for_labels(id2label: dict[int, str]) -> np.ndarray:
    """The official palette when `id2label` is ADE20K's or Cityscapes' label set, a generated one otherwise."""
    dataset = dataset_of_labels(id2label)
    if dataset in DATASET_PALETTES:
        return np.array(DATASET_PALETTES[dataset], dtype=np.uint8)
    return generated_palette(len(id2label))
