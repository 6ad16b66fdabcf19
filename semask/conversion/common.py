"""Conversion of original SeMask-FPN (mmsegmentation 0.x) checkpoints to semask `save_pretrained` folders.

    python scripts/convert_semask_original_to_hf.py --checkpoint semask_tiny_ade20k.pth --output semask-tiny-ade20k \
        --preset semask-tiny-fpn-ade20k [--push-to-hub me/semask-tiny-fpn-ade20k [--private]]

SeMask-Mask2Former (detectron2) checkpoints are recognised by their keys and converted by
`semask.conversion_mask2former`, through the same command.

The output folder holds the weights, the config, the model code, the image processor of the preset's dataset (the
original test pipeline) and a model card.

The weights fix the Swin architecture, the class count, the semantic blocks per stage and the decoder width.
What they do not fix comes from the preset, from the overrides, or from the original's rules: the semantic window
equals the Swin window, and the semantic attention kind follows `semask.presets.fpn_semantic_attention`.
"""

import argparse
import os
import pickle
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForSemanticSegmentation, PreTrainedConfig, PreTrainedModel

from .configuration_semask import SemaskConfig, settings_equal
from .configuration_semask_mask2former import SemaskMask2FormerConfig
from .image_processing_semask import SemaskImageProcessor
from .label_files import LabelsFileError, read_labels_file
from .modelcard import preset_dataset, preset_mismatches, write_model_card
from .modeling_semask import SemaskForSemanticSegmentation
from .presets import (
    MASK2FORMER_PRESET_NAMES,
    MASK2FORMER_PROCESSING,
    PRESET_NAMES,
    fpn_preset,
    fpn_semantic_attention,
    mask2former_preset_dataset,
)

# (original key pattern, semask key template); the fused `qkv` projection is split separately.
KEY_RENAMES = [
    (r"backbone\.patch_embed\.proj\.", "semask.embeddings.patch_embeddings.projection."),
    (r"backbone\.patch_embed\.norm\.", "semask.embeddings.norm."),
    (r"backbone\.absolute_pos_embed$", "semask.embeddings.position_embeddings"),
    (r"backbone\.norm(\d+)\.", lambda m: f"semask.hidden_states_norms.stage{int(m.group(1)) + 1}."),
    (r"backbone\.layers\.", "semask.encoder.layers."),
    (r"\.semantic_layer\.norm1\.", ".semantic_layer.layernorm."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.attn\.proj\.", ".attention.o_proj."),
    (r"\.attn\.relative_position_bias_table$", ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.class_injection\.", ".blocks."),
    (r"\.mlp_cls_q\.", ".q_proj."),
    (r"\.mlp_cls_k\.", ".k_proj."),
    (r"\.mlp_v\.", ".v_proj."),
    (r"\.mlp_res\.", ".o_proj."),
    (r"(decode_head\.scale_heads\.\d+\.\d+)\.bn\.", r"\1.batch_norm."),
    (r"decode_head\.conv_seg\.", "decode_head.classifier."),
]
# Buffers the original saves that semask rebuilds from the config.
DROPPED_KEYS = re.compile(r"\.attn\.relative_position_index$")
QKV_KEY = re.compile(r"(.*)\.attn\.qkv\.(weight|bias)$")
LISTED_KEYS = 5  # keys named in the non-finite weights error


class ConversionError(ValueError):
    """An input the converter cannot use (checkpoint file, weights); `semask-convert` prints it as is."""


class CheckpointMismatchError(ConversionError):
    """The checkpoint's weights do not fit the SeMask model described by its configuration."""


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an original checkpoint without unpickling code: ``{'state_dict': ...}`` (mmsegmentation),
    ``{'model': ...}`` (detectron2) or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refuses anything but tensors and plain containers
        raise ConversionError(
            f"Cannot read checkpoint {path}: it holds pickled objects other than weights (possibly code), which are "
            "never loaded; save the state dict alone."
        ) from error
    except Exception as error:  # torch.load fails with many types (EOFError, KeyError, RuntimeError, ...) on bad files
        detail = str(error).split(". ")[0]
        raise ConversionError(
            f"Cannot read checkpoint {path}: not a PyTorch checkpoint, or truncated "
            f"({type(error).__name__}{': ' + detail if detail else ''})"
        ) from error
    state_dict = None
    if isinstance(checkpoint, dict):
        state_dict = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state_dict, dict) or not any(key.startswith("backbone.") for key in state_dict):
        raise CheckpointMismatchError(
            f"{path} is not an original SeMask-FPN checkpoint (a state dict with `backbone.*` and `decode_head.*` "
            "keys, or a dict holding one under 'state_dict') nor a SeMask-Mask2Former one (`backbone.*` and "
            "`sem_seg_head.*` keys, under 'model')."
        )
    return state_dict


def check_finite(state_dict: dict[str, torch.Tensor]) -> None:
    """Raise `ConversionError` naming the (first few) keys whose weights hold NaN or infinite values."""
    bad = [
        key
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not value.is_meta
        and not torch.isfinite(value).all()
    ]
    if bad:
        names = ", ".join(bad[:LISTED_KEYS]) + (", ..." if len(bad) > LISTED_KEYS else "")
        raise ConversionError(f"The checkpoint has NaN or infinite weights in {len(bad)} tensor(s): {names}")


def is_mask2former_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether an original state dict is a SeMask-Mask2Former (detectron2) one rather than a SeMask-FPN one."""
    return any(key.startswith("sem_seg_head.") for key in state_dict)


def _require(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointMismatchError(
            f"The checkpoint lacks `{key}`, which every original SeMask checkpoint of its kind has."
        )
    return state_dict[key]


def _indices(state_dict: dict[str, torch.Tensor], pattern: str) -> list[int]:
    found = {int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))}
    return sorted(found)


def infer_encoder_kwargs(state_dict: dict[str, torch.Tensor]) -> dict:
    """The `SemaskConfig` encoder arguments that the original `backbone.*` weights determine (no label set)."""
    projection = _require(state_dict, "backbone.patch_embed.proj.weight")
    embed_dim, num_channels, patch_size = projection.shape[0], projection.shape[1], projection.shape[2]
    stages = _indices(state_dict, r"backbone\.layers\.(\d+)\.")
    depths = [len(_indices(state_dict, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.")) for i in stages]
    tables = [_require(state_dict, f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in stages]
    window_size = (round(tables[0].shape[0] ** 0.5) + 1) // 2
    mlp_hidden = _require(state_dict, "backbone.layers.0.blocks.0.mlp.fc1.weight").shape[0]
    semantic_blocks = [
        len(_indices(state_dict, rf"backbone\.layers\.{i}\.semantic_layer\.class_injection\.(\d+)\.")) for i in stages
    ]
    kwargs = {
        "embed_dim": embed_dim,
        "num_channels": num_channels,
        "patch_size": patch_size,
        "depths": depths,
        "num_heads": [table.shape[1] for table in tables],
        "window_size": window_size,
        "mlp_ratio": mlp_hidden / embed_dim,
        "qkv_bias": "backbone.layers.0.blocks.0.attn.qkv.bias" in state_dict,
        "patch_norm": "backbone.patch_embed.norm.weight" in state_dict,
        "use_absolute_embeddings": "backbone.absolute_pos_embed" in state_dict,
        "num_semantic_blocks": semantic_blocks,
    }
    if kwargs["use_absolute_embeddings"]:
        kwargs["image_size"] = state_dict["backbone.absolute_pos_embed"].shape[-1] * patch_size
    return kwargs


def check_label_count(state_dict: dict[str, torch.Tensor], num_labels: int, head: str) -> None:
    """Raise `CheckpointMismatchError` unless the semantic layers (if any) predict the head's `num_labels` classes."""
    prior_key = "backbone.layers.0.semantic_layer.class_injection.0.mlp_cls_q.weight"
    if prior_key in state_dict and state_dict[prior_key].shape[0] != num_labels:
        raise CheckpointMismatchError(
            f"The semantic layers predict {state_dict[prior_key].shape[0]} classes but the {head} {num_labels}; "
            "semask needs one label set for both."
        )


def infer_config_kwargs(state_dict: dict[str, torch.Tensor]) -> dict:
    """The `SemaskConfig` arguments that the original SeMask-FPN weights determine."""
    classifier = _require(state_dict, "decode_head.conv_seg.weight")
    check_label_count(state_dict, classifier.shape[0], "decode head")
    return {
        **infer_encoder_kwargs(state_dict),
        "decoder_hidden_size": classifier.shape[1],
        "num_labels": classifier.shape[0],
    }


def raise_on_contradictions(chosen: dict, inferred: dict, num_labels: int) -> None:
    """Raise `CheckpointMismatchError` where chosen settings (preset, overrides) contradict the inferred ones."""
    contradictions = {
        key: (value, inferred[key])
        for key, value in chosen.items()
        if key in inferred and not settings_equal(value, inferred[key])
    }
    if "id2label" in chosen and len(chosen["id2label"]) != num_labels:
        contradictions["num_labels"] = (len(chosen["id2label"]), num_labels)
    if contradictions:
        details = ", ".join(
            f"{key}: given {given}, checkpoint {found}" for key, (given, found) in contradictions.items()
        )
        raise CheckpointMismatchError(f"The checkpoint does not match the requested configuration ({details}).")


def config_from_original(state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides) -> SemaskConfig:
    """A `SemaskConfig` for an original checkpoint: inferred from the weights, then the preset, then `overrides`.

    A preset (or an override) that contradicts the weights raises `CheckpointMismatchError`.
    """
    inferred = infer_config_kwargs(state_dict)
    num_labels = inferred.pop("num_labels")
    if preset in MASK2FORMER_PRESET_NAMES:
        raise CheckpointMismatchError(f"{preset} is a SeMask-Mask2Former preset but this is a SeMask-FPN checkpoint.")
    chosen = {**(fpn_preset(preset) if preset else {}), **overrides}
    raise_on_contradictions(chosen, inferred, num_labels)
    kwargs = {
        "semantic_window_size": inferred["window_size"],
        "semantic_attention": fpn_semantic_attention(inferred["embed_dim"], num_labels, len(inferred["depths"])),
        "id2label": {index: f"LABEL_{index}" for index in range(num_labels)},
        **chosen,
        **inferred,
    }
    return SemaskConfig(**kwargs)


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original keys to semask keys and split each fused `qkv` projection into q/k/v."""
    converted = {}
    for key, value in state_dict.items():
        if DROPPED_KEYS.search(key):
            continue
        if qkv := QKV_KEY.match(key):
            prefix, kind = qkv.groups()
            prefix = _rename(prefix + ".")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{prefix}attention.{name}.{kind}"] = part.clone()
            continue
        if key == "backbone.absolute_pos_embed":
            value = value.flatten(2).transpose(1, 2)
        converted[_rename(key)] = value
    return converted


def _rename(key: str) -> str:
    for pattern, replacement in KEY_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def check_state_dict(converted: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise `CheckpointMismatchError` listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    misshaped = sorted(
        f"{key}: checkpoint {tuple(converted[key].shape)}, model {tuple(expected[key].shape)}"
        for key in set(expected) & set(converted)
        if converted[key].shape != expected[key].shape
    )
    problems = [
        (title, keys)
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        lines = [f"{len(keys)} {title} key(s):\n  " + "\n  ".join(keys) for title, keys in problems]
        raise CheckpointMismatchError("The checkpoint does not match the SeMask model:\n" + "\n".join(lines))


def convert_original_checkpoint(
    state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides
) -> PreTrainedModel:
    """The semask model (eval mode) holding the weights of an original state dict: `SemaskForSemanticSegmentation`
    for SeMask-FPN, `SemaskMask2FormerForUniversalSegmentation` for SeMask-Mask2Former (`sem_seg_head.*` keys).
    Non-finite weights raise `ConversionError`."""
    check_finite(state_dict)
    if is_mask2former_state_dict(state_dict):
        from .conversion_mask2former import convert_mask2former_checkpoint  # that module builds on this one

        return convert_mask2former_checkpoint(state_dict, preset, **overrides)
    config = config_from_original(state_dict, preset, **overrides)
    converted = convert_state_dict(state_dict)
    model = SemaskForSemanticSegmentation(config)
    check_state_dict(converted, model)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_checkpoint_file(
    checkpoint: str | Path,
    output_dir: str | Path,
    preset: str | None = None,
    *,
    model_id: str | None = None,
    **overrides,
) -> PreTrainedModel:
    """Convert an original checkpoint file into a new folder (model, image processor, model card), all or nothing.

    `output_dir` must not exist or be an empty folder; it is filled only once the conversion has succeeded.
    The image processor is the original test pipeline of the preset's dataset (without a preset: the ADE20K one) for
    the checkpoint's kind (SeMask-FPN or SeMask-Mask2Former, told apart by the keys).
    The card reports the preset's original numbers unless overrides changed the released architecture or labels.
    `model_id` names the model in the card's usage snippets (default: the folder's name).
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


def original_test_processor(config: PreTrainedConfig, preset: str | None) -> SemaskImageProcessor:
    """The original test pipeline of the preset's dataset (without a preset: ADE20K's) for the model's kind."""
    if isinstance(config, SemaskMask2FormerConfig):
        return SemaskImageProcessor(
            **MASK2FORMER_PROCESSING[mask2former_preset_dataset(preset) if preset else "ade20k"]
        )
    return SemaskImageProcessor.from_dataset(preset_dataset(preset)) if preset else SemaskImageProcessor()


def push_converted_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a converted folder to the Hub: model and image processor with their `push_to_hub`, then the model card.

    Returns the full repository id (with the namespace `create_repo` resolved).
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
    parser = argparse.ArgumentParser(
        description="Convert an original SeMask-FPN or SeMask-Mask2Former checkpoint to a semask model folder."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="original checkpoint (.pth): mmsegmentation (FPN) or detectron2 (Mask2Former)",
    )
    parser.add_argument("--output", required=True, help="new folder for the converted model")
    parser.add_argument(
        "--preset",
        choices=PRESET_NAMES + MASK2FORMER_PRESET_NAMES,
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
    parser.add_argument("--labels", help="JSON file with the class names, as a list or an {index: name} object")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub REPO")
    return args


def overrides_from_args(args: argparse.Namespace) -> dict:
    overrides = {}
    if args.semantic_attention:
        overrides["semantic_attention"] = args.semantic_attention.split(",")
    if args.semantic_window_size:
        overrides["semantic_window_size"] = args.semantic_window_size
    if args.labels:
        overrides["id2label"] = read_labels_file(args.labels)
    return overrides


def main(argv: list[str] | None = None) -> int:
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
