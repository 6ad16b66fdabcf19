"""Conversion of original SeMask checkpoints to semask `save_pretrained` folders, and `semask-convert`.

    python scripts/convert_semask_original_to_hf.py --checkpoint semask_tiny_ade20k.pth --output semask-tiny-ade20k \\
        --preset semask-tiny-fpn-ade20k [--push-to-hub me/semask-tiny-fpn-ade20k [--private]]

SeMask-FPN (mmsegmentation) checkpoints are converted by `semask.conversion.fpn`; the detectron2 ones, recognised by
their `sem_seg_head.*` keys, by `semask.conversion.maskformer` (SeMask-MaskFormer: a DETR decoder) or
`semask.conversion.mask2former` (SeMask-Mask2Former, with any of its pixel decoders); all build on
`semask.conversion.common`. A preset of another kind than the checkpoint is refused (`check_preset_kind`).
The output folder holds the weights, the config, the model code, the image processor of the preset's dataset (the
original test pipeline) and a model card.
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForSemanticSegmentation, PreTrainedModel

from ..image_processing_semask import SemaskImageProcessor
from ..label_files import LabelsFileError, read_labels_file
from ..modelcard import preset_mismatches, write_model_card
from ..presets import MASK2FORMER_PRESET_NAMES, MASKFORMER_PRESET_NAMES, PRESET_NAMES
from .common import (
    CheckpointMismatchError,
    ConversionError,
    check_finite,
    load_original_state_dict,
    original_test_processor,
)
from .fpn import convert_fpn_checkpoint
from .mask2former import FAPN_DETECTION_KEY, convert_mask2former_checkpoint, original_pixel_decoder
from .maskformer import MASKFORMER_DETECTION_KEY, convert_maskformer_checkpoint

# model kind -> (its name, its presets, its converter)
MODEL_KINDS = {
    "fpn": ("SeMask-FPN", PRESET_NAMES, convert_fpn_checkpoint),
    "mask2former": ("SeMask-Mask2Former", MASK2FORMER_PRESET_NAMES, convert_mask2former_checkpoint),
    "maskformer": ("SeMask-MaskFormer", MASKFORMER_PRESET_NAMES, convert_maskformer_checkpoint),
}

__all__ = [
    "CheckpointMismatchError",
    "ConversionError",
    "convert_checkpoint_file",
    "convert_original_checkpoint",
    "load_original_state_dict",
    "main",
    "push_converted_folder",
]


def convert_original_checkpoint(
    state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides
) -> PreTrainedModel:
    """The semask model (eval mode) holding the weights of an original state dict.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            An original SeMask-FPN state dict, or a SeMask-Mask2Former one (`sem_seg_head.*` keys).
        preset (`str`, *optional*):
            The released model's preset: label names and semantic settings.
        overrides (`dict`, *optional*):
            Config arguments over the preset's (`id2label`, `semantic_attention`, `semantic_window_size`, ...).

    Returns:
        `PreTrainedModel`: a `SemaskForSemanticSegmentation` or `SemaskMask2FormerForUniversalSegmentation`.

    Raises:
        `ConversionError` for non-finite weights; `CheckpointMismatchError` for settings or keys that do not fit.
    """
    check_finite(state_dict)
    kind = original_model_kind(state_dict)
    if preset is not None:
        check_preset_kind(state_dict, kind, preset)
    return MODEL_KINDS[kind][2](state_dict, preset, **overrides)


def original_model_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """The kind of an original state dict: "fpn" (mmsegmentation), "maskformer" (detectron2, a DETR decoder) or
    "mask2former" (detectron2, any other `sem_seg_head.*`)."""
    if not any(key.startswith("sem_seg_head.") for key in state_dict):
        return "fpn"
    return "maskformer" if MASKFORMER_DETECTION_KEY in state_dict else "mask2former"


def check_preset_kind(state_dict: dict[str, torch.Tensor], kind: str, preset: str) -> None:
    """Raise `CheckpointMismatchError` when `preset` is not one of the checkpoint kind's presets, naming the
    checkpoint keys that tell its kind."""
    name, presets, _ = MODEL_KINDS[kind]
    if preset in presets:
        return
    preset_name = next(kind_name for kind_name, names, _ in MODEL_KINDS.values() if preset in names)
    if kind == "fpn":
        evidence = [key for key in state_dict if key.startswith("decode_head.")][:1] or ["no `sem_seg_head.*` keys"]
    elif kind == "maskformer":
        evidence = [MASKFORMER_DETECTION_KEY]
    elif original_pixel_decoder(state_dict) != "msdeformattn":
        name += f" ({original_pixel_decoder(state_dict)} pixel decoder)"
        evidence = [FAPN_DETECTION_KEY]
    else:
        evidence = [key for key in state_dict if key.startswith("sem_seg_head.predictor.")][:1]
    raise CheckpointMismatchError(
        f"{preset} is a {preset_name} preset but this is a {name} checkpoint (it has {', '.join(evidence)}); use "
        f"one of: {', '.join(presets) or 'no preset'}."
    )


def convert_checkpoint_file(
    checkpoint: str | Path,
    output_dir: str | Path,
    preset: str | None = None,
    *,
    model_id: str | None = None,
    **overrides,
) -> PreTrainedModel:
    """Convert an original checkpoint file into a new folder (model, image processor, model card), all or nothing.

    Args:
        checkpoint (`str` or `Path`):
            The original checkpoint file (SeMask-FPN or SeMask-Mask2Former, told apart by the keys).
        output_dir (`str` or `Path`):
            A folder that does not exist or is empty; it is filled only once the conversion has succeeded.
        preset (`str`, *optional*):
            The released model's preset. Its dataset's original test pipeline (without a preset: ADE20K's) is the
            image processor, and the card reports its original numbers unless overrides changed the released
            architecture or labels.
        model_id (`str`, *optional*):
            The model's name in the card's usage snippets (default: the folder's name).
        overrides (`dict`, *optional*):
            As for `convert_original_checkpoint`.

    Returns:
        `PreTrainedModel`: the converted model.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} already exists and is not an empty folder; choose a new output folder.")
    model = convert_original_checkpoint(load_original_state_dict(checkpoint), preset, **overrides)
    processor = original_test_processor(model.config, preset)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.")
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        card_preset = preset if preset and not preset_mismatches(model.config, preset) else None
        write_model_card(staging, model.config, preset=card_preset, model_id=model_id or output_dir.name)
        os.replace(staging, output_dir)  # atomic; replaces an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model


def push_converted_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a converted folder to the Hub: model and image processor with their `push_to_hub`, then the model card.

    Args:
        folder (`str` or `Path`):
            A folder written by `convert_checkpoint_file`.
        repo_id (`str`):
            The Hub repository, created if needed.
        private (`bool`, *optional*, defaults to `False`):
            Whether a new repository is private.

    Returns:
        `str`: the full repository id (with the namespace `create_repo` resolved).
    """
    folder = Path(folder)
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    model = AutoModelForSemanticSegmentation.from_pretrained(folder)  # semask registers both of its kinds
    model.push_to_hub(repo_id, commit_message="Upload SeMask model")
    SemaskImageProcessor.from_pretrained(folder).push_to_hub(repo_id, commit_message="Upload SeMask image processor")
    # `push_to_hub` above writes transformers' generic card when the repository has none; replace it with ours.
    api.upload_file(
        path_or_fileobj=folder / "README.md", path_in_repo="README.md", repo_id=repo_id, commit_message="Add model card"
    )
    return repo_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The `semask-convert` arguments (`argv`, default: the command line's)."""
    parser = argparse.ArgumentParser(
        description="Convert an original SeMask-FPN, SeMask-MaskFormer or SeMask-Mask2Former checkpoint to a semask "
        "model folder."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="original checkpoint (.pth): mmsegmentation (FPN) or detectron2 (MaskFormer, Mask2Former)",
    )
    parser.add_argument("--output", required=True, help="new folder for the converted model")
    parser.add_argument(
        "--preset",
        choices=PRESET_NAMES + MASK2FORMER_PRESET_NAMES + MASKFORMER_PRESET_NAMES,
        help="released model: label names and semantic settings",
    )
    parser.add_argument(
        "--semantic-attention",
        help="comma-separated kind per stage, e.g. windowed,windowed,global,global (default: the original's rule)",
    )
    parser.add_argument(
        "--semantic-window-size",
        type=int,
        help="semantic attention window (default: the Swin window for FPN, 7 for Mask2Former, as the originals)",
    )
    parser.add_argument(
        "--decoder-attention-heads",
        type=int,
        help="transformer decoder heads (NHEADS), which the weights of SeMask-MaskFormer and of SeMask-Mask2Former "
        "with the FaPN decoder do not fix (default 8, the original's)",
    )
    parser.add_argument("--labels", help="JSON file with the class names, as a list or an {index: name} object")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub REPO")
    return args


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The config overrides that the `semask-convert` arguments ask for (label names read by `read_labels_file`)."""
    overrides = {}
    if args.semantic_attention:
        overrides["semantic_attention"] = args.semantic_attention.split(",")
    if args.semantic_window_size:
        overrides["semantic_window_size"] = args.semantic_window_size
    if args.decoder_attention_heads:
        overrides["decoder_attention_heads"] = args.decoder_attention_heads
    if args.labels:
        overrides["id2label"] = read_labels_file(args.labels)
    return overrides


def main(argv: list[str] | None = None) -> int:
    """`semask-convert`: convert (and optionally upload) a checkpoint; 1 with a one-line error when that fails."""
    args = parse_args(argv)
    try:
        model = convert_checkpoint_file(
            args.checkpoint, args.output, args.preset, model_id=args.push_to_hub, **overrides_from_args(args)
        )
    except (ConversionError, LabelsFileError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except StrictDataclassError as error:  # the config refuses the settings, e.g. an unknown --semantic-attention
        print(f"error: invalid model settings: {error.__cause__ or error}", file=sys.stderr)
        return 1
    config = model.config
    encoder = getattr(config, "backbone_config", config)
    print(
        f"Wrote {args.output}: {type(model).__name__} embed_dim={encoder.embed_dim} depths={list(encoder.depths)} "
        f"labels={config.num_labels} semantic_attention={list(encoder.semantic_attention)}"
    )
    if args.push_to_hub:
        try:
            repo_id = push_converted_folder(args.output, args.push_to_hub, private=args.private)
        except OSError as error:  # includes the Hub's HTTP errors and offline mode
            print(
                f"error: {args.output} was written but the upload to {args.push_to_hub} failed: {error}",
                file=sys.stderr,
            )
            return 1
        print(f"Pushed to https://huggingface.co/{repo_id}")
    return 0
