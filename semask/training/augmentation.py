"""The original training augmentation on torchvision (mmseg's pipeline) and the dataset transforms and collator."""

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..data import DatasetValidationError, decode_image, label_value_problem, source_name
from ..image_processing_semask import IGNORE_INDEX, SemaskImageProcessor, image_to_array, rescaled_size
from .arguments import RecipeArguments


class RandomRescale(v2.Transform):
    """mmseg's `Resize(img_scale=(longest, shortest), ratio_range=..., keep_ratio=True)`.

    A ratio is drawn uniformly from `ratio_range`, or from `ratios` when given (the original's list form), the scale
    becomes `(int(longest * ratio), int(shortest * ratio))` and the image is resized, keeping its aspect ratio, to
    the largest size fitting that scale (mmcv's rounding). Bilinear without antialiasing for images, as OpenCV does.
    """

    def __init__(
        self,
        longest_edge: int,
        shortest_edge: int,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        ratios: list[float] | None = None,
    ):
        super().__init__()
        self.longest_edge, self.shortest_edge = longest_edge, shortest_edge
        self.ratio_range = ratio_range
        self.ratios = ratios

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if self.ratios:
            ratio = self.ratios[int(torch.randint(len(self.ratios), ()))]
        else:
            low, high = self.ratio_range
            ratio = low + float(torch.rand(())) * (high - low)
        longest, shortest = int(self.longest_edge * ratio), int(self.shortest_edge * ratio)
        return {"size": list(rescaled_size(*v2.query_size(flat_inputs), shortest, longest))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            TF.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=False
        )


class CatMaxRatioRandomCrop(v2.Transform):
    """mmseg's `RandomCrop(crop_size, cat_max_ratio)`: a random crop of at most `size` (height, width).

    With `cat_max_ratio < 1`, a crop is re-drawn (up to `max_attempts` times, then the last draw is kept) while its
    label map holds fewer than two classes or one class covers `cat_max_ratio` or more of its non-ignored pixels.
    """

    def __init__(
        self, size: tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX, max_attempts=10
    ):
        super().__init__()
        self.size = tuple(size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_attempts = max_attempts

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        masks = [inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.Mask)]
        box = self._random_box(height, width)
        if self.cat_max_ratio < 1 and masks:
            for _ in range(self.max_attempts):
                if self._is_balanced(masks[0], box):
                    break
                box = self._random_box(height, width)
        return box

    def _random_box(self, height: int, width: int) -> dict[str, int]:
        crop_height, crop_width = self.size
        top = int(torch.randint(max(height - crop_height, 0) + 1, ()))
        left = int(torch.randint(max(width - crop_width, 0) + 1, ()))
        return {"top": top, "left": left, "height": min(crop_height, height), "width": min(crop_width, width)}

    def _is_balanced(self, mask: torch.Tensor, box: dict[str, int]) -> bool:
        crop = mask[..., box["top"] : box["top"] + box["height"], box["left"] : box["left"] + box["width"]]
        _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
        return counts.numel() > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.crop, inpt, **params)


class PadToSize(v2.Transform):
    """Pad the bottom and right to at least `size` (height, width), with `image_fill` (one value or one per channel)
    and `mask_fill` for masks."""

    def __init__(self, size: tuple[int, int], image_fill: float | list[float] = 0.0, mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size = tuple(size)
        self.image_fill, self.mask_fill = image_fill, mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return self._call_kernel(TF.pad, inpt, padding=params["padding"], fill=fill)


class PhotometricDistortion(v2.RandomPhotometricDistort):
    """torchvision's `RandomPhotometricDistort` set up like mmseg's `PhotoMetricDistortion`.

    Shared: each of brightness, contrast, saturation and hue is applied with probability 0.5, in that order, with
    contrast first or last at random; contrast and saturation factors in [0.5, 1.5]; hue shifts up to 18/180 of the
    hue circle (mmseg's `hue_delta=18` on OpenCV's 0-180 scale). Differences: brightness is a factor in
    [0.875, 1.125] (mmseg adds a value in [-32, 32]); contrast blends with the mean grey level and saturation with
    the grey image (mmseg scales the pixel values, resp. the HSV saturation); results stay in floating point
    between the steps (mmseg rounds to uint8 after each). The channel permutation of torchvision's transform is
    never applied: mmseg has none.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(hue=(-18 / 180, 18 / 180), p=p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {**super().make_params(flat_inputs), "channel_permutation": None}


def normalization_constants(processor: SemaskImageProcessor) -> tuple[list[float], list[float]]:
    """The processor's rescale + normalisation as one mean / std on the 0-255 pixel scale."""
    scale = processor.rescale_factor if processor.do_rescale else 1.0
    if not processor.do_normalize:
        return [0.0] * 3, [1.0 / scale] * 3
    mean, std = np.broadcast_to(processor.image_mean, 3), np.broadcast_to(processor.image_std, 3)
    return (mean / scale).tolist(), (std / scale).tolist()


def build_train_augmentation(processor: SemaskImageProcessor, recipe: RecipeArguments) -> v2.Compose:
    """The training pipeline for a `(tv_tensors.Image uint8, tv_tensors.Mask)` pair (see `semask.training`)."""
    steps = []
    if recipe.random_rescale:
        steps.append(
            RandomRescale(
                processor.size["longest_edge"],
                processor.size["shortest_edge"],
                tuple(recipe.rescale_ratio_range),
                recipe.rescale_ratios,
            )
        )
    steps.append(CatMaxRatioRandomCrop(recipe.crop_size, recipe.cat_max_ratio))
    if recipe.flip_probability > 0:
        steps.append(v2.RandomHorizontalFlip(recipe.flip_probability))
    if recipe.photometric_distortion:
        steps.append(PhotometricDistortion())
    mean, std = normalization_constants(processor)
    # Padding with a pixel value before normalising equals padding with its normalised value afterwards.
    image_fill = 0.0
    if recipe.pad_pixel_value is not None:
        image_fill = ((recipe.pad_pixel_value - np.array(mean)) / np.array(std)).tolist()
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}),
        v2.Normalize(mean, std),
        PadToSize(recipe.crop_size, image_fill=image_fill),
    ]
    return v2.Compose(steps)


def label_map(
    label: Image.Image | np.ndarray,
    processor: SemaskImageProcessor,
    num_labels: int | None = None,
    name: str = "a label map",
) -> np.ndarray:
    """A label map as an int64 array, reduced (0 -> 255, k -> k - 1) when the processor reduces labels.

    A `DatasetValidationError` naming `name` when it is not single-channel (H, W) or, given `num_labels`, when it has
    values outside the label set (as `data.validate_segmentation_data` checks on its sample).
    """
    try:
        array = (image_to_array(label) if isinstance(label, Image.Image) else np.asarray(label)).astype(np.int64)
    except ValueError as error:  # a 32-bit integer label map beyond 16 bits
        raise DatasetValidationError(f"{name}: {error}") from error
    if array.ndim != 2:
        raise DatasetValidationError(
            f"{name} has shape {array.shape}: label maps must be single-channel (H, W) class ids; convert "
            "colour-coded annotations to class ids first."
        )
    if num_labels is not None:
        problem = label_value_problem(np.unique(array), num_labels, processor.do_reduce_labels, name)
        if problem:
            raise DatasetValidationError(problem)
    return processor.reduce_label(array) if processor.do_reduce_labels else array


def decoded_pairs(
    batch: dict[str, list], split: str, processor: SemaskImageProcessor, num_labels: int | None
) -> Iterator[tuple[Image.Image, np.ndarray]]:
    """The (image, label map) pairs of a `set_transform` batch, decoded here when the dataset is `data.undecoded`
    (so a file that cannot be decoded is named): images upright RGB (`upright_rgb`: 16-bit scaled, not clipped),
    label maps upright too (`data.decode_image`) and checked (`label_map`: reduced as `processor` does)."""
    for image, label in zip(batch["image"], batch["label"]):
        name = source_name(label, f"a {split} label map")
        image = decode_image(image, f"a {split} image", rgb=True)
        yield image, label_map(decode_image(label, name), processor, num_labels, name)


class TrainTransform:
    """`datasets.Dataset.set_transform` function: "image"/"label" batches to augmented "pixel_values"/"labels".

    Give it `data.undecoded(dataset)` so that an undecodable file raises a `DatasetValidationError` naming it, and
    `num_labels` so that a label map with values outside the label set does too."""

    def __init__(
        self,
        processor: SemaskImageProcessor,
        recipe: RecipeArguments,
        split: str = "train",
        num_labels: int | None = None,
    ):
        self.augmentation = build_train_augmentation(processor, recipe)
        self.processor = processor
        self.split = split
        self.num_labels = num_labels

    def __call__(self, batch: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        pixel_values, labels = [], []
        for image, label in decoded_pairs(batch, self.split, self.processor, self.num_labels):
            image = tv_tensors.Image(TF.pil_to_tensor(image))
            mask = tv_tensors.Mask(torch.from_numpy(label))
            image, mask = self.augmentation(image, mask)
            pixel_values.append(image.as_subclass(torch.Tensor))
            labels.append(mask.as_subclass(torch.Tensor))
        return {"pixel_values": pixel_values, "labels": labels}


class EvalTransform:
    """`set_transform` function for evaluation: the image processor's test pipeline, one image at a time (give it
    `data.undecoded(dataset)` and `num_labels`, as `TrainTransform`)."""

    def __init__(self, processor: SemaskImageProcessor, split: str = "validation", num_labels: int | None = None):
        self.processor = processor
        self.split = split
        self.num_labels = num_labels

    def __call__(self, batch: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        pixel_values, labels = [], []
        for image, label in decoded_pairs(batch, self.split, self.processor, self.num_labels):
            # the label map is reduced already (`label_map`); the processor resizes it (nearest) with the image
            features = self.processor(image, segmentation_maps=label, do_reduce_labels=False, return_tensors="pt")
            pixel_values.append(features["pixel_values"][0])
            labels.append(features["labels"][0])
        return {"pixel_values": pixel_values, "labels": labels}


def pad_collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples, padding bottom/right to the largest one: images with 0, labels with 255 (ignored)."""
    height = max(feature["pixel_values"].shape[-2] for feature in features)
    width = max(feature["pixel_values"].shape[-1] for feature in features)

    def padded(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]), value=value)

    return {
        "pixel_values": torch.stack([padded(feature["pixel_values"], 0) for feature in features]),
        "labels": torch.stack([padded(feature["labels"], IGNORE_INDEX) for feature in features]),
    }
