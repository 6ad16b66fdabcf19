"""transformers' common model checks (see `common_checks`) for SeMask-Mask2Former: `SemaskMask2FormerModel` and
`SemaskMask2FormerForUniversalSegmentation` with each pixel decoder (`"msdeformattn"`, `"fapn"`, `"msfapn"`).

Which of transformers' checks apply: `APPLIED` (the check -> the tests here) and `NOT_APPLIED` (-> why not).
The segmentation model with the deformable-attention decoder runs every group; with the FaPN decoders, all but the
output group (the outputs are those of the same transformer decoder); `SemaskMask2FormerModel` the core, output and
initialisation groups. `torch.export` runs with RUN_SLOW=1 (10-50 s on 2 cores).

"""

import math

from common_checks import (
    BASE_MODEL_NOT_RUN,
    MODEL_CHECKS_NOT_APPLIED,
    PIXEL_DECODER_VARIANT_NOT_RUN,
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

FAPN_OFFSETS_AT_ZERO = {
    r"pixel_level_module\.decoder\.levels\.\d+\.offset\.weight": "DCNv2's offset and modulation convolution "
    "(`conv_offset_mask`) starts at zero, so the offset features it reads get no gradient until it moves; the "
    "offset branch's GroupNorm still gets one through the output convolution, which shares it"
}

LEVEL_EMBEDDINGS = {
    r"pixel_level_module\.decoder\.level_embed$": "the deformable attention's sampling-offset and attention-weight "
    "projections start at zero (Mask2Former's initialisation), and the level embeddings only enter their queries"
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
    fapn = pixel_decoder != "msdeformattn"
    return ModelCase(
        SemaskMask2FormerForUniversalSegmentation,
        config_kwargs=lambda **overrides: tiny_mask2former_config_kwargs(pixel_decoder=pixel_decoder, **overrides),
        no_grad_at_init=SEMANTIC_GATES_AT_ZERO
        | (FAPN_OFFSETS_AT_ZERO if fapn else {})
        | (LEVEL_EMBEDDINGS if pixel_decoder != "fapn" else {}),
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
