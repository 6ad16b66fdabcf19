"""A small synthetic segmentation dataset, generated on the fly, for demos and tests (`--dataset_name demo`).

Each image is a smoothly shaded background with a few random ellipses and polygons, each filled with one of five
textures (stripes, checkerboard, dots, grain, rings) in its own colours. Orientation, scale, phase and shade vary
from image to image, so a tiny SeMask learns the classes in minutes on a CPU without the task being trivial.
Everything derives from numpy Generators seeded by `(seed, split, index)`: the same arguments give the same bytes.
"""

from collections.abc import Callable

import datasets
import numpy as np
from PIL import Image, ImageDraw

DEMO_LABELS = ("background", "stripes", "checkerboard", "dots", "grain", "rings")
"""Class names; the label maps hold their indices (0 = background, no reduction needed)."""

# Two colours per class (RGB): each texture mixes them with a weight map in [0, 1].
_CLASS_COLOURS = np.array(
    [
        [(70, 78, 92), (150, 150, 140)],  # background: grey-blue to grey shading
        [(200, 40, 40), (250, 190, 160)],  # stripes: red / pale salmon
        [(30, 120, 50), (170, 230, 150)],  # checkerboard: green / pale green
        [(110, 80, 20), (250, 210, 40)],  # dots: yellow dots on brown
        [(90, 40, 140), (220, 170, 240)],  # grain: purple noise
        [(20, 110, 170), (190, 235, 250)],  # rings: blue / pale cyan
    ],
    dtype=np.float32,
)

_SPLIT_IDS = {"train": 0, "validation": 1}
_MIN_IMAGE_SIZE = 32

TextureWeights = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _along_random_direction(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    return xs * np.cos(angle) + ys * np.sin(angle)


def _background(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    ramp = _along_random_direction(rng, ys, xs)
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
    return 0.6 * ramp + 0.1 * rng.random(ys.shape)


def _stripes(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    period = rng.uniform(5, 9)
    return np.sin(2 * np.pi * _along_random_direction(rng, ys, xs) / period + rng.uniform(0, 2 * np.pi)) > 0


def _checkerboard(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    square = rng.integers(4, 9)
    offset_y, offset_x = rng.integers(0, square, size=2)
    return ((ys + offset_y) // square + (xs + offset_x) // square) % 2


def _dots(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    spacing = rng.uniform(7, 11)
    offset_y, offset_x = rng.uniform(0, spacing, size=2)
    distance_y = (ys + offset_y) % spacing - spacing / 2
    distance_x = (xs + offset_x) % spacing - spacing / 2
    return np.hypot(distance_y, distance_x) < 0.3 * spacing


def _grain(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return rng.random(ys.shape)


def _rings(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    centre_y, centre_x = rng.uniform(0, ys.shape[0], size=2)
    period = rng.uniform(6, 10)
    return np.sin(2 * np.pi * np.hypot(ys - centre_y, xs - centre_x) / period) > 0


_TEXTURES: tuple[TextureWeights, ...] = (_background, _stripes, _checkerboard, _dots, _grain, _rings)


def _draw_random_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, class_id: int) -> None:
    """An ellipse or a star-shaped polygon (3-7 corners), 30-70% of the image across, filled with `class_id`."""
    centre = rng.uniform(0.1 * size, 0.9 * size, size=2)
    radius = rng.uniform(0.15 * size, 0.35 * size)
    if rng.random() < 0.5:
        half_axes = radius * rng.uniform(0.5, 1.0, size=2)
        draw.ellipse([*(centre - half_axes), *(centre + half_axes)], fill=class_id)
    else:
        num_corners = rng.integers(3, 8)
        angles = (np.arange(num_corners) + rng.uniform(-0.3, 0.3, size=num_corners)) * 2 * np.pi / num_corners
        radii = radius * rng.uniform(0.6, 1.0, size=num_corners)
        points = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
        draw.polygon([tuple(point) for point in points], fill=class_id)


def _render_example(rng: np.random.Generator, size: int, guaranteed_class: int) -> tuple[Image.Image, Image.Image]:
    """One (image, label map) pair; the shape of `guaranteed_class` is drawn last, so it is always visible."""
    label_map = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(label_map)
    num_foreground = len(DEMO_LABELS) - 1
    shape_classes = [*rng.integers(1, num_foreground + 1, size=rng.integers(3, 6)), guaranteed_class]
    for class_id in shape_classes:
        _draw_random_shape(draw, rng, size, int(class_id))
    labels = np.asarray(label_map)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.zeros((size, size, 3), dtype=np.float32)
    for class_id, texture in enumerate(_TEXTURES):
        inside = labels == class_id
        if inside.any():
            weights = texture(rng, ys, xs)[inside].astype(np.float32)[:, None]
            dark, light = _CLASS_COLOURS[class_id] + rng.uniform(-20, 20)  # shade varies per image
            image[inside] = dark + weights * (light - dark)
    image += rng.normal(0, 6, size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB"), label_map


def _generate_split(split: str, num_examples: int, image_size: int, seed: int) -> datasets.Dataset:
    images, label_maps = [], []
    for index in range(num_examples):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
        image, label_map = _render_example(rng, image_size, guaranteed_class=index % (len(DEMO_LABELS) - 1) + 1)
        images.append(image)
        label_maps.append(label_map)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": label_maps}, features=features, split=split)


def load_demo_dataset(
    num_train: int = 160, num_validation: int = 40, image_size: int = 128, seed: int = 0
) -> datasets.DatasetDict:
    """The demo dataset: "train" and "validation" splits with columns "image" (RGB) and "label" (mode "L").

    Label values are indices into `DEMO_LABELS`. Example `i` of a split depends only on `(seed, split, i)` and
    `image_size`, so a larger split extends a smaller one; train and validation never share an image. Every split
    of at least `len(DEMO_LABELS) - 1` examples contains every class.
    """
    if num_train < 1 or num_validation < 1:
        raise ValueError(f"num_train and num_validation must be at least 1, got {num_train} and {num_validation}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE} pixels, got {image_size}")
    return datasets.DatasetDict(
        {
            "train": _generate_split("train", num_train, image_size, seed),
            "validation": _generate_split("validation", num_validation, image_size, seed),
        }
    )
