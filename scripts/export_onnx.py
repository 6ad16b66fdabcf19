"""Export a saved SeMask-FPN model (SemaskForSemanticSegmentation) to ONNX, with a dynamic batch size, height and
width: input `pixel_values`, outputs `logits` and `semantic_logits` at stride 4 (see `semask.export`)."""

import argparse
import sys
from pathlib import Path

from semask import SemaskForSemanticSegmentation
from semask.export import export_onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="model folder or Hub id saved from SemaskForSemanticSegmentation")
    parser.add_argument("output", type=Path, help="the .onnx file to write")
    parser.add_argument("--example-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help="size to trace at")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: torch.onnx's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    model = SemaskForSemanticSegmentation.from_pretrained(args.model).eval()
    export_onnx(model, args.output, example_size=args.example_size, opset=args.opset, overwrite=args.overwrite)
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
