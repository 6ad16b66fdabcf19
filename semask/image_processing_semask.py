"""Image processor reproducing the original SeMask (mmsegmentation 0.x) test pipeline, without mmcv or OpenCV.

Images are resized keeping their aspect ratio with mmcv's `imrescale` rule (fit `longest_edge` x `shortest_edge`,
`int(side * scale + 0.5)`), with OpenCV-style bilinear interpolation (no antialiasing, uint8 results rounded),
normalised with the ImageNet mean/std on the 0-255 scale, and optionally padded. Segmentation maps are resized
with nearest-neighbour interpolation only, so their values are never interpolated.
"""

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, ImageInput, PILImageResampling, SizeDict, is_pil_image
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging

from .inference import MASK_STRIDE, channel_format, semantic_inference
from .presets import DATASET_PROCESSING

try:  # OpenCV (what mmcv resizes with) makes the resize bit-exact; PyTorch is the fallback.
    import cv2
except ImportError:
    cv2 = None

logger = logging.get_logger(__name__)

IGNORE_INDEX = 255
# mmsegmentation's `img_norm_cfg` (ImageNet statistics on the 0-255 scale): identical to the original pipeline.
MMSEG_IMAGE_MEAN = (123.675, 116.28, 103.53)
MMSEG_IMAGE_STD = (58.395, 57.12, 57.375)
INTERPOLATION_MODES = {
    PILImageResampling.NEAREST: "nearest",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}
RESIZE_LIBRARIES = ("opencv", "pil")
CV2_MODES = {PILImageResampling.NEAREST: 0, PILImageResampling.BILINEAR: 1, PILImageResampling.BICUBIC: 2}


class SemaskImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Map label 0 (ADE20K's and COCO-Stuff's "other") to 255 (ignored) and every other label `k` to `k - 1`.
    size_divisor (`int`, *optional*, defaults to `self.size_divisor`):
        Pad the bottom and right of every image (with 0 after normalisation) and label map (with 255) to a
        multiple of this number.
    resize_library (`str`, *optional*, defaults to `self.resize_library`):
        Whose resizing to reproduce: `"opencv"` (mmsegmentation/mmcv: SeMask-FPN) or `"pil"` (detectron2:
        SeMask-Mask2Former, which resizes uint8 images with PIL, antialiased, and label maps with PIL's nearest).
    """

    do_reduce_labels: bool
    size_divisor: int | None
    resize_library: str


def rescaled_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """mmcv's keep-ratio rule: the largest scale fitting `longest_edge` x `shortest_edge`, rounded half up."""
    scale = min(longest_edge / max(height, width), shortest_edge / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def output_size(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    """The resized (height, width) for `size`: keep-ratio fit (shortest/longest edge) or a fixed height x width."""
    if size.shortest_edge and size.longest_edge:
        resized = rescaled_size(height, width, size.shortest_edge, size.longest_edge)
        if min(resized) < 1:
            raise ValueError(
                f"Resizing {height}x{width} (HxW) to fit {size.longest_edge}x{size.shortest_edge} gives "
                f"{resized[0]}x{resized[1]}: each side must stay >= 1 pixel (mmcv's rule int(side * scale + 0.5)); "
                "crop or pad the image to a less extreme aspect ratio, or pass size={'height': H, 'width': W}."
            )
        return resized
    if size.height and size.width:
        return size.height, size.width
    raise ValueError(
        f"`size` must be {{'shortest_edge': S, 'longest_edge': L}} (keep the aspect ratio, fit L x S) or "
        f"{{'height': H, 'width': W}} (fixed size); got {dict(size)}."
    )


def torch_resize(image: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize in floating point without antialiasing (OpenCV's bilinear within one grey level; "nearest" is OpenCV's
    nearest, "nearest-exact" PIL's)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    options = {} if mode.startswith("nearest") else {"align_corners": False}
    resized = F.interpolate(tensor, size=size, mode=mode, **options)[0].numpy()
    if image.dtype == np.uint8:
        return np.clip(np.floor(resized + 0.5), 0, 255).astype(np.uint8)
    return resized.astype(image.dtype)


def image_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image as an (H, W) or (H, W, C) array, keeping 16-bit grayscale values (32-bit integer "I" images
    must hold 0..65535, else a ValueError) and 32-bit float "F" ones as float32."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
            raise ValueError(
                f"A 32-bit integer image (mode I) with values {array.min()}..{array.max()}: semask reads integer "
                "images of up to 16 bits (0..65535); convert it to 8 or 16 bits first."
            )
        return array.astype(np.uint16)
    return np.asarray(image)


def sixteen_to_eight_bits(array: np.ndarray) -> np.ndarray:
    """16-bit values scaled to 8 bits, `round(x * 255 / 65535)`: the one rule every entry point uses."""
    return np.round(array.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)


def upright(image: Image.Image) -> Image.Image:
    """`image` turned upright by its EXIF orientation; 32-bit float images (mode F), whose pixel scale is unknown
    and which PIL's `convert` would clip, are refused with a ValueError."""
    if image.mode == "F":
        raise ValueError(
            "A 32-bit float image (mode F) has no known pixel scale: save it with 8 or 16 bits, or pass its pixels "
            "to the processor as a float array on the 0-255 scale (np.asarray(image))."
        )
    return ImageOps.exif_transpose(image)


def upright_rgb(image: Image.Image) -> Image.Image:
    """An image as every entry point reads it: turned upright by its EXIF orientation, 16-bit grayscale scaled to
    8 bits (not clipped, as `convert("RGB")` would), then RGB (CMYK, palette, alpha: PIL's conversion). 32-bit float
    images (mode F) are refused (ValueError): their scale is unknown, and `convert` would clip them."""
    image = upright(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        image = Image.fromarray(sixteen_to_eight_bits(image_to_array(image)))
    return image.convert("RGB")


# File suffixes of the images that the command line and the training data read from folders.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# What PIL raises for files it cannot decode: UnidentifiedImageError (an OSError), truncated or 0-byte files, bad
# headers, and images beyond `Image.MAX_IMAGE_PIXELS` (its decompression-bomb guard).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(path: str | Path) -> Image.Image:
    """Decode the image file at `path` fully (as `upright_rgb`); a ValueError naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return upright_rgb(image)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise ValueError(f"Cannot read image {path}: {error}") from error


def as_rgb_uint_or_float(image: np.ndarray) -> np.ndarray:
    """A channels-first image as 3-channel uint8 or float32 on the 0-255 scale (16-bit images scaled to 8 bits)."""
    channels = image.shape[0]
    if channels == 1:
        image = np.repeat(image, 3, axis=0)
    elif channels == 4:
        image = image[:3]  # alpha dropped, as OpenCV's colour loading in the original does
    elif channels != 3:
        raise ValueError(f"Images must have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got {channels}.")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError(
            f"The image has {image.size - np.count_nonzero(np.isfinite(image))} non-finite (NaN or infinite) values; "
            "pass finite float pixels on the 0-255 scale, or uint8/uint16 images."
        )
    if image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating):
        return image
    if image.dtype == np.uint16:
        return sixteen_to_eight_bits(image)
    raise ValueError(
        f"Unsupported image dtype {image.dtype}: pass uint8 or uint16 images, or float images on the 0-255 scale."
    )


def warn_about_pixel_scale(image: np.ndarray, rescale_factor: float | None) -> None:
    """Warn (once) when an image, after rescaling by `rescale_factor` (None: no rescaling), is not on the 0-255 scale
    that the normalisation's statistics expect: all in [0, 1] (nearly black once normalised), or outside [0, 255]."""
    if (image.dtype == np.uint8 and rescale_factor is None) or not image.size:
        return
    scale = 1.0 if rescale_factor is None else rescale_factor
    low, high = float(image.min()) * scale, float(image.max()) * scale
    if 0 <= low and 0 < high <= 1:
        logger.warning_once(
            "An image has all its values in [0, 1] (as torchvision's ToTensor gives) after rescaling "
            f"(do_rescale={rescale_factor is not None}) but this processor normalises on the 0-255 scale, so it would "
            "be nearly black: for float images in [0, 1] pass `image * 255`, or `do_rescale=True, "
            "rescale_factor=255.0` (rescaling multiplies by `rescale_factor`); for 0-255 pixels, `do_rescale=False`."
        )
    elif low < 0 or high > 255:
        logger.warning_once(
            "An image has values outside [0, 255] after rescaling, but this processor normalises pixels on the "
            "0-255 scale: pass pixels in [0, 255] (or `do_normalize=False` for images normalised already)."
        )


def as_label_map(label_map: np.ndarray) -> np.ndarray:
    """A channels-first (1, H, W) integer label map, checked."""
    if label_map.shape[0] != 1:
        raise ValueError(
            f"Segmentation maps must be single-channel class-id images (H, W), got {label_map.shape[0]} channels; "
            "convert colour-coded annotations to class ids first."
        )
    if not (np.issubdtype(label_map.dtype, np.integer) or np.issubdtype(label_map.dtype, np.bool_)):
        if not np.all(label_map == np.round(label_map)):
            raise ValueError(
                f"Segmentation maps must hold integer class ids, got non-integer {label_map.dtype} values."
            )
    return label_map.astype(np.int64)


class SemaskImageProcessor(SegformerImageProcessorPil):
    r"""
    Prepares images (and segmentation maps) for SeMask as the original test pipeline does.

    Defaults are the ADE20K pipeline: keep-ratio resize to fit 2048 x 512, ImageNet normalisation, label reduction.
    `SemaskImageProcessor.from_dataset("cityscapes")` gives the Cityscapes one (2048 x 1024, no reduction).
    `size={"height": H, "width": W}` resizes to a fixed size instead. Returns `pixel_values` (B, 3, H, W) and, with
    segmentation maps, `labels` (B, H, W) int64 where 255 is ignored.

    Images are PIL images, (H, W[, C]) / (C, H, W) arrays or tensors with 1, 3 or 4 channels: uint8, uint16 (scaled to
    8 bits) or float on the 0-255 scale (float images in [0, 1] need `do_rescale=True, rescale_factor=255.0`), finite,
    at least 1x1. Without `input_data_format`, an array's channels are first when its first dimension is 1, 3 or 4,
    except (1, W, 3 or 4), which is one row of RGB(A) pixels (`semask.inference.channel_format`).
    """

    valid_kwargs = SemaskImageProcessorKwargs
    model_input_names = ["pixel_values"]
    size = {"shortest_edge": 512, "longest_edge": 2048}
    default_to_square = False
    resample = PILImageResampling.BILINEAR
    do_convert_rgb = True
    do_rescale = False
    rescale_factor = 1 / 255
    image_mean = MMSEG_IMAGE_MEAN
    image_std = MMSEG_IMAGE_STD
    do_reduce_labels = True
    do_pad = False
    size_divisor = None
    resize_library = "opencv"

    def __init__(self, **kwargs: Unpack[SemaskImageProcessorKwargs]):
        super().__init__(**kwargs)

    @classmethod
    def from_dataset(cls, dataset: str, **kwargs) -> "SemaskImageProcessor":
        """The original test pipeline of `dataset` ("ade20k", "cityscapes" or "coco-stuff10k"); kwargs override it."""
        if dataset not in DATASET_PROCESSING:
            raise ValueError(f"Unknown dataset {dataset!r}; expected one of {sorted(DATASET_PROCESSING)}.")
        return cls(**{**DATASET_PROCESSING[dataset], **kwargs})

    def fetch_images(self, image_url_or_urls: str | os.PathLike | list) -> ImageInput:
        """As transformers' (URLs, base64 strings), except that image files are read by `load_image`, the rule every
        entry point shares (16-bit images scaled, not clipped; a ValueError naming a file that cannot be read)."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            path = os.fspath(image_url_or_urls)
            if os.path.isfile(path):
                return load_image(path)
            if isinstance(image_url_or_urls, os.PathLike) or Path(path).suffix.lower() in IMAGE_SUFFIXES:
                raise ValueError(f"Image file not found: {path}")
        return super().fetch_images(image_url_or_urls)

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> ImageInput:
        """Accept (H, W) grayscale arrays and tensors as images too (read as H x W whatever their sides, see
        `process_image`); refuse arrays of other ranks, naming their shape."""
        images = self.fetch_images(images)
        kind, ranks, form = (
            ("Images", (2, 3, 4), "(H, W, C), (C, H, W) or (H, W)")
            if expected_ndims == 3
            else ("Segmentation maps", (2, 3), "(H, W)")
        )
        items = _as_list(images)
        for item in items:
            if getattr(item, "ndim", None) is not None and item.ndim not in ranks:
                raise ValueError(f"{kind} must be {form} arrays or a batch of them, got shape {tuple(item.shape)}.")
        if expected_ndims == 3 and any(getattr(item, "ndim", None) == 2 for item in items):
            return [image for item in items for image in (list(item) if getattr(item, "ndim", None) == 4 else [item])]
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One image (RGB, 3 channels) or, with `do_convert_rgb=False`, one label map, channels first."""
        if is_pil_image(image):
            if do_convert_rgb:
                image = upright(image)
            if do_convert_rgb and image.mode not in ("L", "RGB", "RGBA") and not image.mode.startswith("I"):
                image = image.convert("RGB")
            image = image_to_array(image)
            input_data_format = ChannelDimension.LAST  # np.asarray(PIL image) is (H, W[, C])
        elif isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if image.ndim == 2:  # grayscale (or a label map): (1, H, W), never a guess at where channels are
            image, input_data_format = image[None], ChannelDimension.FIRST
        if do_convert_rgb and image.ndim == 3 and not {image.shape[0], image.shape[-1]} & {1, 3, 4}:
            raise ValueError(f"Images must have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, got shape {image.shape}.")
        if input_data_format is None and image.ndim == 3:
            input_data_format = channel_format(image)
        array = super().process_image(image, do_convert_rgb=False, input_data_format=input_data_format)
        if 0 in array.shape[-2:]:
            raise ValueError(f"Empty image ({array.shape[-2]}x{array.shape[-1]}, HxW): each side must be >= 1 pixel.")
        return as_rgb_uint_or_float(array) if do_convert_rgb else as_label_map(array)

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: PILImageResampling | None = None,
        resize_library: str | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Resize a (C, H, W) array as the original library does (see `resize_library`).

        OpenCV is used when installed (bit-exact with mmcv), else PyTorch; PIL for uint8 images in "pil" mode.
        """
        resample = resample if resample is not None else self.resample
        library = resize_library or self.resize_library
        if resample not in INTERPOLATION_MODES:
            raise ValueError(f"Unsupported resample {resample!r}; use one of {list(INTERPOLATION_MODES)}.")
        if library not in RESIZE_LIBRARIES:
            raise ValueError(f"Unknown resize_library {library!r}; expected one of {RESIZE_LIBRARIES}.")
        height, width = output_size(*image.shape[-2:], size)
        if (height, width) == image.shape[-2:]:
            return image
        if library == "pil":
            if image.dtype == np.uint8 and image.shape[0] in (1, 3, 4):
                channels_last = image.transpose(1, 2, 0)
                picture = Image.fromarray(channels_last[..., 0] if image.shape[0] == 1 else channels_last)
                return (
                    np.asarray(picture.resize((width, height), resample)).reshape(height, width, -1).transpose(2, 0, 1)
                )
            mode = "nearest-exact" if resample == PILImageResampling.NEAREST else INTERPOLATION_MODES[resample]
            return torch_resize(image, (height, width), mode)
        if cv2 is not None and image.dtype in (np.uint8, np.float32) and image.shape[0] <= 4:
            resized = cv2.resize(image.transpose(1, 2, 0), (width, height), interpolation=CV2_MODES[resample])
            return resized.reshape(height, width, -1).transpose(2, 0, 1)
        return torch_resize(image, (height, width), INTERPOLATION_MODES[resample])

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        images = self._prepare_image_like_inputs(images, do_convert_rgb=True, input_data_format=input_data_format)
        if not images:
            raise ValueError("No images given: pass an image (PIL image, array, tensor or file) or a list of them.")
        data = {"pixel_values": self._preprocess(images, **{**kwargs, "do_reduce_labels": False})}
        if segmentation_maps is not None:
            maps = self._prepare_image_like_inputs(
                segmentation_maps, expected_ndims=2, do_convert_rgb=False, input_data_format=ChannelDimension.FIRST
            )
            check_pairs(images, maps)
            map_kwargs = {**kwargs, "do_rescale": False, "do_normalize": False, "resample": PILImageResampling.NEAREST}
            data["labels"] = [label[0] for label in self._preprocess(maps, pad_value=IGNORE_INDEX, **map_kwargs)]
        if return_tensors is not None and len({array.shape for array in data["pixel_values"]}) > 1:
            sizes = sorted({array.shape[-2:] for array in data["pixel_values"]})
            raise ValueError(
                f"The images have different sizes after resizing ({sizes}) and cannot form one tensor: pass "
                "`do_pad=True` to pad them to a common size, or process them one at a time."
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_reduce_labels: bool,
        resample: PILImageResampling | None,
        do_resize: bool,
        do_rescale: bool,
        do_normalize: bool,
        size: SizeDict,
        rescale_factor: float,
        image_mean: float | list[float],
        image_std: float | list[float],
        do_pad: bool = False,
        size_divisor: int | None = None,
        pad_value: int = 0,
        resize_library: str = "opencv",
        **kwargs,
    ) -> list[np.ndarray]:
        processed = []
        for image in images:
            if do_normalize and max(np.atleast_1d(image_mean)) > 1:  # statistics on the 0-255 scale
                warn_about_pixel_scale(image, rescale_factor if do_rescale else None)
            if do_reduce_labels:
                image = self.reduce_label(image)
            if do_resize:
                image = self.resize(image, size, resample, resize_library=resize_library)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image)
        processed = [image if image.dtype == np.int64 else image.astype(np.float32) for image in processed]
        if do_pad:
            target = padded_size(max(i.shape[-2] for i in processed), max(i.shape[-1] for i in processed), size_divisor)
            return self.pad(processed, pad_size=target, fill_value=pad_value)
        if size_divisor:
            return [
                self.pad([image], pad_size=padded_size(*image.shape[-2:], size_divisor), fill_value=pad_value)[0]
                for image in processed
            ]
        return processed

    def to_dict(self) -> dict:
        """As saved in preprocessor_config.json; the remote-code entry is keyed by backend ({"pil": ...}).

        AutoImageProcessor reads that form, while `pipeline(...)`'s optional video-processor lookup, which would
        otherwise take the image processor's entry for a video processor and ask to run remote code, skips it.
        """
        output = super().to_dict()
        auto_map = dict(output.get("auto_map") or {})
        if isinstance(auto_map.get("AutoImageProcessor"), str):
            output["auto_map"] = {**auto_map, "AutoImageProcessor": {"pil": auto_map["AutoImageProcessor"]}}
        return output

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: list[tuple[int, int]] | None = None, return_segmentation_scores: bool = False
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """Label maps (H, W) from a model's outputs, at `target_sizes` (the original image sizes) when given.

        Outputs with `logits` (SeMask-FPN): Segformer's post-processing (logits resized to the target size).
        Mask classification outputs (SeMask-MaskFormer, SeMask-Mask2Former: `masks_queries_logits`): the original
        semantic inference (`semask.inference.semantic_inference`) over the image as this processor's settings resize
        it, so the padding the model added is cropped, then resized bilinearly to the target size; without target
        sizes, over the whole padded input.
        """
        if getattr(outputs, "masks_queries_logits", None) is None:
            return super().post_process_semantic_segmentation(outputs, target_sizes, return_segmentation_scores)
        class_logits, masks = outputs.class_queries_logits, outputs.masks_queries_logits
        if target_sizes is not None and len(target_sizes) != len(masks):
            raise ValueError(f"Got {len(target_sizes)} target sizes for {len(masks)} predictions; pass one per image.")
        results = []
        for index in range(len(masks)):
            prediction = (class_logits[index : index + 1], masks[index : index + 1])
            if target_sizes is None:
                scores = semantic_inference(*prediction, (masks.shape[-2] * MASK_STRIDE, masks.shape[-1] * MASK_STRIDE))
            else:
                height, width = (int(side) for side in target_sizes[index])
                resized = output_size(height, width, self.size) if self.do_resize else (height, width)
                scores = F.interpolate(semantic_inference(*prediction, resized), size=(height, width), mode="bilinear")
            results.append(
                SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": scores[0].argmax(dim=0), "segmentation_scores": scores[0]}
                )
            )
        return results if return_segmentation_scores else [result.segmentation for result in results]

    def reduce_label(self, label: np.ndarray) -> np.ndarray:
        """0 -> 255 (ignored), k -> k - 1; 255 stays 255."""
        return np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)


def padded_size(height: int, width: int, size_divisor: int | None) -> SizeDict:
    """`height` x `width` rounded up to multiples of `size_divisor` (unchanged without one)."""
    if size_divisor:
        height, width = -(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor
    return SizeDict(height=height, width=width)


def check_pairs(images: list[np.ndarray], label_maps: list[np.ndarray]) -> None:
    """Images and segmentation maps must come in equal numbers and with equal sizes."""
    if len(images) != len(label_maps):
        raise ValueError(
            f"Got {len(images)} images but {len(label_maps)} segmentation maps; pass one (H, W) map per image."
        )
    for index, (image, label_map) in enumerate(zip(images, label_maps)):
        if image.shape[-2:] != label_map.shape[-2:]:
            raise ValueError(
                f"Image {index} is {image.shape[-2]}x{image.shape[-1]} (HxW) but its segmentation map is "
                f"{label_map.shape[-2]}x{label_map.shape[-1]}; they must have the same size."
            )


def _as_list(images: ImageInput) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


__all__ = ["SemaskImageProcessor"]
