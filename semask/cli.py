"""`semask-segment`: segment images, or folders of images, with a SeMask (or any semantic segmentation) model.

    semask-segment --model semask-tiny-fpn-ade20k --output predictions photo.jpg more_photos/ [--mode ms+flip]

For every image it writes `<name>_labels.png` (class ids: 8-bit, or 16-bit with more than 256 classes),
`<name>_overlay.png` (the class colours blended over the image), `<name>_legend.png` (the colours and names of the
classes present) and, with `--save-priors`, `<name>_priors.png` (each stage's semantic prior map, argmax-coloured,
stages side by side). Images found in folders keep their sub-folder under the output folder. ADE20K and Cityscapes
models get their official palettes, other label sets a generated one (`semask.palettes`).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, BaseImageProcessor, PreTrainedModel

from .inference import MS_FLIP_SCALES, predict_probabilities
from .palettes import palette_for_labels

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MODES = ("whole", "slide", "ms+flip")
LEGEND_ROW_HEIGHT = 20
LEGEND_WIDTH = 320
PRIOR_PANEL_SIZE = 256  # longest side of each stage's panel in the priors picture
PANEL_GAP = 4


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


def check_outputs_free(jobs: list[ImageJob], kinds: tuple[str, ...]) -> None:
    existing = [job.output(kind) for job in jobs for kind in kinds if job.output(kind).exists()]
    if existing:
        raise CliError(
            f"{len(existing)} output file(s) already exist, e.g. {existing[0]}; pass --overwrite to replace."
        )


def open_image(path: Path) -> Image.Image:
    """The image as RGB, turned upright by its EXIF orientation; a clear error naming an unreadable file."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError) as error:  # includes PIL's UnidentifiedImageError and truncated files
        raise CliError(f"Cannot read image {path}: {error}") from error


def check_images_readable(jobs: list[ImageJob]) -> None:
    """Read every image's header before the (slow) segmentation starts."""
    for job in jobs:
        try:
            with Image.open(job.source):
                pass
        except OSError as error:
            raise CliError(f"Cannot read image {job.source}: {error}") from error


def load_model(name: str, device: str, trust_remote_code: bool) -> tuple[PreTrainedModel, BaseImageProcessor]:
    try:
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForSemanticSegmentation.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise CliError(f"Cannot load model {name}: {error}") from error
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


def segment(args: argparse.Namespace) -> int:
    """Run the command; returns the number of images segmented."""
    jobs = find_images(args.inputs, Path(args.output))
    kinds = ("labels", "overlay", "legend") + (("priors",) if args.save_priors else ())
    if not args.overwrite:
        check_outputs_free(jobs, kinds)
    check_images_readable(jobs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model(args.model, device, args.trust_remote_code)
    if args.save_priors and not getattr(model.config, "has_semantic_layers", False):
        raise CliError(f"--save-priors needs a SeMask model with semantic layers; {args.model} has none.")
    id2label = model.config.id2label
    palette = palette_for_labels(id2label)
    for job in tqdm(jobs, desc="Segmenting", unit="image"):
        image = open_image(job.source)
        label_map = predict_label_map(model, processor, image, args)
        job.output_stem.parent.mkdir(parents=True, exist_ok=True)
        label_map_image(label_map, len(id2label)).save(job.output("labels"))
        overlay_image(image, label_map, palette, args.alpha).save(job.output("overlay"))
        legend_image(label_map, palette, id2label).save(job.output("legend"))
        if args.save_priors:
            priors_image(model, processor, image, palette).save(job.output("priors"))
    return len(jobs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        count = segment(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Segmented {count} image(s) into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
