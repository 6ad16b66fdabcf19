"""Segmentation datasets for SeMask training and evaluation: loading from several sources, then checking them.

`load_segmentation_data` returns a `SegmentationData`: a `datasets.DatasetDict` whose splits ("train",
"validation") have an "image" column (images) and a "label" column (single-channel class-id maps), with the label
names. Sources: the built-in demo (`"demo"`), a Hugging Face Hub dataset, a local folder (ADEChallengeData2016
layout, images/ + labels/, or a `save_to_disk` folder) or a pair of image / label folders per split.

`validate_segmentation_data` checks a dataset before training, so bad data fails early with the file's name:
every image and label map is opened (headers only: readable, sizes equal, label maps single-channel), and the
pixel values of `label_check_samples` label maps per split (all of them in smaller splits) are checked against
the label set after fully decoding them and their images. Header checks cost about a millisecond per file, so
they run on every file; full decoding costs 10-100x more, hence the sample (pass -1 to decode everything). JPEG
label maps get a warning (lossy compression alters class ids).

A file that only fails when fully decoded (e.g. truncated) outside the sample is reported when training reaches it:
give the training transforms `undecoded(dataset)`, whose files `decode_image` decodes, naming a file it cannot.
EXIF orientation applies to label maps as to images (as `datasets.Image` decodes both), so a label map stored
upright and one stored with its image's orientation tag both stay aligned with the upright image.
"""

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, Features, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from PIL import Image

from .image_processing_semask import IGNORE_INDEX, IMAGE_SUFFIXES, UNREADABLE_IMAGE_ERRORS, image_to_array, upright_rgb
from .inference import upright_size
from .label_files import read_labels_file
from .presets import DATASET_LABELS, DATASET_PROCESSING

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
# Folder names accepted for each split in local folder layouts, and for the image / label folders.
FOLDER_SPLIT_NAMES = {"train": ("training", "train"), "validation": ("validation", "val")}
IMAGE_FOLDER_NAMES = ("images",)
LABEL_FOLDER_NAMES = ("annotations", "labels")
LABELS_FILE_NAME = "id2label.json"
LABEL_MAP_MODES = ("1", "L", "P", "I")  # plus the 16-bit "I;16*" modes
MAX_REPORTED_PROBLEMS = 20


class DatasetValidationError(ValueError):
    """A dataset that cannot be trained or evaluated on; the message lists every problem found (with
    file names). The training script prints it as `error: <message>`, not as a traceback."""


@dataclass
class DatasetArguments:
    """Where the segmentation data comes from (command-line arguments of the training and evaluation scripts)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "'demo' (built-in synthetic dataset), a Hub dataset id, or a local folder: the "
            "ADEChallengeData2016 layout (images/ and annotations/, each with training/ and validation/), images/ "
            "and labels/ (each with train/ and validation/), or a folder written by `DatasetDict.save_to_disk`."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    train_images_dir: str | None = field(default=None, metadata={"help": "Folder of training images."})
    train_labels_dir: str | None = field(
        default=None, metadata={"help": "Folder of training label maps, matched to the images by file name stem."}
    )
    validation_images_dir: str | None = field(default=None, metadata={"help": "Folder of validation images."})
    validation_labels_dir: str | None = field(default=None, metadata={"help": "Folder of validation label maps."})
    image_column: str = field(default="image", metadata={"help": "Image column of a Hub or saved dataset."})
    label_column: str = field(default="label", metadata={"help": "Label-map column of a Hub or saved dataset."})
    train_split: str = field(default="train", metadata={"help": "Training split of a Hub or saved dataset."})
    validation_split: str = field(
        default="validation", metadata={"help": "Validation split of a Hub or saved dataset."}
    )
    labels_file: str | None = field(
        default=None,
        metadata={"help": 'JSON file of label names: a list, or {"0": "name", ...} with ids 0..N-1.'},
    )
    dataset_preset: str | None = field(
        default=None,
        metadata={
            "help": f"One of {sorted(DATASET_LABELS)}: that dataset's label names, label reduction and test-time "
            "resize (the original pipeline). An ADEChallengeData2016 folder implies 'ade20k'."
        },
    )
    reduce_labels: bool | None = field(
        default=None,
        metadata={
            "help": "Label 0 means 'other' (ignored) and label k is class k-1, as in ADE20K and COCO-Stuff. "
            "Default: the preset's setting, otherwise False."
        },
    )
    label_check_samples: int = field(
        default=100,
        metadata={
            "help": "Label maps per split whose pixel values are checked before training (all in smaller splits; "
            "-1: all). Headers and sizes of all files are always checked."
        },
    )
    demo_train_size: int | None = field(default=None, metadata={"help": "Training images of the demo dataset."})
    demo_validation_size: int | None = field(default=None, metadata={"help": "Validation images of the demo dataset."})
    demo_image_size: int | None = field(default=None, metadata={"help": "Side of the demo dataset's images."})


@dataclass
class SegmentationData:
    """A dataset ready for SeMask: splits with "image" / "label" columns, label names and the label convention."""

    dataset: DatasetDict
    id2label: dict[int, str]
    reduce_labels: bool
    preset: str | None = None  # the dataset preset ("ade20k", ...) whose test pipeline applies, if any

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


def load_segmentation_data(
    args: DatasetArguments, splits: tuple[str, ...] = SPLITS, default_id2label: dict[int, str] | None = None
) -> SegmentationData:
    """Load `splits` of the dataset described by `args`, with its label names (not yet validated).

    Args:
        args (`DatasetArguments`):
            Where the data is, and its label names and convention.
        splits (`tuple[str, ...]`, *optional*, defaults to `("train", "validation")`):
            The splits to load.
        default_id2label (`dict[int, str]`, *optional*):
            Label names for data that names none (e.g. an evaluated model's labels).

    Returns:
        `SegmentationData`: the splits with the first label names found in: `args.labels_file`,
        `args.dataset_preset`, the dataset (`id2label.json` in its folder or Hub repository, the demo's names),
        `default_id2label`, the preset its layout implies (ADEChallengeData2016: ADE20K).
    """
    if args.dataset_preset is not None and args.dataset_preset not in DATASET_LABELS:
        raise DatasetValidationError(
            f"Unknown dataset preset {args.dataset_preset!r}; expected one of {sorted(DATASET_LABELS)}."
        )
    if args.dataset_name == "demo":
        return _load_demo(args, splits)
    dataset, found_labels, layout_preset = _load_splits(args, splits)
    preset = args.dataset_preset or layout_preset
    id2label = _resolve_id2label(args, found_labels, preset, default_id2label)
    reduce_labels = args.reduce_labels
    if reduce_labels is None:
        reduce_labels = bool(preset and DATASET_PROCESSING[preset]["do_reduce_labels"])
    return SegmentationData(dataset, id2label, reduce_labels, preset)


def _load_demo(args: DatasetArguments, splits: tuple[str, ...]) -> SegmentationData:
    from .demo_data import DEMO_LABELS, load_demo_dataset

    sizes = {
        "num_train": args.demo_train_size,
        "num_validation": args.demo_validation_size,
        "image_size": args.demo_image_size,
    }
    dataset = load_demo_dataset(**{name: value for name, value in sizes.items() if value is not None})
    id2label = read_labels_file(args.labels_file) if args.labels_file else dict(enumerate(DEMO_LABELS))
    return SegmentationData(DatasetDict({split: dataset[split] for split in splits}), id2label, False)


def _load_splits(args: DatasetArguments, splits: tuple[str, ...]) -> tuple[DatasetDict, dict | None, str | None]:
    """The splits as a DatasetDict, label names found with the data (or None) and the preset its layout implies."""
    folder_pairs = {
        "train": (args.train_images_dir, args.train_labels_dir),
        "validation": (args.validation_images_dir, args.validation_labels_dir),
    }
    if any(path for pair in folder_pairs.values() for path in pair):
        if args.dataset_name:
            raise DatasetValidationError(
                "Pass either --dataset_name or image/label folders (--train_images_dir ...), not both."
            )
        return DatasetDict({split: _paired_folder_split(*folder_pairs[split], split) for split in splits}), None, None
    if not args.dataset_name:
        raise DatasetValidationError(
            "No dataset given: pass --dataset_name (demo, a Hub id or a folder) or image/label folders."
        )
    root = Path(args.dataset_name)
    if not root.is_dir():
        dataset = load_dataset(args.dataset_name, args.dataset_config_name)
        return _select_columns(dataset, args, splits), _hub_labels(args.dataset_name), None
    found_labels = read_labels_file(root / LABELS_FILE_NAME) if (root / LABELS_FILE_NAME).is_file() else None
    if (root / "dataset_dict.json").is_file():
        return _select_columns(load_from_disk(str(root)), args, splits), found_labels, None
    dataset, is_ade_layout = _layout_folder_splits(root, splits)
    return dataset, found_labels, "ade20k" if is_ade_layout and found_labels is None else None


def _select_columns(dataset: DatasetDict | Dataset, args: DatasetArguments, splits: tuple[str, ...]) -> DatasetDict:
    """The requested splits renamed to "train" / "validation", with only "image" and "label" columns."""
    if not isinstance(dataset, DatasetDict):
        raise DatasetValidationError(
            f"{args.dataset_name} holds a single split; save a DatasetDict with {list(splits)} splits instead."
        )
    source_names = {"train": args.train_split, "validation": args.validation_split}
    selected = {}
    for split in splits:
        name = source_names[split]
        if name not in dataset:
            raise DatasetValidationError(
                f"Dataset {args.dataset_name} has no {name!r} split (found {sorted(dataset)}); choose one with "
                f"--{split}_split."
            )
        columns = dataset[name].column_names
        for column, option in ((args.image_column, "image_column"), (args.label_column, "label_column")):
            if column not in columns:
                raise DatasetValidationError(
                    f"Split {name!r} of {args.dataset_name} has no {column!r} column (found {columns}); choose one "
                    f"with --{option}."
                )
        subset = dataset[name].select_columns([args.image_column, args.label_column])
        selected[split] = subset.rename_columns({args.image_column: "image", args.label_column: "label"})
    return DatasetDict(selected)


def _hub_labels(repo_id: str) -> dict[int, str] | None:
    """Label names from the dataset repository's id2label.json, when it has one and the Hub is reachable."""
    try:
        return read_labels_file(hf_hub_download(repo_id, LABELS_FILE_NAME, repo_type="dataset"))
    except (EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError):
        return None


def _layout_folder_splits(root: Path, splits: tuple[str, ...]) -> tuple[DatasetDict, bool]:
    """Splits of a folder with images/ and annotations/ (or labels/), each holding one folder per split, and whether
    the folder names are ADEChallengeData2016's (images/ and annotations/)."""
    images_root = _first_existing(root, IMAGE_FOLDER_NAMES)
    labels_root = _first_existing(root, LABEL_FOLDER_NAMES)
    if images_root is None or labels_root is None:
        raise DatasetValidationError(
            f"{root} is not a dataset folder: expected {'/ or '.join(IMAGE_FOLDER_NAMES)}/ and "
            f"{'/ or '.join(LABEL_FOLDER_NAMES)}/ (each with one folder per split), or a folder written by "
            "`save_to_disk`."
        )
    dataset = {}
    for split in splits:
        images_dir = _first_existing(images_root, FOLDER_SPLIT_NAMES[split])
        labels_dir = _first_existing(labels_root, FOLDER_SPLIT_NAMES[split])
        if images_dir is None or labels_dir is None:
            missing_root = images_root if images_dir is None else labels_root
            expected = " or ".join(str(missing_root / name) for name in FOLDER_SPLIT_NAMES[split])
            raise DatasetValidationError(f"Missing {split} split: expected {expected}.")
        dataset[split] = _paired_folder_split(images_dir, labels_dir, split)
    return DatasetDict(dataset), images_root.name == "images" and labels_root.name == "annotations"


def _first_existing(parent: Path, names: tuple[str, ...]) -> Path | None:
    return next((parent / name for name in names if (parent / name).is_dir()), None)


def _paired_folder_split(images_dir: str | Path | None, labels_dir: str | Path | None, split: str) -> Dataset:
    """Images and label maps of two folders, matched by their path relative to the folder without suffix."""
    if not images_dir or not labels_dir:
        raise DatasetValidationError(f"Missing {split} split: pass both --{split}_images_dir and --{split}_labels_dir.")
    images, labels = _image_files(Path(images_dir)), _image_files(Path(labels_dir))
    unmatched = sorted(set(images) - set(labels))
    if unmatched:
        examples = ", ".join(str(images[key]) for key in unmatched[:5])
        raise DatasetValidationError(
            f"{len(unmatched)} {split} images have no label map with the same name in {labels_dir}: {examples}"
            + (" ..." if len(unmatched) > 5 else "")
        )
    orphans = sorted(set(labels) - set(images))
    if orphans:
        logger.warning(
            "%d label maps in %s have no image and are left out, e.g. %s", len(orphans), labels_dir, orphans[0]
        )
    keys = sorted(images)
    return Dataset.from_dict(
        {"image": [str(images[key]) for key in keys], "label": [str(labels[key]) for key in keys]},
        features=Features({"image": ImageFeature(), "label": ImageFeature()}),
    )


def _image_files(folder: Path) -> dict[str, Path]:
    """Image files under `folder` (recursively), keyed by their relative path without suffix."""
    if not folder.is_dir():
        raise DatasetValidationError(f"Folder not found: {folder}")
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            key = str(path.relative_to(folder).with_suffix(""))
            if key in files:
                raise DatasetValidationError(f"Two files share the name {key!r} in {folder}: {files[key]} and {path}")
            files[key] = path
    if not files:
        raise DatasetValidationError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _resolve_id2label(
    args: DatasetArguments, found_labels: dict | None, preset: str | None, default_id2label: dict | None
) -> dict[int, str]:
    """The first of: the labels file, the chosen preset, the dataset's own names, the default, the implied preset."""
    if args.labels_file:
        return read_labels_file(args.labels_file)
    if args.dataset_preset:
        return dict(enumerate(DATASET_LABELS[args.dataset_preset]))
    if found_labels is not None:
        return found_labels
    if default_id2label:
        return dict(default_id2label)
    if preset:
        return dict(enumerate(DATASET_LABELS[preset]))
    raise DatasetValidationError(
        f"No label names for {args.dataset_name or 'the image/label folders'}: pass --labels_file (a JSON list of "
        f"names, or {LABELS_FILE_NAME} in the dataset folder) or --dataset_preset {{{','.join(DATASET_LABELS)}}}."
    )


def validate_segmentation_data(data: SegmentationData, label_check_samples: int = 100, seed: int = 0) -> None:
    """Raise `DatasetValidationError` listing every problem found in the splits of `data` (see the module docstring)."""
    problems = []
    for split, dataset in data.dataset.items():
        if len(dataset) == 0:
            problems.append(f"The {split} split is empty.")
            continue
        problems += _split_problems(split, dataset, data, label_check_samples, seed)
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise DatasetValidationError(
            "The dataset cannot be used:\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        )


def undecoded(dataset: Dataset) -> Dataset:
    """`dataset` with its `datasets.Image` columns left undecoded ({"path", "bytes"} values, for `decode_image`)."""
    for column, feature in dataset.features.items():
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def decode_image(value: Any, description: str, rgb: bool = False) -> Any:
    """A `datasets.Image` value (undecoded dict, or an image / array, returned as is) decoded as `datasets` does,
    EXIF orientation applied, and with `rgb` made upright RGB as every entry point reads images (`upright_rgb`); a
    `DatasetValidationError` naming its file (or `description`) if it cannot be."""
    try:
        decoded = ImageFeature().decode_example(value) if isinstance(value, dict) else value
        return upright_rgb(decoded) if rgb else decoded
    except UNREADABLE_IMAGE_ERRORS as error:
        raise DatasetValidationError(f"Cannot decode {source_name(value, description)}: {error}") from error


def label_value_problem(values: np.ndarray, num_labels: int, reduce_labels: bool, name: str) -> str | None:
    """What is wrong with a label map's values (`values`: its distinct values, not yet reduced) for `num_labels`
    classes, or None: ids must be classes, or the ignore index 255 (with `reduce_labels`, 0 too: it is ignored)."""
    max_value = num_labels if reduce_labels else num_labels - 1
    invalid = values[((values < 0) | (values > max_value)) & (values != IGNORE_INDEX)]
    if not invalid.size:
        return None
    shown = ", ".join(str(value) for value in invalid[:10].tolist()) + (" ..." if invalid.size > 10 else "")
    convention = (
        f"with reduce_labels, 0 is ignored and 1..{max_value} are the classes"
        if reduce_labels
        else f"the classes are 0..{max_value}"
    )
    return f"{name} has values outside the {num_labels} labels ({convention}; {IGNORE_INDEX} is ignored): {shown}."


def _split_problems(
    split: str, dataset: Dataset, data: SegmentationData, label_check_samples: int, seed: int
) -> list[str]:
    if 0 <= label_check_samples < len(dataset):
        checked = set(np.random.default_rng(seed).choice(len(dataset), label_check_samples, replace=False).tolist())
    else:
        checked = set(range(len(dataset)))
    problems, jpeg_labels = [], []
    for index, row in enumerate(undecoded(dataset)):
        image_name = source_name(row["image"], f"{split} image #{index}")
        label_name = source_name(row["label"], f"{split} label map #{index}")
        try:
            with _open(row["image"]) as image, _open(row["label"]) as label:
                if label.format == "JPEG":
                    jpeg_labels.append(label_name)
                problems += _pair_problems(image, image_name, label, label_name, data, index in checked)
        except (*UNREADABLE_IMAGE_ERRORS, TypeError) as error:
            problems.append(f"Cannot read {image_name} or {label_name}: {error}")
    if jpeg_labels:
        logger.warning(
            "%d %s label maps are JPEG files (%s%s): JPEG compression alters class ids; save label maps as PNG.",
            len(jpeg_labels),
            split,
            ", ".join(jpeg_labels[:5]),
            " ..." if len(jpeg_labels) > 5 else "",
        )
    return problems


def source_name(value: Any, default: str) -> str:
    """The file of a `datasets.Image` value (undecoded dict with a "path"), or `default`."""
    return (value.get("path") if isinstance(value, dict) else None) or default


def _open(value) -> Image.Image:
    """An image opened lazily (header only) from an undecoded `datasets.Image` value, a path, an image or an array."""
    if isinstance(value, dict):
        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        return Image.open(value)
    return Image.fromarray(np.asarray(value))


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) of `image` once turned by its EXIF orientation, from the header (a PNG's EXIF only when it
    precedes the pixels: PIL would decode the file to look further)."""
    if image.format == "PNG" and "exif" not in image.info:
        return image.size
    height, width = upright_size(image)
    return width, height


def _pair_problems(
    image: Image.Image, image_name: str, label: Image.Image, label_name: str, data: SegmentationData, full: bool
) -> list[str]:
    """Size and mode problems of one pair (sizes once upright); with `full`, also decode both and check the label
    values."""
    (image_width, image_height), (label_width, label_height) = _upright_size(image), _upright_size(label)
    if (image_width, image_height) != (label_width, label_height):
        return [
            f"{label_name} is {label_height}x{label_width} (HxW) but its image {image_name} is "
            f"{image_height}x{image_width}."
        ]
    if label.mode not in LABEL_MAP_MODES and not label.mode.startswith("I;16"):
        return [
            f"{label_name} has mode {label.mode}: label maps must be single-channel class ids (mode L, P, I or "
            "I;16); convert colour-coded annotations to class ids first."
        ]
    if image.mode == "F":
        return [
            f"{image_name} is a 32-bit float image (mode F), whose pixel scale is unknown: save it with 8 or 16 bits."
        ]
    if not full:
        return []
    image.load()
    problem = label_value_problem(np.unique(image_to_array(label)), data.num_labels, data.reduce_labels, label_name)
    return [problem] if problem else []
