"""transformers' common model checks (see `common_checks`) for SeMask-Mask2Former: `SemaskMask2FormerModel` and
`SemaskMask2FormerForUniversalSegmentation` with each pixel decoder (`"msdeformattn"`, `"fapn"`, `"msfapn"`).

Which of transformers' checks apply: `APPLIED` (the check -> the tests here) and `NOT_APPLIED` (-> why not).
The segmentation model with the deformable-attention decoder runs every group; with the FaPN decoders, all but the
output group (the outputs are those of the same transformer decoder); `SemaskMask2FormerModel` the core, output and
initialisation groups. `torch.export` runs with RUN_SLOW=1 (10-50 s on 2 cores).

Known failures (strict xfails, patches in /tmp/common_tests_patches/):
- `config.return_dict = False`: the segmentation model reads the nested model's tuple as a ModelOutput
  (return_dict_nested.diff);
- reentrant gradient checkpointing crashes in the backward pass: transformers' Mask2Former decoder layers take tensors
  as keyword arguments, which `use_reentrant=True` does not support (mask2former_reentrant_checkpointing.diff);
- initialisation: transformers skips `_init_weights` of custom-code modules without weights of their own, which is
  where Mask2Former initialises the deformable attention's sampling offsets and attention weights, the decoder layers'
  and the input projections' weights (custom_code_init_shortcut.diff);
- FaPN / MSFaPN in float64, float16, bfloat16 and under bfloat16 autocast: the aligned level casts its inputs to
  float32 whatever the weights' dtype, and torchvision's deformable convolution has neither a bfloat16 CPU kernel nor
  CPU autocast (fapn_dtype.diff).
"""

import math

from common_checks import (
    BASE_MODEL_NOT_RUN,
    CUSTOM_CODE_INIT_BUG,
    MODEL_CHECKS_NOT_APPLIED,
    PIXEL_DECODER_VARIANT_NOT_RUN,
    RETURN_DICT_BUG,
    SEMANTIC_GATES_AT_ZERO,
    CoreChecks,
    ExportChecks,
    InitChecks,
    ModelCase,
    OutputChecks,
    PrecisionChecks,
    TrainingChecks,
    assert_check_table,
    checks_covered,
    stage_channels,
    stage_sizes,
)
from transformers.models.mask2former.modeling_mask2former import Mask2FormerMaskedAttentionDecoderLayer
from transformers.models.swin.modeling_swin import SwinLayer

from conftest import tiny_mask2former_config_kwargs
from semask import SemaskMask2FormerConfig, SemaskMask2FormerForUniversalSegmentation, SemaskMask2FormerModel
from semask.modeling_semask import SemaskSemanticLayer

REENTRANT_BUG = (
    "use_reentrant=True checkpointing of transformers' Mask2Former decoder layers, which take tensors as keyword "
    "arguments, backpropagates twice: see /tmp/common_tests_patches/mask2former_reentrant_checkpointing.diff"
)
FAPN_DTYPE_BUG = (
    "the FaPN level casts its inputs to float32 whatever the weights' dtype, and under autocast hands half-precision "
    "offsets to torchvision's float32 CPU kernel: see /tmp/common_tests_patches/fapn_dtype.diff"
)
FAPN_OFFSETS_AT_ZERO = {
    r"pixel_level_module\.decoder\.levels\.\d+\.offset\.weight": "DCNv2's offset and modulation convolution "
    "(`conv_offset_mask`) starts at zero, so the offset features it reads get no gradient until it moves; the "
    "offset branch's GroupNorm still gets one through the output convolution, which shares it"
}


def padded_size(config, image_size: tuple[int, int]) -> tuple[int, int]:
    divisor = config.size_divisibility
    return tuple(math.ceil(side / divisor) * divisor for side in image_size)


def hidden_states(config, batch_size: int, image_size: tuple[int, int]) -> dict[str, list[tuple]]:
    """The encoder's feature maps (at the padded size), the pixel decoder's three coarsest levels (coarse to fine)
    and the transformer decoder's query states (queries first, as transformers' Mask2Former returns them)."""
    encoder = config.backbone_config
    sizes = stage_sizes(encoder, *padded_size(config, image_size))
    return {
        "encoder_hidden_states": [(batch_size, c, *size) for c, size in zip(stage_channels(encoder), sizes)],
        "pixel_decoder_hidden_states": [(batch_size, config.feature_size, *size) for size in reversed(sizes[1:])],
        "transformer_decoder_hidden_states": [(config.num_queries, batch_size, config.hidden_dim)]
        * config.decoder_layers,
    }


def attentions(config, batch_size: int, image_size: tuple[int, int]) -> dict[str, list[tuple]]:
    """The self-attention weights of every decoder layer (the first prediction comes from the learnt queries)."""
    shape = (batch_size, config.num_attention_heads, config.num_queries, config.num_queries)
    return {"attentions": [shape] * (config.decoder_layers - 1)}


def segmentation_case(pixel_decoder: str, **settings) -> ModelCase:
    failures = {
        "test_config_return_dict_false": RETURN_DICT_BUG,
        "test_gradient_checkpointing_use_reentrant": REENTRANT_BUG,
        "test_init_weights_set_every_tensor": CUSTOM_CODE_INIT_BUG,
    }
    fapn = pixel_decoder != "msdeformattn"
    if fapn:
        dtype_checks = (
            "test_all_tensors_are_parameters_or_buffers",
            "test_half_precision_weights",
            "test_bfloat16_autocast",
        )
        failures |= dict.fromkeys(dtype_checks, FAPN_DTYPE_BUG)
    return ModelCase(
        SemaskMask2FormerForUniversalSegmentation,
        config_kwargs=lambda **overrides: tiny_mask2former_config_kwargs(pixel_decoder=pixel_decoder, **overrides),
        no_grad_at_init=SEMANTIC_GATES_AT_ZERO | (FAPN_OFFSETS_AT_ZERO if fapn else {}),
        known_failures=failures,
        not_run=PIXEL_DECODER_VARIANT_NOT_RUN if fapn else {},
        **COMMON_SETTINGS,
        **settings,
    )


COMMON_SETTINGS = {
    "config_class": SemaskMask2FormerConfig,
    "hidden_states": hidden_states,
    "attentions": attentions,
    "batch_dims": {r"^transformer_decoder_(hidden|intermediate)_states\.": 1},  # (queries, batch, hidden)
    "checkpointed_layers": (SwinLayer, SemaskSemanticLayer, Mask2FormerMaskedAttentionDecoderLayer),
}


class TestSemaskMask2FormerForUniversalSegmentation(
    CoreChecks, OutputChecks, TrainingChecks, InitChecks, PrecisionChecks, ExportChecks
):
    case = segmentation_case(
        "msdeformattn", counterpart_class=SemaskMask2FormerModel, slow_tests={"test_torch_export": "10-50 s on 2 cores"}
    )


class TestSemaskMask2FormerFaPN(CoreChecks, TrainingChecks, InitChecks, PrecisionChecks):
    """Not run here: the output group and `PIXEL_DECODER_VARIANT_NOT_RUN` (the same encoder and transformer decoder
    as the deformable-attention model's)."""

    case = segmentation_case("fapn", counterpart_class=SemaskMask2FormerModel)


class TestSemaskMask2FormerMSFaPN(CoreChecks, TrainingChecks, InitChecks, PrecisionChecks):
    """Not run here: the output group and `PIXEL_DECODER_VARIANT_NOT_RUN` (the same encoder and transformer decoder
    as the deformable-attention model's)."""

    case = segmentation_case("msfapn", counterpart_class=SemaskMask2FormerModel)


class TestSemaskMask2FormerModel(CoreChecks, OutputChecks, InitChecks):
    """Not run here: training (no loss) and precision (the modules of the segmentation model, checked there)."""

    case = ModelCase(
        SemaskMask2FormerModel,
        config_kwargs=tiny_mask2former_config_kwargs,
        counterpart_class=SemaskMask2FormerForUniversalSegmentation,
        known_failures={"test_init_weights_set_every_tensor": CUSTOM_CODE_INIT_BUG},
        not_run=BASE_MODEL_NOT_RUN,
        **COMMON_SETTINGS,
    )


APPLIED = checks_covered(
    TestSemaskMask2FormerForUniversalSegmentation,
    TestSemaskMask2FormerFaPN,
    TestSemaskMask2FormerMSFaPN,
    TestSemaskMask2FormerModel,
)
NOT_APPLIED = {
    **MODEL_CHECKS_NOT_APPLIED,
    "test_save_load_keys_to_ignore_on_save": "no `_keys_to_ignore_on_save`: every state-dict key is saved (checked "
    "in test_save_load)",
    "test_sdpa_matches_eager_sliding_window": "no sliding-window attention",
}
ELSEWHERE = {"ConfigTester (SemaskMask2FormerConfig)": "test_common_config.py"}


def test_check_table():
    assert_check_table(globals())
