"""Shared test set-up: offline Hub, a private HF cache, tiny configurations and the original fixtures."""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SEMASK_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
FPN_FIXTURES = FIXTURES / "original_semask_fpn"
FPN_FIXTURE_NAMES = ("tiny-windowed", "tiny-globalsem")
MASK2FORMER_FIXTURES = FIXTURES / "original_semask_mask2former"


def pytest_configure(config):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HOME", str(config.rootpath / ".test-cache" / "hf_home"))  # no ".py" in it: see evaluate
    torch.set_num_threads(min(torch.get_num_threads(), 2))


def load_script(name: str) -> ModuleType:
    """A command-line script of `scripts/`, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fpn_fixture_dir(name: str) -> Path:
    """An original SeMask-FPN fixture folder (see `fixture_dir`)."""
    return fixture_dir(FPN_FIXTURES / name)


def mask2former_fixture_dir(name: str) -> Path:
    """An original SeMask-Mask2Former fixture folder (see `fixture_dir`)."""
    return fixture_dir(MASK2FORMER_FIXTURES / name)


def fixture_dir(folder: Path) -> Path:
    """The fixture folder; skipped when absent, but a failure under CI (CI=true), where it must exist."""
    if not (folder / "io.safetensors").is_file():
        message = f"original SeMask fixtures not found at {folder} (set SEMASK_FIXTURES to their folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return folder


def tiny_config_kwargs(**overrides) -> dict:
    """The demo model's SeMask (`TINY_CONFIG`) made smaller for CPU tests, with 5 labels, global semantic attention
    in the last two stages and the default stochastic depth."""
    # Imported here, not above: importing semask reads HF_HOME and HF_HUB_OFFLINE, which `pytest_configure` sets.
    from semask.training import TINY_CONFIG

    demo = {key: value for key, value in TINY_CONFIG.items() if key != "drop_path_rate"}
    return {
        **demo,
        "embed_dim": 16,
        "num_heads": (1, 2, 2, 4),
        "decoder_hidden_size": 16,
        "semantic_attention": ("windowed", "windowed", "global", "global"),
        "id2label": {0: "sky", 1: "road", 2: "tree", 3: "car", 4: "person"},
        **overrides,
    }


def tiny_mask2former_config_kwargs(**overrides) -> dict:
    """The demo SeMask-Mask2Former (`TINY_MASK2FORMER_CONFIG`) made smaller for CPU tests: the encoder of
    `tiny_config_kwargs`, narrower feed-forward layers, fewer queries and points."""
    from semask.training import TINY_MASK2FORMER_CONFIG  # imported here: see `tiny_config_kwargs`

    encoder = {key: value for key, value in tiny_config_kwargs().items() if key != "decoder_hidden_size"}
    return {
        **TINY_MASK2FORMER_CONFIG,
        "backbone_config": encoder,
        "id2label": encoder["id2label"],
        "encoder_feedforward_dim": 32,
        "dim_feedforward": 32,
        "num_queries": 6,
        "train_num_points": 64,
        **overrides,
    }


def tiny_maskformer_config_kwargs(**overrides) -> dict:
    """The demo SeMask-MaskFormer (`TINY_MASKFORMER_CONFIG`) made smaller for CPU tests: the encoder of
    `tiny_config_kwargs`, a narrower feed-forward layer and fewer queries."""
    from semask.training import TINY_MASKFORMER_CONFIG  # imported here: see `tiny_config_kwargs`

    encoder = {key: value for key, value in tiny_config_kwargs().items() if key != "decoder_hidden_size"}
    decoder = {**TINY_MASKFORMER_CONFIG["decoder_config"], "decoder_ffn_dim": 32, "num_queries": 6}
    return {
        **TINY_MASKFORMER_CONFIG,
        "backbone_config": encoder,
        "decoder_config": decoder,
        "id2label": encoder["id2label"],
        **overrides,
    }


def tiny_mit_config_kwargs(**overrides) -> dict:
    """A SeMask-MiT smaller than the demo's (`TINY_MIT_CONFIG`) for CPU tests: 5 labels, windowed semantic attention
    (window 4) in stages 1-2, global in 3-4."""
    return {
        "hidden_sizes": (8, 16, 24, 32),
        "depths": (1, 2, 1, 1),
        "num_attention_heads": (1, 1, 2, 2),
        "decoder_hidden_size": 16,
        "id2label": {0: "sky", 1: "road", 2: "tree", 3: "car", 4: "person"},
        "semantic_window_size": 4,
        "semantic_attention": ("windowed", "windowed", "global", "global"),
        **overrides,
    }


def assert_mask_classification_outputs_match(outputs, expected: dict, num_aux: int, tolerance: dict) -> None:
    """Compare a mask classification model's outputs (run with hidden states and auxiliary logits) with an original
    fixture's: encoder features and priors, mask features, final and earlier predictions, semantic head."""
    for index, stage in enumerate(("res2", "res3", "res4", "res5")):
        torch.testing.assert_close(outputs.encoder_hidden_states[index], expected[f"backbone.{stage}"], **tolerance)
        torch.testing.assert_close(outputs.semantic_priors[index], expected[f"semantic_priors.{index}"], **tolerance)
    torch.testing.assert_close(outputs.pixel_decoder_last_hidden_state, expected["mask_features"], **tolerance)
    torch.testing.assert_close(outputs.class_queries_logits, expected["pred_logits"], **tolerance)
    torch.testing.assert_close(outputs.masks_queries_logits, expected["pred_masks"], **tolerance)
    assert len(outputs.auxiliary_logits) == num_aux
    for index, auxiliary in enumerate(outputs.auxiliary_logits):
        torch.testing.assert_close(auxiliary["class_queries_logits"], expected[f"aux.{index}.pred_logits"], **tolerance)
        torch.testing.assert_close(auxiliary["masks_queries_logits"], expected[f"aux.{index}.pred_masks"], **tolerance)
    torch.testing.assert_close(outputs.semantic_logits, expected["sem_predictions"], **tolerance)


def train_steps(model: torch.nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor, steps: int) -> list[float]:
    """Train `model` on one batch with AdamW (lr 1e-3) for `steps` steps; the losses, step by step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def exif_rotated_jpeg(path, orientation: int = 6) -> np.ndarray:
    """Save a 30x40 (HxW) JPEG tagged with an EXIF orientation; returns the upright pixels as decoded."""
    array = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(array).save(path, exif=exif, quality=95)
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image))
