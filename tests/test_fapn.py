"""SeMask-Mask2Former's FaPN pixel decoder: DCNv2's offset / mask layout on torchvision's `deform_conv2d`, the
original's outputs, bad values, and training."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_mask2former_auto import run_remote_script, write_remote_inputs

from conftest import mask2former_fixture_dir, tiny_mask2former_config_kwargs, train_steps
from semask import SemaskImageProcessor, SemaskMask2FormerConfig, SemaskMask2FormerForUniversalSegmentation
from semask.conversion import CheckpointMismatchError, convert_original_checkpoint, load_original_state_dict
from semask.conversion.mask2former import convert_fapn_decoder_state_dict, convert_state_dict, original_pixel_decoder
from semask.modelcard import ORIGINAL_RESULTS, preset_mismatches
from semask.modeling_semask_fapn import (
    SemaskFaPNLevel,
    SemaskFaPNPixelDecoder,
    SemaskModulatedDeformConv,
    SemaskMSFaPNPixelDecoder,
)


def dcnv2_reference(inputs, offset, mask, weight, bias, groups):
    """DCNv2's modulated deformable 3x3 convolution (stride 1, padding 1) computed directly, as its kernel indexes:
    for deformable group g and kernel position k = 3 i + j, offset channel 2 (9 g + k) is the row (y) shift and
    2 (9 g + k) + 1 the column (x) shift, mask channel 9 g + k the modulation; input channels are split into
    `groups` consecutive blocks; samples are bilinear, reading 0 outside the map."""
    batch, channels, height, width = inputs.shape
    rows = torch.arange(height, dtype=inputs.dtype).view(1, height, 1)
    columns = torch.arange(width, dtype=inputs.dtype).view(1, 1, width)
    per_group = channels // groups
    sampled = inputs.new_zeros(batch, channels, 9, height, width)
    for g in range(groups):
        block = inputs[:, g * per_group : (g + 1) * per_group]
        for k in range(9):
            i, j = divmod(k, 3)
            y = rows - 1 + i + offset[:, 2 * (9 * g + k)]
            x = columns - 1 + j + offset[:, 2 * (9 * g + k) + 1]
            grid = torch.stack([2 * x / (width - 1) - 1, 2 * y / (height - 1) - 1], dim=-1)
            values = F.grid_sample(block, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            sampled[:, g * per_group : (g + 1) * per_group, k] = values * mask[:, 9 * g + k].unsqueeze(1)
    return torch.einsum("bckhw,ock->bohw", sampled, weight.flatten(2)) + bias.view(1, -1, 1, 1)


def random_deform_conv(channels: int = 16) -> SemaskModulatedDeformConv:
    torch.manual_seed(0)
    module = SemaskModulatedDeformConv(channels)
    with torch.no_grad():
        module.weight.normal_(std=0.2)
        module.bias.normal_()
        module.conv_offset_mask.weight.normal_(std=0.3)  # offsets of a few pixels, some beyond the map
        module.conv_offset_mask.bias.normal_()
    return module


def test_deform_conv_reads_offsets_and_mask_as_dcnv2_does():
    module = random_deform_conv()
    inputs, offset_features = torch.randn(2, 16, 7, 9), torch.randn(2, 16, 7, 9)
    with torch.no_grad():
        offset_y, offset_x, modulation = module.conv_offset_mask(offset_features).chunk(3, dim=1)
        offset = torch.cat([offset_y, offset_x], dim=1)  # the original DCN's layout of its predicted channels
        assert offset.abs().max() > 2  # samples really move, some off the map
        expected = dcnv2_reference(inputs, offset, modulation.sigmoid(), module.weight, module.bias, groups=8)
        torch.testing.assert_close(module(inputs, offset_features), expected, atol=1e-4, rtol=1e-4)
        # swapping the (y, x) pairs gives another result: the test tells the layouts apart
        swapped = offset.view(2, 8 * 9, 2, 7, 9).flip(2).flatten(1, 2)
        other = dcnv2_reference(inputs, swapped, modulation.sigmoid(), module.weight, module.bias, groups=8)
        assert (other - expected).abs().max() > 1e-2


def test_nan_and_huge_offsets_propagate_or_read_zero_instead_of_crashing():
    module = random_deform_conv()
    inputs, offset_features = torch.randn(1, 16, 5, 6), torch.randn(1, 16, 5, 6)
    offset_features[0, :, 2, 3] = float("nan")
    with torch.no_grad():
        outputs = module(inputs, offset_features)  # torchvision's kernel alone segfaults on these offsets
        assert outputs.isnan().any() and not outputs[..., 0, 0].isnan().any()
        module.conv_offset_mask.bias[: 2 * 8 * 9] = 1e30  # every sample far beyond the map: only the bias is left
        far = module(inputs, torch.randn(1, 16, 5, 6))
    torch.testing.assert_close(far, module.bias.view(1, -1, 1, 1).expand_as(far))


@pytest.fixture(scope="module")
def fapn_model() -> SemaskMask2FormerForUniversalSegmentation:
    torch.manual_seed(0)
    config = SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs(pixel_decoder="fapn"))
    return SemaskMask2FormerForUniversalSegmentation(config)


def test_fapn_model_initialises_as_the_original_and_trains(fapn_model, tmp_path):
    decoder = fapn_model.model.pixel_level_module.decoder
    assert isinstance(decoder, SemaskFaPNPixelDecoder)
    for level in decoder.levels:  # DCNv2's initialisation: no offset, modulation 0.5
        assert not level.deform_conv.conv_offset_mask.weight.any() and not level.deform_conv.bias.any()
    pixel_values, labels = torch.randn(2, 3, 67, 91), torch.randint(0, 5, (2, 67, 91))
    with torch.no_grad():
        outputs = fapn_model.eval()(pixel_values)
    assert outputs.masks_queries_logits.shape == (2, 6, 24, 24)  # padded to 96 x 96, stride 4
    losses = train_steps(fapn_model, pixel_values, labels, steps=8)
    assert losses[-1] < 0.95 * losses[0], losses
    fapn_model.save_pretrained(tmp_path)
    reloaded = SemaskMask2FormerForUniversalSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.pixel_decoder == "fapn"
    with torch.no_grad():
        expected = fapn_model.eval()(pixel_values).masks_queries_logits
        torch.testing.assert_close(reloaded(pixel_values).masks_queries_logits, expected)


def test_fapn_settings_are_checked():
    with pytest.raises(StrictDataclassClassValidationError, match="pixel_decoder` must be one of"):
        SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs(pixel_decoder="fpn"))
    with pytest.raises(StrictDataclassClassValidationError, match="multiple of 32"):
        SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs(pixel_decoder="fapn", feature_size=48))


FIXTURE = Path(__file__).parent / "fixtures" / "original_semask_fapn" / "pixel-decoder"


def test_original_dcn_case_is_reproduced():
    recorded = torch.load(FIXTURE / "dcn_reference.pt")
    state = {key.removeprefix("state_dict."): value for key, value in recorded.items() if key.startswith("state_dict.")}
    module = SemaskModulatedDeformConv(32)
    module.load_state_dict(state)
    with torch.no_grad():
        outputs = module(recorded["feature"], recorded["offset_input"])
        expected = dcnv2_reference(
            recorded["feature"], recorded["offset"], recorded["mask"], module.weight, module.bias, 8
        )
    torch.testing.assert_close(outputs, recorded["output"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(expected, recorded["output"], atol=1e-4, rtol=1e-4)  # the test's own reference too


def test_converted_original_pixel_decoder_reproduces_its_outputs():
    original_state = torch.load(FIXTURE / "state_dict.pt")
    inputs, expected = torch.load(FIXTURE / "inputs.pt"), torch.load(FIXTURE / "outputs.pt")
    decoder = SemaskFaPNPixelDecoder([16, 32, 64, 128], channels=32, mask_channels=32).eval()
    converted = convert_fapn_decoder_state_dict(original_state)
    assert len(converted) == len(original_state) - 6  # the offset convs' copies of the three shared norms
    decoder.load_state_dict(converted)  # strict: every weight, nothing left over
    with torch.no_grad():
        outputs = decoder(tuple(inputs[name] for name in ("res2", "res3", "res4", "res5")))
    torch.testing.assert_close(outputs.mask_features, expected["mask_features"], atol=1e-4, rtol=1e-4)
    assert len(outputs.multi_scale_features) == 3
    for index, features in enumerate(outputs.multi_scale_features):
        torch.testing.assert_close(features, expected[f"multi_scale_features.{index}"], atol=1e-4, rtol=1e-4)

    original_state["align_2.offset.norm.weight"] = original_state["align_2.offset.norm.weight"] + 1
    with pytest.raises(CheckpointMismatchError, match=r"align_2\.offset\.norm\.weight should equal"):
        convert_fapn_decoder_state_dict(original_state)


def original_fapn_key(key: str, num_levels: int = 4) -> list[str]:
    """The original `PixelFANDecoder` names of a `SemaskFaPNPixelDecoder` key (two for a level's shared norm)."""
    if key.startswith("mask_projection."):
        return ["mask_features." + key.removeprefix("mask_projection.")]
    if key.startswith("coarsest."):
        return [f"layer_{num_levels}." + key.removeprefix("coarsest.").replace("conv.weight", "weight")]
    _, index, part = key.split(".", 2)
    n = int(index) + 1
    if part.startswith("norm."):
        return [f"layer_{n}.{part}", f"align_{n}.offset.{part}"]
    renames = {"lateral.conv.weight": f"adapter_{n}.weight", "offset.weight": f"align_{n}.offset.weight"}
    renames |= {"output.weight": f"layer_{n}.weight"}
    if part in renames:
        return [renames[part]]
    if part.startswith("lateral.norm."):
        return [f"adapter_{n}." + part.removeprefix("lateral.")]
    return [f"align_{n}.dcpack_L2." + part.removeprefix("deform_conv.")]


def test_original_fapn_checkpoint_is_detected_and_converted_all_or_nothing():
    """A SeMask-Mask2Former checkpoint whose pixel decoder is an original `PixelFANDecoder` (the tiny-ade fixture's
    encoder and transformer decoder, a random FaPN decoder under the original names)."""
    original = load_original_state_dict(mask2former_fixture_dir("tiny-ade") / "original_checkpoint.pth")
    original = {key: value for key, value in original.items() if not key.startswith("sem_seg_head.pixel_decoder.")}
    torch.manual_seed(0)
    decoder = SemaskFaPNPixelDecoder([32, 64, 128, 256], channels=32, mask_channels=32)
    for key, value in decoder.state_dict().items():
        value = value.clone().normal_()
        for original_key in original_fapn_key(key):
            original["sem_seg_head.pixel_decoder." + original_key] = value
    model = convert_original_checkpoint(original)
    assert model.config.pixel_decoder == "fapn"
    converted = model.model.pixel_level_module.decoder
    assert isinstance(converted, SemaskFaPNPixelDecoder)
    expected = original["sem_seg_head.pixel_decoder.align_2.dcpack_L2.conv_offset_mask.weight"]
    torch.testing.assert_close(converted.levels[1].deform_conv.conv_offset_mask.weight, expected)
    del original["sem_seg_head.pixel_decoder.align_3.dcpack_L2.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"align_3|levels\.2\.deform_conv\.bias"):
        convert_original_checkpoint(original)


def test_fapn_model_runs_as_remote_code_in_the_pipeline(fapn_model, tmp_path):
    folder = tmp_path / "semask-mask2former-fapn-tiny"
    fapn_model.eval().save_pretrained(folder)
    SemaskImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, do_reduce_labels=False).save_pretrained(
        folder
    )
    assert (folder / "modeling_semask_fapn.py").is_file()
    write_remote_inputs(fapn_model, folder)
    report = run_remote_script(folder, "remote", tmp_path)
    assert report["model"].startswith("transformers_modules.") and report["segments"]


def test_converted_original_msfapn_pixel_decoder_reproduces_its_outputs():
    fixture = FIXTURE.parent / "msfapn-pixel-decoder"
    original = {
        f"sem_seg_head.pixel_decoder.{key}": value for key, value in torch.load(fixture / "state_dict.pt").items()
    }
    inputs, expected = torch.load(fixture / "inputs.pt"), torch.load(fixture / "outputs.pt")
    assert original_pixel_decoder(original) == "msfapn"
    settings = {"encoder_layers": 2, "encoder_feedforward_dim": 64, "num_attention_heads": 4, "common_stride": 4}
    config = SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs(pixel_decoder="msfapn", **settings))
    decoder = SemaskMSFaPNPixelDecoder(config, feature_channels=[16, 32, 64, 128]).eval()
    prefix = "model.pixel_level_module.decoder."
    converted = {key.removeprefix(prefix): value for key, value in convert_state_dict(original).items()}
    decoder.load_state_dict(converted)  # strict: every weight, nothing left over
    with torch.no_grad():
        outputs = decoder(tuple(inputs[name] for name in ("res2", "res3", "res4", "res5")))
    torch.testing.assert_close(outputs.mask_features, expected["mask_features"], atol=1e-4, rtol=1e-4)
    for index, features in enumerate(outputs.multi_scale_features):
        torch.testing.assert_close(features, expected[f"multi_scale_features.{index}"], atol=1e-4, rtol=1e-4)


def test_msfapn_model_trains():
    torch.manual_seed(0)
    config = SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs(pixel_decoder="msfapn"))
    model = SemaskMask2FormerForUniversalSegmentation(config)
    assert isinstance(model.model.pixel_level_module.decoder, SemaskMSFaPNPixelDecoder)
    pixel_values, labels = torch.randn(2, 3, 67, 91), torch.randint(0, 5, (2, 67, 91))
    losses = train_steps(model, pixel_values, labels, steps=8)
    assert losses[-1] < 0.95 * losses[0], losses


def test_original_msfapn_checkpoint_is_detected_and_converted():
    """The tiny-ade fixture's checkpoint with its FPN level made an original FaPN level (`align_1.*` added)."""
    original = load_original_state_dict(mask2former_fixture_dir("tiny-ade") / "original_checkpoint.pth")
    prefix = "sem_seg_head.pixel_decoder."
    channels = original[prefix + "layer_1.weight"].shape[0]
    torch.manual_seed(0)
    level = SemaskFaPNLevel(channels, channels)
    original[prefix + "align_1.offset.weight"] = torch.randn_like(level.offset.weight)
    for name in ("weight", "bias"):
        original[prefix + f"align_1.offset.norm.{name}"] = original[prefix + f"layer_1.norm.{name}"]
    for name, value in level.deform_conv.state_dict().items():
        original[prefix + f"align_1.dcpack_L2.{name}"] = torch.randn_like(value)
    model = convert_original_checkpoint(original)
    assert model.config.pixel_decoder == "msfapn" and model.config.encoder_layers > 0
    decoder = model.model.pixel_level_module.decoder
    torch.testing.assert_close(decoder.levels[0].offset.weight, original[prefix + "align_1.offset.weight"])
    torch.testing.assert_close(decoder.fpn_mask_projection.weight, original[prefix + "mask_features.weight"])
    torch.testing.assert_close(decoder.levels[0].output.weight, original[prefix + "layer_1.weight"])


def test_fapn_presets_carry_the_papers_numbers_and_their_pixel_decoder():
    for name, decoder, single_scale in (
        ("semask-large-mask2former-fapn-ade20k", "fapn", 56.88),
        ("semask-large-mask2former-msfapn-ade20k", "msfapn", 57.00),
    ):
        config = SemaskMask2FormerConfig.from_preset(name)
        assert config.pixel_decoder == decoder and config.num_labels == 150
        assert ORIGINAL_RESULTS[name].mean_iou == single_scale and ORIGINAL_RESULTS[name].ms_flip_mean_iou == 58.25
        assert preset_mismatches(config, name) == []
        other = SemaskMask2FormerConfig.from_preset("semask-large-mask2former-ade20k")
        # the ADE20K Mask2Former card would be wrong; SeMask-FaPN's stage 3 semantic attention is global
        assert preset_mismatches(other, name) == ["semantic_attention", "pixel_decoder"]
