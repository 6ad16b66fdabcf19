"""Evaluation-time inference as in the original SeMask code (mmsegmentation 0.x `EncoderDecoder`, detectron2).

Works with any model whose output has `logits` (B, C, h, w), e.g. every `AutoModelForSemanticSegmentation`, and with
mask classification models (MaskFormer, Mask2Former and their SeMask variants), whose per-class scores are the
original semantic inference (`semantic_inference`). Per-class scores (`class_scores`) are:

- whole: the model's scores at the network input, resized (bilinear) to the image's original size;
- slide: overlapping crops (`crop_size`, `stride`), each crop's input-size scores summed and divided by the
  number of crops covering each pixel, then resized to the original size;
- multi-scale + flip: the processor's scale times each ratio (`MS_FLIP_SCALES` for the paper's "ms+flip"),
  optionally with the horizontally flipped image; averaged at the original size as probabilities: the softmax
  of logits, or the mask classification scores as they are (as detectron2's test-time augmentation averages them).

Logits are resized a few classes at a time, so memory holds one (C, H, W) map at the original size plus small
per-chunk buffers, not a full-resolution copy per scale.
"""

import math
import os
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image
from transformers import Mask2FormerConfig, MaskFormerConfig
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import (
    ChannelDimension,
    ImageInput,
    get_image_size,
    infer_channel_dimension_format,
    is_pil_image,
)

MS_FLIP_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
MODES = ("whole", "slide")
CLASS_CHUNK = 16
# Mask classification models predict masks at 1/4 of their (padded) input.
MASK_STRIDE = 4


def resize_logits(logits: torch.Tensor, sizes: list[tuple[int, int]], align_corners: bool = False) -> torch.Tensor:
    """Resize (B, C, h, w) logits bilinearly through each size in `sizes` in turn, `CLASS_CHUNK` classes at a time."""
    chunks = []
    for chunk in logits.split(CLASS_CHUNK, dim=1):
        for size in sizes:
            if tuple(chunk.shape[-2:]) != tuple(size):
                chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=align_corners)
        chunks.append(chunk)
    return torch.cat(chunks, dim=1)


def semantic_inference(
    class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Mask2Former's semantic inference: float32 scores (B, C, H, W) for the input's top-left `size`.

    The masks (B, Q, h, w), which cover the (padded) input at 1/4 resolution, are upsampled bilinearly to it and
    cropped to `size`; each class scores `sum_q softmax(class logits)[q, c] * sigmoid(mask)[q]`, without the
    no-object class (the original `semantic_inference`).
    """
    height, width = masks_queries_logits.shape[-2:]
    masks = F.interpolate(
        masks_queries_logits.float(), size=(height * MASK_STRIDE, width * MASK_STRIDE), mode="bilinear"
    )
    masks = masks[..., : size[0], : size[1]].sigmoid()
    probabilities = class_queries_logits.float().softmax(dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probabilities, masks)


def class_scores(outputs, size: tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Float32 per-class scores (B, C, H, W) at the network input's `size` from a segmentation model's output.

    Outputs with `masks_queries_logits` (mask classification): `semantic_inference`; otherwise the `logits`, resized
    bilinearly.
    """
    if getattr(outputs, "masks_queries_logits", None) is not None:
        return semantic_inference(outputs.class_queries_logits, outputs.masks_queries_logits, size)
    return resize_logits(outputs.logits.float(), [size], align_corners)


def is_mask_classification(model: torch.nn.Module) -> bool:
    """Whether `model` segments by mask classification: its scores are averaged as they are, without a softmax."""
    return isinstance(getattr(model, "config", None), (Mask2FormerConfig, MaskFormerConfig))


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    *,
    mode: str = "whole",
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    output_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Float32 class scores (B, C, H, W) of `model` for `pixel_values` (B, 3, H, W), resized to `output_size` if given.

    The scores are logits, or for mask classification models the semantic inference (`class_scores`).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown inference mode {mode!r}; expected one of {MODES}.")
    align_corners = getattr(model.config, "align_corners", False)
    input_size = tuple(pixel_values.shape[-2:])
    if mode == "slide":
        logits = sliding_window_logits(model, pixel_values, *crop_and_stride(crop_size, stride), align_corners)
        return resize_logits(logits, [output_size or input_size], align_corners)
    scores = class_scores(model(pixel_values=pixel_values), input_size, align_corners)
    return resize_logits(scores, [output_size or input_size], align_corners)


def crop_and_stride(
    crop_size: int | tuple[int, int] | None, stride: int | tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(crop, stride) as (height, width) pairs; the stride defaults to two thirds of the crop (mmseg's 512 -> 341).

    Both must be positive ints, and the stride at most the crop on each side (else pixels between crops get no
    prediction).
    """
    if crop_size is None:
        raise ValueError("Sliding-window inference needs `crop_size` (e.g. the training crop, 512 or (512, 512)).")
    crop = positive_pair(crop_size, "crop_size")
    steps = tuple(side * 2 // 3 for side in crop) if stride is None else positive_pair(stride, "stride")
    if min(steps) <= 0 or steps[0] > crop[0] or steps[1] > crop[1]:
        raise ValueError(f"`stride` {steps} must be between 1 and `crop_size` {crop} on each side.")
    return crop, steps


def positive_pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """`value` (an int or a (height, width) pair) as a pair of positive ints; a ValueError naming `name` if not."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, Integral) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"`{name}` must be positive: an int or a (height, width) pair of ints > 0, got {value!r}.")
    return int(pair[0]), int(pair[1])


def check_scales(scales: tuple[float, ...]) -> None:
    """`scales` must hold at least one ratio, each a finite number > 0."""
    if not len(scales):
        raise ValueError("`scales` must hold at least one ratio, e.g. (1.0,) or semask.inference.MS_FLIP_SCALES.")
    for ratio in scales:
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"Every scale must be a finite number > 0, got {ratio!r} in `scales` {tuple(scales)}.")


def sliding_window_logits(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    crop: tuple[int, int],
    stride: tuple[int, int],
    align_corners: bool = False,
) -> torch.Tensor:
    """mmseg's `slide_inference`: crops anchored to the image's far edge, overlapping logits averaged."""
    height, width = pixel_values.shape[-2:]
    rows = max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    columns = max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    logits, counts = None, pixel_values.new_zeros((1, 1, height, width), dtype=torch.float32)
    for row in range(rows):
        for column in range(columns):
            bottom, right = min(row * stride[0] + crop[0], height), min(column * stride[1] + crop[1], width)
            top, left = max(bottom - crop[0], 0), max(right - crop[1], 0)
            window = pixel_values[..., top:bottom, left:right]
            window_logits = class_scores(model(pixel_values=window), window.shape[-2:], align_corners)
            if logits is None:
                logits = window_logits.new_zeros((*window_logits.shape[:2], height, width))
            logits[..., top:bottom, left:right] += window_logits
            counts[..., top:bottom, left:right] += 1
    return logits / counts


def original_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) of a PIL image (upright, see `upright_size`), an (H, W[, C]) / (C, H, W) array or tensor."""
    if is_pil_image(image):
        return upright_size(image)
    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    if array.ndim == 2:
        return array.shape
    return get_image_size(array, channel_format(array))


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of a PIL image once turned upright by its EXIF orientation (5-8 swap the sides), as the
    image processor turns it."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (image.width, image.height) if orientation in (5, 6, 7, 8) else (image.height, image.width)


def channel_format(image: np.ndarray) -> ChannelDimension:
    """Where a 3-d image array keeps its channels: as transformers infers it (channels first when the first dimension
    can be channels: 1, 3 or 4), except (1, W, 3 or 4), read as one row of RGB(A) pixels (H, W, C), not as a
    grayscale (1, H, W) image 3 or 4 pixels wide. Pass `input_data_format` to the processor to read it otherwise."""
    if image.shape[0] == 1 and image.shape[-1] in (3, 4):
        return ChannelDimension.LAST
    return infer_channel_dimension_format(image, num_channels=(1, 3, 4))


def scaled_size(processor: BaseImageProcessor, ratio: float) -> dict[str, int]:
    """The processor's target size times `ratio`, truncated as mmseg's `MultiScaleFlipAug` does (each side >= 1)."""
    size = {key: int(value * ratio) for key, value in dict(processor.size).items()}
    if min(size.values()) < 1:
        raise ValueError(
            f"Scale {ratio} shrinks the processor's size {dict(processor.size)} to {size}: each side must stay >= 1."
        )
    return size


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    processor: BaseImageProcessor,
    image: ImageInput,
    *,
    mode: str = "whole",
    crop_size: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities (C, H, W) for one image at its original size; `argmax(0)` gives the label map.

    `scales=MS_FLIP_SCALES, flip=True` is the paper's "ms+flip" protocol; the defaults are single-scale whole
    inference. The model is used as it is (call `model.eval()` first). For mask classification models the
    "probabilities" are the semantic inference scores, which do not sum to 1 over the classes.
    """
    check_scales(scales)
    if mode == "slide":
        crop_and_stride(crop_size, stride)  # invalid settings fail before any image is processed
    if isinstance(image, (str, os.PathLike)):  # a file: read as every entry point reads it (16-bit scaled, upright)
        from .image_processing_semask import load_image  # here: image_processing_semask imports this module

        image = load_image(image)
    height, width = original_size(image)
    parameter = next(model.parameters())
    mask_classification = is_mask_classification(model)
    probabilities = None
    for ratio in scales:
        inputs = processor(image, size=scaled_size(processor, ratio), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(parameter.device, parameter.dtype)
        for flipped in (False, True) if flip else (False,):
            batch = pixel_values.flip(-1) if flipped else pixel_values
            scores = predict_logits(
                model, batch, mode=mode, crop_size=crop_size, stride=stride, output_size=(height, width)
            )
            scale_probabilities = (scores if mask_classification else scores.softmax(dim=1))[0]
            scale_probabilities = scale_probabilities.flip(-1) if flipped else scale_probabilities
            probabilities = scale_probabilities if probabilities is None else probabilities + scale_probabilities
    return probabilities / (len(scales) * (2 if flip else 1))
