"""`semask-segment`: segment images, or folders of images, with a SeMask (or any semantic segmentation) model.

    semask-segment --model semask-tiny-fpn-ade20k --output predictions photo.jpg more_photos/ [--mode ms+flip]

For every image it writes `<name>_labels.png` (class ids: 8-bit, or 16-bit with more than 256 classes),
`<name>_overlay.png` (the class colours blended over the image), `<name>_legend.png` (the colours and names of the
classes present) and, with `--save-priors`, `<name>_priors.png` (each stage's semantic prior map, argmax-coloured,
stages side by side). Images found in folders keep their sub-folder under the output folder. ADE20K and Cityscapes
models get their official palettes, other label sets a generated one (`semask.palettes`).

An image that cannot be read, or that the processor refuses (e.g. a 2 x 9000 one), is reported (`error: ...`) and
skipped; the others are still segmented, and the command then exits 1 with a summary of the failures. An image's
outputs are written only once all of them are computed, each through a temporary file, so an image never looks
segmented when it is not. Without `--overwrite`, images whose outputs all exist already are skipped (so a rerun
finishes what a failed or interrupted run left), and an image with only some of its outputs stops the run before
anything is written: those files are replaced only with `--overwrite`.
"""

import argparse
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, BaseImageProcessor, PreTrainedModel

from .image_processing_semask import IMAGE_SUFFIXES, load_image
from .inference import MS_FLIP_SCALES, predict_probabilities
from .palettes import palette_for_labels

MODES = ("whole", "slide", "ms+flip")
LEGEND_ROW_HEIGHT = 20
LEGEND_WIDTH = 320
PRIOR_PANEL_SIZE = 256  # longest side of each stage's panel in the priors picture
PANEL_GAP = 4
LISTED_FAILURES = 5  # failed images named in the final summary


class CliError(Exception):
    """A problem with the command's inputs or outputs, reported as one line without a traceback."""


@dataclass(frozen=True)
class ImageJob:
    source: Path
    output_stem: Path  # e.g. predictions/street/photo -> predictions/street/photo_labels.png

    def output(self, kind: str) -> Path:
        return self.output_stem.with_name(f"{self.output_stem.name}_{kind}.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Segment images or folders of images with a semantic segmentation model."
    )
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--output", "-o", required=True, help="folder for the outputs")
    parser.add_argument("--mode", choices=MODES, default="whole", help="whole image, sliding window, or ms+flip")
    parser.add_argument("--crop-size", type=int, help="sliding-window crop (square side); required with --mode slide")
    parser.add_argument("--stride", type=int, help="sliding-window stride (default: two thirds of the crop)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours, 0-1")
    parser.add_argument("--save-priors", action="store_true", help="also save each stage's semantic prior map")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own code")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    if args.mode == "slide" and args.crop_size is None:
        parser.error("--mode slide needs --crop-size (e.g. the training crop, 512)")
    if args.mode != "slide" and (args.crop_size is not None or args.stride is not None):
        parser.error("--crop-size and --stride only apply with --mode slide")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    return args


def find_images(inputs: list[str], output_dir: Path) -> list[ImageJob]:
    """One job per image: files as given, folders searched recursively for `IMAGE_SUFFIXES` (outside `output_dir`)."""
    jobs = []
    for name in inputs:
        path = Path(name)
        if path.is_file():
            jobs.append(ImageJob(path, output_dir / path.stem))
        elif path.is_dir():
            found = sorted(
                file
                for file in path.rglob("*")
                if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not _is_inside(file, output_dir)
            )
            if not found:
                raise CliError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found in folder {path}")
            jobs += [ImageJob(file, output_dir / file.relative_to(path).with_suffix("")) for file in found]
        else:
            raise CliError(f"Input not found: {path}")
    sources = {}
    for job in jobs:
        if job.output_stem in sources:
            raise CliError(
                f"{sources[job.output_stem]} and {job.source} would write the same outputs ({job.output('labels')}); "
                "rename one or segment them separately."
            )
        sources[job.output_stem] = job.source
    return jobs


def _is_inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def skip_segmented(jobs: list[ImageJob], kinds: tuple[str, ...]) -> list[ImageJob]:
    """The jobs without any of their outputs; those with all of them are skipped (and counted on stdout).

    Raises `CliError` when an image has only some of its outputs: they are replaced only with `--overwrite`.
    """
    todo, done, partial = [], 0, []
    for job in jobs:
        existing = [job.output(kind) for kind in kinds if job.output(kind).exists()]
        if not existing:
            todo.append(job)
        elif len(existing) == len(kinds):
            done += 1
        else:
            partial += existing
    if partial:
        raise CliError(
            f"{len(partial)} output file(s) already exist, e.g. {partial[0]}, without all the outputs of their "
            "image; pass --overwrite to replace them."
        )
    if done:
        print(f"skipping {done} image(s) already segmented; pass --overwrite to redo them")
    return todo


def make_output_folder(folder: Path) -> None:
    """Create `folder` (and its parents) if needed; `CliError` when that fails or it cannot be written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # an existing file, a path under a file, no permission
        raise CliError(f"Cannot create the output folder {folder}: {error.strerror or error}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"Cannot write to the output folder {folder}: permission denied")


def save_outputs(job: ImageJob, pictures: dict[str, Image.Image]) -> None:
    """Write an image's outputs, each through a temporary file so none is ever left half-written."""
    temporary = {kind: job.output(kind).with_name(f".{job.output(kind).name}.partial") for kind in pictures}
    try:
        job.output_stem.parent.mkdir(parents=True, exist_ok=True)
        for kind, picture in pictures.items():
            picture.save(temporary[kind], format="PNG")
        for kind, path in temporary.items():
            os.replace(path, job.output(kind))
    except OSError as error:
        raise CliError(f"Cannot write the outputs of {job.source}: {error}") from error
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


def load_model(name: str, device: str, trust_remote_code: bool) -> tuple[PreTrainedModel, BaseImageProcessor]:
    """The model (eval mode, on `device`) and its image processor; `CliError` saying what does not load."""
    try:
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        model, info = AutoModelForSemanticSegmentation.from_pretrained(
            name, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as error:  # missing files, bad JSON, truncated pytorch_model.bin
        raise CliError(f"Cannot load model {name}: {error}") from error
    except SafetensorError as error:
        raise CliError(
            f"Cannot load model {name}: a .safetensors weights file is truncated or corrupt ({error})"
        ) from error
    except pickle.UnpicklingError as error:  # transformers loads .bin files weights-only: nothing in them ran
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0])  # e.g. "... GLOBAL posix.system ..."
        raise CliError(
            f"Cannot load model {name}: its .bin weights hold pickled objects other than tensors, which are refused "
            f"(weights-only loading, nothing of them ran): {reason}"
        ) from error
    if missing := sorted(info["missing_keys"]):
        raise CliError(
            f"Cannot load model {name}: {len(missing)} weight(s) of its config are missing from its weights, e.g. "
            f"{missing[0]}; do the weights belong to this config?"
        )
    if mismatched := sorted(info["mismatched_keys"]):
        key, saved, expected = mismatched[0]
        raise CliError(
            f"Cannot load model {name}: {len(mismatched)} weight(s) do not fit its config, e.g. {key} "
            f"(weights {tuple(saved)}, config {tuple(expected)}); does the config's num_labels "
            f"({model.config.num_labels}) match the weights?"
        )
    return model.to(device).eval(), processor


def predict_label_map(model, processor, image: Image.Image, args: argparse.Namespace) -> np.ndarray:
    """(H, W) class ids at the image's size with the chosen inference mode."""
    if args.mode == "slide":
        options = {"mode": "slide", "crop_size": args.crop_size, "stride": args.stride}
    elif args.mode == "ms+flip":
        options = {"scales": MS_FLIP_SCALES, "flip": True}
    else:
        options = {}
    return predict_probabilities(model, processor, image, **options).argmax(0).cpu().numpy()


def label_map_image(label_map: np.ndarray, num_labels: int) -> Image.Image:
    """The class ids as an 8-bit ("L") PNG image, or a 16-bit one when there are more than 256 classes."""
    return Image.fromarray(label_map.astype(np.uint8 if num_labels <= 256 else np.uint16))


def overlay_image(image: Image.Image, label_map: np.ndarray, palette: np.ndarray, alpha: float) -> Image.Image:
    return Image.blend(image, Image.fromarray(palette[label_map]), alpha)


def legend_image(label_map: np.ndarray, palette: np.ndarray, id2label: dict[int, str]) -> Image.Image:
    """A colour swatch, id, name and pixel share per class present, most frequent first."""
    counts = np.bincount(label_map.ravel(), minlength=len(palette))
    present = [int(index) for index in np.argsort(-counts, kind="stable") if counts[index]]
    legend = Image.new("RGB", (LEGEND_WIDTH, LEGEND_ROW_HEIGHT * len(present) + 8), "white")
    draw = ImageDraw.Draw(legend)
    for row, index in enumerate(present):
        top = 4 + row * LEGEND_ROW_HEIGHT
        draw.rectangle([4, top, 4 + 2 * LEGEND_ROW_HEIGHT, top + LEGEND_ROW_HEIGHT - 4], fill=tuple(palette[index]))
        share = counts[index] / label_map.size
        text = f"{index}: {id2label.get(index, index)} ({share:.1%})"
        draw.text((12 + 2 * LEGEND_ROW_HEIGHT, top + 2), text, fill="black")
    return legend


@torch.no_grad()
def priors_image(model, processor, image: Image.Image, palette: np.ndarray) -> Image.Image:
    """Each stage's semantic prior map (argmax over classes, palette colours), stages side by side."""
    parameter = next(model.parameters())
    pixel_values = processor(image, return_tensors="pt")["pixel_values"].to(parameter.device, parameter.dtype)
    priors = model(pixel_values=pixel_values).semantic_priors
    scale = PRIOR_PANEL_SIZE / max(image.size)
    panel_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    panels = [
        Image.fromarray(palette[prior[0].argmax(0).cpu().numpy()]).resize(panel_size, Image.Resampling.NEAREST)
        for prior in priors
    ]
    grid = Image.new("RGB", ((panel_size[0] + PANEL_GAP) * len(panels) - PANEL_GAP, panel_size[1]), "white")
    for index, panel in enumerate(panels):
        grid.paste(panel, (index * (panel_size[0] + PANEL_GAP), 0))
    return grid


def segment(args: argparse.Namespace) -> tuple[int, list[Path]]:
    """Run the command; returns the number of images segmented and the images that could not be read."""
    output_dir = Path(args.output)
    jobs = find_images(args.inputs, output_dir)
    kinds = ("labels", "overlay", "legend") + (("priors",) if args.save_priors else ())
    if not args.overwrite:
        jobs = skip_segmented(jobs, kinds)
    make_output_folder(output_dir)
    if not jobs:
        return 0, []
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model(args.model, device, args.trust_remote_code)
    if args.save_priors and not getattr(model.config, "has_semantic_layers", False):
        raise CliError(f"--save-priors needs a SeMask model with semantic layers; {args.model} has none.")
    id2label = model.config.id2label
    palette = palette_for_labels(id2label)
    failed = []
    for job in tqdm(jobs, desc="Segmenting", unit="image"):
        try:
            image = load_image(job.source)
            label_map = predict_label_map(model, processor, image, args)
        except ValueError as error:  # unreadable, or refused by the processor: report it, go on with the others
            message = str(error) if str(job.source) in str(error) else f"{error} ({job.source})"
            tqdm.write(f"error: {message}", file=sys.stderr)
            failed.append(job.source)
            continue
        pictures = {
            "labels": label_map_image(label_map, len(id2label)),
            "overlay": overlay_image(image, label_map, palette, args.alpha),
            "legend": legend_image(label_map, palette, id2label),
        }
        if args.save_priors:
            pictures["priors"] = priors_image(model, processor, image, palette)
        save_outputs(job, pictures)
    return len(jobs) - len(failed), failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        count, failed = segment(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Segmented {count} image(s) into {args.output}")
    if failed:
        names = ", ".join(map(str, failed[:LISTED_FAILURES])) + (", ..." if len(failed) > LISTED_FAILURES else "")
        print(f"error: {len(failed)} of {count + len(failed)} images could not be segmented: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
