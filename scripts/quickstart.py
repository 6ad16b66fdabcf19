"""Segment a generated image with a randomly initialised SeMask preset and save the label map as a PNG.

    python scripts/quickstart.py [--preset semask-tiny-fpn-ade20k] [--size 512] [--output quickstart-output]

Random weights give random classes: this shows the API and the output shapes, not a trained model.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from semask import SemaskConfig, SemaskForSemanticSegmentation

IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def generated_image(height: int, width: int) -> np.ndarray:
    """An RGB picture of a sky gradient, a disc and a stripe, as uint8 (height, width, 3)."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), dtype=np.float32)
    image[..., 2] = 255 * (1 - rows / height)
    image[..., 1] = 120
    disc = (rows - height / 2) ** 2 + (cols - width / 3) ** 2 < (min(height, width) / 5) ** 2
    image[disc] = (220, 40, 40)
    image[(rows > 0.8 * height) & (cols % 32 < 16)] = (60, 60, 60)
    return image.astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="semask-tiny-fpn-ade20k", choices=SemaskConfig.preset_names)
    parser.add_argument("--size", type=int, default=512, help="image height; the width is 4/3 of it")
    parser.add_argument("--output", default="quickstart-output", help="folder for the input and label-map PNGs")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = SemaskForSemanticSegmentation(SemaskConfig.from_preset(args.preset)).eval()
    image = generated_image(args.size, args.size * 4 // 3)
    pixel_values = torch.from_numpy((image - IMAGENET_MEAN) / IMAGENET_STD).permute(2, 0, 1)[None]

    start = time.perf_counter()
    with torch.no_grad():
        outputs = model(pixel_values)
    seconds = time.perf_counter() - start
    logits = F.interpolate(outputs.logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    prediction = logits.argmax(1)[0]

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(output / "input.png")
    Image.fromarray(prediction.numpy().astype(np.uint8)).save(output / "prediction.png")

    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random weights")
    print(f"input {tuple(pixel_values.shape)} -> logits {tuple(outputs.logits.shape)} in {seconds:.2f} s")
    print("semantic priors:", [tuple(prior.shape) for prior in outputs.semantic_priors])
    classes, counts = prediction.unique(return_counts=True)
    top = sorted(zip(counts.tolist(), classes.tolist()), reverse=True)[:5]
    print("most frequent predicted classes:", ", ".join(f"{model.config.id2label[c]} ({n} px)" for n, c in top))
    print(f"wrote {output / 'input.png'} and {output / 'prediction.png'}")


if __name__ == "__main__":
    main()
