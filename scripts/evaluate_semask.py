#!/usr/bin/env python
"""Evaluate a segmentation model folder on a dataset split, as the original evaluation does.

    python scripts/evaluate_semask.py --model semask-demo --dataset_name demo
    python scripts/evaluate_semask.py --model semask-tiny-ade --dataset_name ADEChallengeData2016 --mode ms+flip
    python scripts/evaluate_semask.py --model m --dataset_name d --mode slide --crop_size 512 --stride 341 \\
        --output_json results.json

Every image goes through `semask.inference.predict_probabilities` at its original size (whole-image, sliding-window
or multi-scale + flip inference with the model's saved image processor), and the predictions accumulate in a
streaming `semask.metrics.SegmentationMetric`. Prints IoU and accuracy per class, then mIoU, mAcc and aAcc (%).
The dataset options are those of `semask.data.DatasetArguments`; label names default to the model's.
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from semask.cli import MODES, CliError, load_model
from semask.data import DatasetArguments, DatasetValidationError, load_segmentation_data, validate_segmentation_data
from semask.image_processing_semask import upright_rgb
from semask.inference import MS_FLIP_SCALES, predict_probabilities
from semask.label_files import LabelsFileError
from semask.metrics import SegmentationMetric
from semask.training import label_map


class OptionError(ValueError):
    """Options that cannot work together, or with the model and data (reported as `error: <message>`)."""


@dataclass
class EvaluationArguments:
    model: str = field(metadata={"help": "Model folder or Hub id (with its image processor)."})
    split: str = field(default="validation", metadata={"help": "'validation' or 'train' (see --validation_split)."})
    mode: str = field(default="whole", metadata={"help": f"Inference mode: one of {', '.join(MODES)}."})
    crop_size: list[int] | None = field(default=None, metadata={"help": "Slide mode: crop SIZE or HEIGHT WIDTH."})
    stride: list[int] | None = field(default=None, metadata={"help": "Slide mode: stride (default 2/3 of the crop)."})
    max_images: int | None = field(default=None, metadata={"help": "Evaluate only the first N images."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda when available, else cpu."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model folder's own code."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_json file."})

    def __post_init__(self):
        if self.mode not in MODES:
            raise OptionError(f"--mode must be one of {MODES}, got {self.mode!r}.")
        if self.split not in ("train", "validation"):
            raise OptionError(f"--split must be 'train' or 'validation', got {self.split!r}.")
        if self.mode == "slide" and not self.crop_size:
            raise OptionError("--mode slide needs --crop_size (e.g. the training crop, 512).")
        if self.output_json:
            output = Path(self.output_json)
            if output.exists() and not self.overwrite:
                raise OptionError(f"{output} exists; pass --overwrite to replace it.")
            if not output.parent.is_dir() or not os.access(output.parent, os.W_OK | os.X_OK):
                raise OptionError(f"Cannot write --output_json {output}: {output.parent} is not a writable folder.")


def inference_options(args: EvaluationArguments) -> dict:
    if args.mode == "slide":
        as_pair = lambda values: None if values is None else (values * 2 if len(values) == 1 else values)  # noqa: E731
        return {"mode": "slide", "crop_size": tuple(as_pair(args.crop_size)), "stride": as_pair(args.stride)}
    if args.mode == "ms+flip":
        return {"scales": MS_FLIP_SCALES, "flip": True}
    return {}


def format_table(metrics: dict, id2label: dict[int, str]) -> str:
    """Per-class IoU / accuracy and the summary, in percent, as mmsegmentation prints them."""
    width = max(len("Class"), *(len(str(name)) for name in id2label.values()))
    lines = [f"{'Class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for index, name in id2label.items():
        iou, accuracy = metrics["per_category_iou"][index], metrics["per_category_accuracy"][index]
        lines.append(f"{name:<{width}}  {100 * iou:6.2f}  {100 * accuracy:6.2f}")
    summary = (metrics["mean_iou"], metrics["mean_accuracy"], metrics["overall_accuracy"])
    lines.append("mIoU {:.2f}  mAcc {:.2f}  aAcc {:.2f}".format(*(100 * value for value in summary)))
    return "\n".join(lines)


@torch.no_grad()
def evaluate(args: EvaluationArguments, data_args: DatasetArguments) -> dict:
    """The metrics of `args.model` on the chosen split (keys as `SegmentationMetric.compute`)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model(args.model, device, args.trust_remote_code)
    if data_args.reduce_labels is None and data_args.dataset_preset is None:
        data_args.reduce_labels = processor.do_reduce_labels
    data = load_segmentation_data(data_args, splits=(args.split,), default_id2label=model.config.id2label)
    if data.num_labels != model.config.num_labels:
        raise OptionError(
            f"The dataset has {data.num_labels} labels but {args.model} predicts {model.config.num_labels}; "
            "pass the model's label set (--labels_file) or a matching dataset."
        )
    validate_segmentation_data(data, data_args.label_check_samples)
    processor.do_reduce_labels = data.reduce_labels
    dataset = data.dataset[args.split]
    if args.max_images is not None:
        dataset = dataset.select(range(min(args.max_images, len(dataset))))
    metric = SegmentationMetric(data.num_labels)
    options = inference_options(args)
    for index, example in enumerate(tqdm(dataset, desc=f"Evaluating ({args.mode})", unit="image")):
        probabilities = predict_probabilities(model, processor, upright_rgb(example["image"]), **options)
        reference = label_map(example["label"], processor, data.num_labels, f"{args.split} label map #{index}")
        metric.update(probabilities.argmax(0).cpu(), torch.from_numpy(reference))
    results = metric.compute()
    print(format_table(results, data.id2label))
    if args.output_json:
        record = {"model": args.model, "dataset": data_args.dataset_name, "split": args.split, "mode": args.mode}
        Path(args.output_json).write_text(json.dumps({**record, **results}, indent=2))
    return results


def main(argv: list[str] | None = None) -> dict:
    """Evaluate; a model that does not load, unusable data or bad options exit with `error: <message>`, status 2."""
    parser = HfArgumentParser((EvaluationArguments, DatasetArguments), allow_abbrev=False)
    try:
        args, data_args = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
        return evaluate(args, data_args)
    except (CliError, DatasetValidationError, LabelsFileError, OptionError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
