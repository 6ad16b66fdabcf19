"""Auto classes, save / load round trips, remote code without semask, and SeMask as a UperNet backbone."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForSemanticSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from conftest import tiny_config_kwargs, train_steps
from semask import SemaskBackbone, SemaskConfig, SemaskForSemanticSegmentation, SemaskModel


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A saved tiny SemaskForSemanticSegmentation with non-zero semantic gates, plus a fixed input."""
    torch.manual_seed(0)
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(0.7)
    folder = tmp_path_factory.mktemp("saved") / "semask-tiny"
    model.save_pretrained(folder)
    pixel_values = torch.randn(1, 3, 44, 52)
    torch.save(pixel_values, folder.parent / "pixel_values.pt")
    with torch.no_grad():
        torch.save(model(pixel_values).logits, folder.parent / "logits.pt")
    return model, folder, pixel_values


def test_save_load_round_trip(saved_model):
    model, folder, pixel_values = saved_model
    reloaded = SemaskForSemanticSegmentation.from_pretrained(folder)
    assert not reloaded.training
    for (name, expected), (_, actual) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits)
    assert reloaded.config.id2label == model.config.id2label
    assert reloaded.config.semantic_attention == ["windowed", "windowed", "global", "global"]


def test_saved_folder_has_code_weights_and_auto_map(saved_model):
    _, folder, _ = saved_model
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_semask.py", "modeling_semask.py", "presets.py"} <= names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_semask.SemaskConfig",
        "AutoModel": "modeling_semask.SemaskModel",
        "AutoModelForSemanticSegmentation": "modeling_semask.SemaskForSemanticSegmentation",
        "AutoBackbone": "modeling_semask.SemaskBackbone",
    }


def test_auto_classes_resolve_to_semask(saved_model):
    model, folder, pixel_values = saved_model
    assert type(AutoConfig.from_pretrained(folder)) is SemaskConfig
    assert type(AutoModel.from_pretrained(folder)) is SemaskModel
    segmenter = AutoModelForSemanticSegmentation.from_pretrained(folder)
    assert type(segmenter) is SemaskForSemanticSegmentation
    assert type(AutoBackbone.from_config(model.config)) is SemaskBackbone

    backbone = SemaskBackbone.from_pretrained(folder, out_features=["stem", "stage2", "stage4"])
    with torch.no_grad():
        features = backbone(pixel_values).feature_maps
        encoder = model.semask(pixel_values, output_hidden_states=True)
    assert backbone.channels == [16, 32, 128]
    torch.testing.assert_close(features[1], encoder.feature_maps[1])
    torch.testing.assert_close(features[2], encoder.feature_maps[3])
    torch.testing.assert_close(features[0], encoder.hidden_states[0].transpose(1, 2).reshape(1, 16, 11, 13))


REMOTE_SCRIPT = """
import sys
sys.modules["semask"] = None  # semask is not importable in this process
try:
    import semask  # noqa: F401
    raise SystemExit("semask should not be importable here")
except ImportError:
    pass
import torch
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForSemanticSegmentation

folder = sys.argv[1]
try:
    AutoConfig.from_pretrained(folder)
    raise SystemExit("loading custom code without trust_remote_code should fail")
except ValueError as error:
    assert "trust_remote_code" in str(error), error
model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert type(model).__name__ == "SemaskForSemanticSegmentation"
pixel_values = torch.load(sys.argv[2])
with torch.no_grad():
    torch.testing.assert_close(model(pixel_values).logits, torch.load(sys.argv[3]), rtol=0, atol=0)
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "SemaskModel"
assert type(AutoBackbone.from_config(config, trust_remote_code=True)).__name__ == "SemaskBackbone"
print("remote code OK")
"""


def test_trust_remote_code_without_semask_gives_same_logits(saved_model, tmp_path):
    _, folder, _ = saved_model
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(REMOTE_SCRIPT),
            str(folder),
            *(str(folder.parent / n) for n in ("pixel_values.pt", "logits.pt")),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "remote code OK" in result.stdout


def test_upernet_trains_a_step_on_semask_backbone():
    torch.manual_seed(0)
    backbone_config = SemaskConfig(**tiny_config_kwargs())
    config = UperNetConfig(
        backbone_config=backbone_config, num_labels=5, hidden_size=32, auxiliary_in_channels=64, auxiliary_channels=16
    )
    model = UperNetForSemanticSegmentation(config)
    assert type(model.backbone) is SemaskBackbone
    assert model.backbone.channels == [16, 32, 64, 128]
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 5, (2, 64, 64))
    before = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    losses = train_steps(model, pixel_values, labels, steps=3)
    assert losses[-1] < losses[0]
    changed = [name for name, p in model.backbone.named_parameters() if not torch.equal(p, before[name])]
    assert any("semantic_layer" in name for name in changed) and any("blocks" in name for name in changed)
