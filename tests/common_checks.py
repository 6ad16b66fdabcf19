"""Checks in the spirit of transformers' common suites (`ModelTesterMixin`, `BackboneTesterMixin`, `ConfigTester`,
`ImageProcessingTestMixin`), written for SeMask's models.

A test module describes a model with a `ModelCase` and subclasses the check groups that apply to it (the mixins
below are groups of pytest test methods reading `self.case`). Each test module lists which of transformers' common
checks apply (`APPLIED`: the transformers check -> the test here) and which do not (`NOT_APPLIED`: -> the reason);
`assert_check_table` keeps that list in step with the tests.
"""

import inspect
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from semask import SemaskConfig

RUN_SLOW = os.environ.get("RUN_SLOW", "").lower() in ("1", "true", "yes")
MAX_PARAMETERS = 1_000_000  # transformers' bound for the tiny models of its common tests
OTHER_LABELS = {0: "first", 1: "second", 2: "third"}  # a label set of another size than the tiny configs' 5

# Checks of transformers' model suite that no SeMask model can run, whatever its head.
MODEL_CHECKS_NOT_APPLIED = {
    "test_resize_tokens_embeddings": "no token embeddings (image inputs)",
    "test_resize_embeddings_untied": "no token embeddings",
    "test_model_get_set_embeddings": "no token embeddings; `get_input_embeddings` is not implemented (as in "
    "transformers' Mask2Former, MaskFormer and Segformer)",
    "test_inputs_embeds": "the models take pixel values only",
    "test_inputs_embeds_matches_input_ids": "the models take pixel values only",
    "test_enable_input_require_grads": "needs input embeddings; transformers only enables it for `input_ids` models",
    "test_headmasking": "removed from transformers v5 (no `head_mask` argument)",
    "test_head_pruning": "removed from transformers v5",
    "test_feed_forward_chunking": "`chunk_size_feed_forward` is not used (as in Swin)",
    "test_tie_model_weights": "no tied weights (checked in test_common_attributes: no shared parameters)",
    "test_model_weights_reload_no_missing_tied_weights": "no tied weights",
    "test_load_save_without_tied_weights": "no tied weights",
    "test_generate_*": "not generative models",
    "test_flash_attn_*": "`_supports_flash_attn = False`: the semantic attention's queries and keys (one channel per "
    "class) are narrower than its values",
    "test_flex_attention_with_grads": "`_supports_flex_attn = False`",
    "test_torchscript*": "TorchScript support is removed from transformers v5; torch.export is checked instead",
    "test_torch_fx*": "torch.fx tracing is removed from transformers v5; torch.export is checked instead",
    "test_can_load_with_meta_device_context_manager": "transformers v5 refuses `from_pretrained` under a meta device "
    "context; building on the meta device is checked in test_init_weights_set_every_tensor",
    "test_multi_gpu_data_parallel_forward": "needs several GPUs",
    "test_model_parallelism": "needs several GPUs",
    "test_cpu_offload": "needs an accelerator",
    "test_disk_offload_bin": "needs an accelerator",
    "test_disk_offload_safetensors": "needs an accelerator",
    "test_tp_plan_matches_params": "no tensor-parallel plan",
    "test_problem_types": "sequence classification problem types only",
    "test_left_padding_compatibility": "text models only",
    "test_torch_compile_*": "compiled forward and training are tested in tests/test_compile.py",
    "test_training_overfit": "loss decrease is tested in tests/test_training.py, test_mask2former_training.py and "
    "test_maskformer.py",
}


def checks_covered(*test_classes: type) -> dict[str, tuple[str, ...]]:
    """transformers' checks -> the tests covering them, from the `covers` tables of the test classes' check groups."""
    covered: dict[str, tuple[str, ...]] = {}
    for test_class in test_classes:
        for group in test_class.__mro__:
            for check, tests in vars(group).get("covers", {}).items():
                tests = (tests,) if isinstance(tests, str) else tests
                covered[check] = tuple(dict.fromkeys((*covered.get(check, ()), *tests)))
    return dict(sorted(covered.items()))


def assert_check_table(namespace: dict) -> None:
    """Every test named in a module's `APPLIED` table exists in that module (as a function or a method of one of
    its test classes), every file of its `ELSEWHERE` table exists; no check is listed twice, and every check not
    applied has a reason."""
    tests = {name for name in namespace if name.startswith("test_")}
    for value in namespace.values():
        if inspect.isclass(value) and value.__name__.startswith("Test"):
            tests |= {name for name in dir(value) if name.startswith("test_")}
    applied, not_applied, elsewhere = namespace["APPLIED"], namespace["NOT_APPLIED"], namespace.get("ELSEWHERE", {})
    assert len({*applied, *not_applied, *elsewhere}) == len(applied) + len(not_applied) + len(elsewhere)
    assert all((Path(__file__).parent / where.split("::")[0]).is_file() for where in elsewhere.values()), elsewhere
    for check, ours in applied.items():
        names = [ours] if isinstance(ours, str) else ours
        assert names and all(name in tests for name in names), (check, ours)
    assert all(isinstance(reason, str) and reason for reason in not_applied.values())


# --------------------------------------------------------------------------------------------------------------------
# Model cases and helpers


ShapeSpec = Callable[[PreTrainedConfig, int, tuple[int, int]], dict[str, list[tuple[int, ...]]]]


@dataclass(frozen=True)
class ModelCase:
    """What the checks need to know about one model class.

    Args:
        model_class: the class checked.
        config_class: its config class.
        config_kwargs: the tiny config's keyword arguments; called with overrides.
        counterpart_class: the base model of a model with a head, or a model with a head on this base model (for
            loading one's checkpoint into the other, through `base_model_prefix`).
        image_size: (height, width) of the test images.
        hidden_states: expected shapes of the outputs returned with `output_hidden_states=True`, by output name.
        attentions: expected shapes of the outputs returned with `attention_kwargs` in eager mode, by output name.
        attention_kwargs: the forward flags that return attention weights.
        batch_dims: output-name pattern -> batch dimension, for outputs whose batch is not dimension 0.
        no_grad_at_init: parameter-name pattern -> why those parameters get no gradient in the first step (they do
            once the zero-initialised weights they depend on have moved).
        no_grad_always: parameter-name pattern -> why those parameters may never get a gradient.
        checkpointed_layers: module classes of which gradient checkpointing must switch some instance on.
        slow_tests: test name -> why it is slow: skipped unless RUN_SLOW=1 (transformers' `@slow`).
        not_run: test name -> why this class does not need it (another class runs it on the same modules).
        kernel_atol: the absolute tolerance where the same computation runs on other float32 kernels (another batch
            size, an exported graph).
    """

    model_class: type[PreTrainedModel]
    config_class: type[PreTrainedConfig]
    config_kwargs: Callable[..., dict]
    counterpart_class: type[PreTrainedModel] | None = None
    image_size: tuple[int, int] = (32, 64)
    hidden_states: ShapeSpec | None = None
    attentions: ShapeSpec | None = None
    attention_kwargs: tuple[str, ...] = ("output_attentions",)
    batch_dims: dict[str, int] = field(default_factory=dict)
    no_grad_at_init: dict[str, str] = field(default_factory=dict)
    no_grad_always: dict[str, str] = field(default_factory=dict)
    checkpointed_layers: tuple[type[nn.Module], ...] = ()
    slow_tests: dict[str, str] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)
    kernel_atol: float = 1e-4

    def config(self, encoder: dict | None = None, **overrides) -> PreTrainedConfig:
        """The tiny config with `overrides`; `encoder` overrides the SeMask-Swin encoder's settings."""
        kwargs = self.config_kwargs(**overrides)
        if encoder and self.config_class is SemaskConfig:
            kwargs.update(encoder)
        elif encoder:
            kwargs["backbone_config"] = {**kwargs["backbone_config"], **encoder}
        return self.config_class(**kwargs)

    def build(self, seed: int = 0, perturbed: bool = True, **overrides) -> PreTrainedModel:
        """A fresh model in eval mode; `perturbed`: every weight moved off its initial value (see `perturb`)."""
        torch.manual_seed(seed)
        model = self.model_class(self.config(**overrides))
        if perturbed:
            perturb(model, seed)
        return model.eval()

    def inputs(self, config: PreTrainedConfig, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch_size, 3, *self.image_size, generator=generator)}

    def labels(self, config: PreTrainedConfig, batch_size: int = 2, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, config.num_labels, (batch_size, *self.image_size), generator=generator)


SEMANTIC_GATES_AT_ZERO = {
    r"semantic_layer\.blocks\.\d+\.(k_proj|v_proj|o_proj)\.": "every semantic block's gate `gamma` starts at 0 (as "
    "in the original), so its attention branch (keys, values, output projection) adds nothing yet; the gate itself "
    "and the class-query projection (the semantic prior) get gradients"
}
# Checks that a base model (or a backbone) need not run where its model with a head runs them: the same modules and
# the same loading code.
BASE_MODEL_NOT_RUN = dict.fromkeys(
    (
        "test_keys_to_ignore_on_load_unexpected",
        "test_from_pretrained_dtype",
        "test_torch_save_load_state_dict",
        "test_partial_checkpoint_initialises_missing_weights",
        "test_mismatched_label_count",
    ),
    "run by the model with a head, on the same modules and loading code",
)
# Checks that a model with another pixel decoder need not run: they do not depend on the pixel decoder.
PIXEL_DECODER_VARIANT_NOT_RUN = dict.fromkeys(
    (
        "test_model_outputs_equivalence",
        "test_config_return_dict_false",
        "test_common_attributes",
        "test_num_parameters",
        "test_torch_save_load_state_dict",
        "test_keys_to_ignore_on_load_unexpected",
        "test_from_pretrained_dtype",
        "test_base_model_and_head_cross_loading",
        "test_gradient_checkpointing_use_reentrant",
    ),
    "independent of the pixel decoder: run by the model with the default one",
)


def perturb(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Add small noise to every floating-point parameter, so no path of the model is switched off by a zero
    initialisation (the semantic gates `gamma`, FaPN's offset convolutions, zero biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def encoder_config(config: PreTrainedConfig) -> SemaskConfig:
    """The SeMask-Swin encoder's config of any SeMask model config."""
    return config if isinstance(config, SemaskConfig) else config.backbone_config


def stage_sizes(config: SemaskConfig, height: int, width: int) -> list[tuple[int, int]]:
    """The (height, width) in tokens of every encoder stage for a `height` x `width` input."""
    size = (math.ceil(height / config.patch_size), math.ceil(width / config.patch_size))
    sizes = []
    for _ in range(config.num_layers):
        sizes.append(size)
        size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
    return sizes


def stage_channels(config: SemaskConfig) -> list[int]:
    return [config.embed_dim * 2**index for index in range(config.num_layers)]


def flatten(value, name: str = "") -> dict[str, torch.Tensor]:
    """The tensors in a (nested) model output, tuple, list or dict, by dotted name."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    if isinstance(value, (dict, ModelOutput)):
        items = value.items()
    elif isinstance(value, (tuple, list)):
        items = enumerate(value)
    else:
        return {}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{name}.{key}" if name else str(key)))
    return flat


def assert_same_tensors(actual: dict, expected: dict, atol: float = 0.0, rtol: float = 0.0) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for name, tensor in expected.items():
        torch.testing.assert_close(
            actual[name], tensor, atol=atol, rtol=rtol, msg=lambda message, name=name: f"{name}: {message}"
        )


def config_dict(config: PreTrainedConfig) -> dict:
    """`config.to_dict()` without what loading records: the source (`_name_or_path`) and the weights' `dtype`."""

    def strip(settings: dict) -> dict:
        return {
            key: strip(value) if isinstance(value, dict) and "model_type" in value else value
            for key, value in settings.items()
            if key not in ("_name_or_path", "dtype")
        }

    return strip(config.to_dict())


def forward(model: nn.Module, inputs: dict, **kwargs) -> ModelOutput:
    with torch.no_grad():
        return model(**inputs, **kwargs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm().clamp(min=1e-6)).item()


def matching(names: Iterable[str], patterns: Iterable[str]) -> set[str]:
    return {name for name in names if any(re.search(pattern, name) for pattern in patterns)}


def parameters_without_gradient(model: nn.Module) -> set[str]:
    return {
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and (parameter.grad is None or not parameter.grad.any())
    }


@dataclass
class Initialisation:
    """How new models are initialised: one model's tensors (state dict and buffers), and which of them the random
    seed does not change."""

    tensors: dict[str, torch.Tensor]
    deterministic: set[str]


def initialisation(build: Callable[[int], nn.Module]) -> Initialisation:
    """The `Initialisation` of the models `build(seed)` gives (two seeds tell the deterministic tensors)."""
    first, second = ({**dict(model.named_buffers()), **model.state_dict()} for model in (build(0), build(1)))
    return Initialisation(first, {name for name in first if torch.equal(first[name], second[name])})


def new_model(model_class: type[PreTrainedModel], config: PreTrainedConfig, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    return model_class(config)


def assert_initialised_like(actual: dict[str, torch.Tensor], reference: Initialisation) -> None:
    """Tensors initialised by `_init_weights` (loaded as missing, re-initialised, built on the meta device) against a
    new model's: the deterministic ones (constants, integer buffers, grids) equal; the random ones finite, not constant
    and, in tensors large enough to tell, of the same mean and spread."""
    for name, tensor in actual.items():
        expected = reference.tensors[name]
        assert tensor.shape == expected.shape and tensor.dtype == expected.dtype, name
        if name in reference.deterministic:
            torch.testing.assert_close(tensor, expected, atol=0, rtol=0, msg=name)
            continue
        assert torch.isfinite(tensor).all() and (tensor.numel() == 1 or tensor.min() < tensor.max()), name
        if expected.numel() >= 512:
            ratio = (tensor.float().std() / expected.float().std()).item()
            assert 0.75 < ratio < 1.33, (name, ratio)
            mean_error = abs(tensor.float().mean() - expected.float().mean()).item()
            assert mean_error < 6 * expected.float().std().item() / expected.numel() ** 0.5, (name, mean_error)


def init_every_module(module: nn.Module, owner: PreTrainedModel) -> None:
    """`owner._init_weights` on every module of `module`, children first, each sub-model by its own `_init_weights`
    (what `initialize_weights` does, here without skipping any module)."""
    for child in module.children():
        init_every_module(child, child if isinstance(child, PreTrainedModel) else owner)
    with torch.no_grad():
        owner._init_weights(module)


def checkpoint_dir(model: PreTrainedModel, path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """A saved folder (config and `state_dict` as model.safetensors) for `from_pretrained`."""
    model.config.save_pretrained(path)
    save_file(
        {key: value.contiguous() for key, value in state_dict.items()}, path / "model.safetensors", {"format": "pt"}
    )
    return path


def from_pretrained(model_class: type[PreTrainedModel], path: Path, **kwargs) -> tuple[PreTrainedModel, dict]:
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    info = {key: sorted(name if isinstance(name, str) else name[0] for name in value) for key, value in info.items()}
    return model.eval(), info


def head_only_keys(head: PreTrainedModel) -> set[str]:
    """The state-dict keys of a model with a head that its base model does not have."""
    prefix = f"{head.base_model_prefix}."
    return {key for key in head.state_dict() if not key.startswith(prefix)}


def captured_warnings(caplog, call: Callable[[], object]) -> str:
    """The transformers warnings logged by `call()` (transformers' `warning_once` cache cleared first)."""
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="transformers"):
        call()
    return caplog.text


# --------------------------------------------------------------------------------------------------------------------
# Check groups


class CaseChecks:
    """The base of the check groups: `case`, the shared model and inputs, its skipped and slow checks."""

    case: ModelCase

    @pytest.fixture(autouse=True)
    def _apply_case_marks(self, request):
        name = request.function.__name__
        if name in self.case.not_run:
            pytest.skip(self.case.not_run[name])
        if name in self.case.slow_tests and not RUN_SLOW:
            pytest.skip(f"slow ({self.case.slow_tests[name]}): set RUN_SLOW=1 to run")

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _one_thread(cls):
        """One intra-op thread: the tiny tensors gain nothing from two, and on a loaded machine every parallel
        region waits for a descheduled thread (tens of times slower)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls) -> PreTrainedModel:
        """The perturbed tiny model in eval mode (tests that change it put it back)."""
        return cls.case.build()

    @pytest.fixture(scope="class")
    @classmethod
    def inputs(cls, model) -> dict[str, torch.Tensor]:
        return cls.case.inputs(model.config)

    @pytest.fixture(scope="class")
    @classmethod
    def outputs(cls, model, inputs) -> ModelOutput:
        """The model's outputs on `inputs`."""
        return forward(model, inputs)

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, outputs) -> dict[str, torch.Tensor]:
        """The model's outputs on `inputs`, flattened."""
        return flatten(outputs)


class CoreChecks(CaseChecks):
    """Serialisation, determinism, tuple outputs, batching, common attributes and parameter counts."""

    covers = {
        "test_save_load": "test_save_load",
        "test_can_use_safetensors": "test_save_load",
        "test_save_load_keys_to_ignore_on_load_unexpected": "test_keys_to_ignore_on_load_unexpected",
        "test_torch_save_load": "test_torch_save_load_state_dict",
        "test_determinism": "test_determinism",
        "test_model_outputs_equivalence": ("test_model_outputs_equivalence", "test_config_return_dict_false"),
        "test_batching_equivalence": "test_batching_equivalence",
        "test_model_main_input_name": "test_common_attributes",
        "test_forward_signature": "test_common_attributes",
        "test_model_common_attributes": "test_common_attributes",
        "test_internal_model_config_and_subconfig_are_same": "test_common_attributes",
        "test_tied_weights_keys": "test_common_attributes",
        "test_sdpa_can_dispatch_non_composite_models": "test_common_attributes",
        "test_sdpa_can_dispatch_composite_models": "test_common_attributes",
        "test_model_is_small": "test_num_parameters",
        "test_num_parameters (PreTrainedModel.num_parameters)": "test_num_parameters",
        "test_all_tensors_are_parameter_or_buffer": "test_all_tensors_are_parameters_or_buffers",
        "test_bc_torch_dtype": "test_from_pretrained_dtype",
    }

    def test_save_load(self, model, inputs, reference, tmp_path):
        model.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()
        saved = load_file(tmp_path / "model.safetensors")  # (MaskFormer's keys saved under their original names)
        assert sorted(t.shape for t in saved.values()) == sorted(t.shape for t in model.state_dict().values())
        loaded, info = from_pretrained(type(model), tmp_path)
        assert not any(info.values()), info
        assert type(loaded) is type(model) and config_dict(loaded.config) == config_dict(model.config)
        assert_same_tensors(loaded.state_dict(), model.state_dict())
        assert_same_tensors(flatten(forward(loaded, inputs)), reference)

    def test_determinism(self, model, inputs, reference):
        assert_same_tensors(flatten(forward(model, inputs)), reference)

    def test_model_outputs_equivalence(self, model, inputs):
        """`return_dict=False` gives the output's `to_tuple()`, with and without the optional outputs."""
        for flags in ({}, {"output_hidden_states": True}):
            as_dict, as_tuple = forward(model, inputs, **flags), forward(model, inputs, return_dict=False, **flags)
            assert isinstance(as_dict, ModelOutput) and isinstance(as_tuple, tuple)
            assert_same_tensors(flatten(as_tuple), flatten(as_dict.to_tuple()))
            assert len(as_tuple) == len(as_dict.to_tuple())

    def test_config_return_dict_false(self, model, inputs, outputs):
        """`config.return_dict = False` gives tuples too (the nested models must not follow it)."""
        model.config.return_dict = False
        try:
            as_tuple = forward(model, inputs)
        finally:
            model.config.return_dict = True
        assert isinstance(as_tuple, tuple)
        assert_same_tensors(flatten(as_tuple), flatten(outputs.to_tuple()))

    def test_batching_equivalence(self, model, inputs, reference):
        """Each image of a batch gives the same outputs alone (the outputs' batch dimension by `case.batch_dims`)."""
        batched = flatten(forward(model, inputs, output_hidden_states=True))
        atol = self.case.kernel_atol
        for index in range(inputs["pixel_values"].shape[0]):
            single = flatten(
                forward(model, {"pixel_values": inputs["pixel_values"][index : index + 1]}, output_hidden_states=True)
            )
            assert single.keys() == batched.keys()
            for name, tensor in batched.items():
                dim = next((d for pattern, d in self.case.batch_dims.items() if re.search(pattern, name)), 0)
                expected = tensor.narrow(dim, index, 1)
                torch.testing.assert_close(single[name], expected, atol=atol, rtol=1e-4, msg=name)

    def test_common_attributes(self, model):
        config = model.config
        parameters = inspect.signature(model.forward).parameters
        assert model.main_input_name == "pixel_values" == next(iter(parameters))
        assert model.input_modalities in ("image", ("image",))
        assert model.base_model_prefix and (
            model.base_model is model or model.base_model is getattr(model, model.base_model_prefix)
        )
        assert model.supports_gradient_checkpointing and model._supports_sdpa and not model._supports_flash_attn
        assert config._attn_implementation == "sdpa" == encoder_config(config)._attn_implementation
        # composite configs: the encoder sub-model holds the very encoder config object
        encoders = [module for module in model.modules() if isinstance(getattr(module, "config", None), SemaskConfig)]
        assert encoders and all(module.config is encoder_config(config) for module in encoders)
        # no tied or shared weights
        assert not getattr(model, "_tied_weights_keys", None)
        pointers = [parameter.data_ptr() for parameter in model.parameters()]
        assert len(pointers) == len(set(pointers))
        # every remote-code Auto class entry names a class of the saved code
        assert config.auto_map and f".{type(model).__name__}" in " ".join(config.auto_map.values())

    def test_num_parameters(self, model):
        total = sum(parameter.numel() for parameter in model.parameters())
        assert model.num_parameters() == total < MAX_PARAMETERS
        assert model.num_parameters(only_trainable=True) == total
        part = next(iter(model.children()))
        frozen = sum(parameter.numel() for parameter in part.parameters())
        part.requires_grad_(False)
        try:
            assert 0 < frozen and model.num_parameters(only_trainable=True) == total - frozen
        finally:
            part.requires_grad_(True)

    def test_all_tensors_are_parameters_or_buffers(self, model, inputs, reference):
        """No module keeps a tensor outside its parameters and buffers: `.to(float64)` converts every one, and the
        float64 model agrees with the float32 one."""
        for name, module in model.named_modules():
            stray = [key for key, value in vars(module).items() if isinstance(value, torch.Tensor)]
            assert not stray, (name, stray)
        double = self.case.build().to(torch.float64)
        assert double.dtype == torch.float64
        outputs = flatten(forward(double, {key: value.double() for key, value in inputs.items()}))
        assert all(tensor.dtype == torch.float64 for tensor in outputs.values() if tensor.is_floating_point())
        assert_same_tensors({key: value.float() for key, value in outputs.items()}, reference, atol=1e-4, rtol=1e-4)

    def test_torch_save_load_state_dict(self, model, tmp_path):
        torch.save(model.state_dict(), tmp_path / "state.pt")
        other = self.case.build(seed=1)
        assert other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), strict=True)
        assert_same_tensors(other.state_dict(), model.state_dict())

    def test_keys_to_ignore_on_load_unexpected(self, model, tmp_path):
        """Checkpoint keys matching `_keys_to_ignore_on_load_unexpected` (old Swin `relative_position_index` buffers,
        the mask classification losses' `criterion.empty_weight`) are not reported; other unknown keys are."""
        state = dict(model.state_dict())
        table = next(key for key in state if key.endswith("relative_position_bias_table"))
        ignored = {table.replace("relative_position_bias_table", "relative_position_index"): torch.zeros(16).long()}
        if "criterion.empty_weight" not in state and matching(
            ["criterion.empty_weight"], model._keys_to_ignore_on_load_unexpected
        ):
            ignored["criterion.empty_weight"] = torch.ones(3)  # the loss of a segmentation checkpoint
        assert matching(ignored, model._keys_to_ignore_on_load_unexpected) == set(ignored)
        folder = checkpoint_dir(model, tmp_path, {**state, **ignored, "unknown.weight": torch.ones(2)})
        loaded, info = from_pretrained(type(model), folder)
        assert info["unexpected_keys"] == ["unknown.weight"] and not info["missing_keys"], info
        assert_same_tensors(loaded.state_dict(), model.state_dict())

    def test_from_pretrained_dtype(self, model, tmp_path):
        """`dtype=...` loads in that dtype; `"auto"` (transformers v5's default) keeps the saved one."""
        model.save_pretrained(tmp_path / "float32")
        loaded = type(model).from_pretrained(tmp_path / "float32", dtype=torch.bfloat16)
        assert loaded.dtype == torch.bfloat16
        assert all(tensor.dtype == torch.bfloat16 for tensor in loaded.parameters())
        loaded.save_pretrained(tmp_path / "bfloat16")
        assert type(model).from_pretrained(tmp_path / "bfloat16").dtype == torch.bfloat16


class OutputChecks(CaseChecks):
    """Hidden states and attentions (counts and shapes), attention implementations and gradients of the outputs."""

    covers = {
        "test_hidden_states_output": "test_hidden_states_output",
        "test_attention_outputs": "test_attention_outputs",
        "test_retain_grad_hidden_states_attentions": "test_retain_grad_hidden_states_attentions",
        "test_eager_matches_sdpa_inference": "test_eager_matches_sdpa_inference",
        "test_can_set_attention_dynamically": "test_eager_matches_sdpa_inference",
        "test_config_attn_implementation_setter": "test_eager_matches_sdpa_inference",
        "test_attn_implementation_composite_models": "test_eager_matches_sdpa_inference",
    }

    def expected(self, spec: ShapeSpec, config: PreTrainedConfig, batch_size: int) -> dict[str, list[tuple]]:
        height, width = self.case.image_size
        return spec(config, batch_size, (height, width))

    def test_hidden_states_output(self, model, inputs):
        expected = self.expected(self.case.hidden_states, model.config, inputs["pixel_values"].shape[0])
        plain = forward(model, inputs)
        assert all(plain.get(name) is None for name in expected)
        requested = forward(model, inputs, output_hidden_states=True)
        model.config.output_hidden_states = True
        try:
            from_config = forward(model, inputs)
        finally:
            model.config.output_hidden_states = False
        for outputs in (requested, from_config):
            assert {name: [tuple(t.shape) for t in outputs[name]] for name in expected} == expected

    def test_attention_outputs(self, model, inputs, caplog):
        """Attention weights in eager mode (by argument and by config), as probabilities; with SDPA, a warning
        where SeMask's attention cannot return them."""
        expected = self.expected(self.case.attentions, model.config, inputs["pixel_values"].shape[0])
        flags = dict.fromkeys(self.case.attention_kwargs, True)
        model.set_attn_implementation("eager")
        try:
            requested = forward(model, inputs, **flags)
            model.config.output_attentions = True
            try:
                from_config = forward(model, inputs, **{key: True for key in flags if key != "output_attentions"})
            finally:
                model.config.output_attentions = False
            for outputs in (requested, from_config):
                assert {name: [tuple(t.shape) for t in outputs[name]] for name in expected} == expected
                for weights in (tensor for name in expected for tensor in outputs[name]):
                    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5, rtol=0)
        finally:
            model.set_attn_implementation("sdpa")
        assert all(forward(model, inputs).get(name) is None for name in expected)
        if isinstance(model.config, SemaskConfig):
            text = captured_warnings(caplog, lambda: forward(model, inputs, **flags))
            assert "only returned with eager attention" in text

    def test_eager_matches_sdpa_inference(self, model, inputs, reference):
        """`set_attn_implementation` reaches every sub-model and config; eager and SDPA agree in float32 and bfloat16
        autocast."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sdpa_bf16 = flatten(forward(model, inputs))
        model.set_attn_implementation("eager")
        try:
            implementations = {
                module.config._attn_implementation for module in model.modules() if hasattr(module, "config")
            }
            assert implementations == {"eager"} == {encoder_config(model.config)._attn_implementation}
            eager = flatten(forward(model, inputs))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                eager_bf16 = flatten(forward(model, inputs))
        finally:
            model.set_attn_implementation("sdpa")
        assert_same_tensors(eager, reference, atol=1e-5, rtol=1e-4)
        for name, tensor in sdpa_bf16.items():
            assert relative_error(eager_bf16[name], tensor) < 0.1, name

    def test_retain_grad_hidden_states_attentions(self, inputs, reference):
        """Returned hidden states and attention weights are the graph's own tensors: the default outputs computed
        from them give them gradients (for each output, the first tensor in the graph: DETR's first decoder input
        is constant zeros)."""
        model = self.case.build().train()
        model.set_attn_implementation("eager")
        outputs = model(**inputs, output_hidden_states=True, **dict.fromkeys(self.case.attention_kwargs, True))
        batch_size = inputs["pixel_values"].shape[0]
        names = [
            *self.expected(self.case.hidden_states, model.config, batch_size),
            *self.expected(self.case.attentions, model.config, batch_size),
        ]
        kept = {name: next(tensor for tensor in outputs[name] if tensor.requires_grad) for name in names}
        for tensor in kept.values():
            tensor.retain_grad()
        computed = [
            tensor
            for name, tensor in flatten(outputs).items()
            if name in reference and tensor.is_floating_point() and not any(tensor is k for k in kept.values())
        ]
        sum(tensor.float().square().mean() for tensor in computed).backward()
        assert all(tensor.grad is not None and tensor.grad.any() for tensor in kept.values()), [
            name for name, tensor in kept.items() if tensor.grad is None or not tensor.grad.any()
        ]


class TrainingChecks(CaseChecks):
    """Gradients of the loss for every trainable parameter, and gradient checkpointing."""

    covers = {
        "test_training": "test_training",
        "test_training_gradient_checkpointing": "test_gradient_checkpointing",
        "test_training_gradient_checkpointing_use_reentrant_false": "test_gradient_checkpointing",
        "test_gradient_checkpointing_enable_disable": "test_gradient_checkpointing",
        "test_gradient_checkpointing_backward_compatibility": "test_gradient_checkpointing",
        "test_training_gradient_checkpointing_use_reentrant": "test_gradient_checkpointing_use_reentrant",
    }

    def loss(self, model: PreTrainedModel, inputs: dict, labels: torch.Tensor, seed: int = 1) -> torch.Tensor:
        torch.manual_seed(seed)  # the same stochastic depth, dropout and point sampling in the runs compared
        return model(**inputs, labels=labels).loss

    def test_training(self, inputs):
        """The loss reaches every trainable parameter, except `case.no_grad_at_init` (at initialisation) and
        `case.no_grad_always`. Stochastic depth is off here: with 2 images it may drop a whole block for both."""
        allowed = {**self.case.no_grad_at_init, **self.case.no_grad_always}
        for perturbed in (False, True):
            model = self.case.build(perturbed=perturbed, encoder={"drop_path_rate": 0.0}).train()
            loss = self.loss(model, inputs, self.case.labels(model.config))
            assert loss.ndim == 0 and torch.isfinite(loss)
            loss.backward()
            missing = parameters_without_gradient(model)
            if perturbed:
                assert missing == matching(missing, self.case.no_grad_always), missing
            else:
                assert missing == matching(missing, allowed), missing - matching(missing, allowed)
                # the exceptions are all real: each zero-initialisation reason names parameters without gradient
                assert all(matching(missing, [pattern]) for pattern in self.case.no_grad_at_init), missing
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    def checkpointing_matches(self, inputs, checkpointing_kwargs: dict | None, tolerance: float) -> None:
        """The same loss and gradients with checkpointing as without: each gradient within `tolerance` of the plain
        one (relative, in norm), and none where the plain model has none."""
        plain = self.case.build().train()
        checkpointed = self.case.build().train()
        checkpointed.activation_checkpointing_enable(checkpointing_kwargs)
        assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
        flagged = [module for module in checkpointed.modules() if getattr(module, "gradient_checkpointing", False)]
        assert self.case.checkpointed_layers
        for layer_class in self.case.checkpointed_layers:
            assert any(isinstance(module, layer_class) for module in flagged), layer_class
        labels = self.case.labels(plain.config)
        losses = []
        for model in (plain, checkpointed):
            loss = self.loss(model, inputs, labels)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
        largest = max(parameter.grad.norm() for parameter in plain.parameters() if parameter.grad is not None)
        for (name, parameter), other in zip(plain.named_parameters(), checkpointed.parameters()):
            if parameter.grad is None:
                assert other.grad is None or not other.grad.any(), name
                continue
            error = (other.grad - parameter.grad).norm()
            assert error <= tolerance * parameter.grad.norm() + 1e-6 * largest, (name, error, parameter.grad.norm())
        checkpointed.activation_checkpointing_disable()
        assert not checkpointed.is_activation_checkpointing
        assert not any(getattr(module, "gradient_checkpointing", False) for module in checkpointed.modules())

    def test_gradient_checkpointing(self, inputs):
        """`activation_checkpointing_enable()` (non-reentrant, the default): the same loss and gradients."""
        self.checkpointing_matches(inputs, None, tolerance=1e-6)

    def test_gradient_checkpointing_use_reentrant(self, inputs):
        """Reentrant checkpointing gives the same loss and gradients too, or is refused when enabled."""
        try:
            self.case.build().activation_checkpointing_enable({"use_reentrant": True})
        except ValueError as error:
            assert "use_reentrant" in str(error)
            return
        # reentrant backward passes sum gradients in another order: rounding, amplified where terms cancel
        self.checkpointing_matches(inputs, {"use_reentrant": True}, tolerance=1e-3)


class InitChecks(CaseChecks):
    """`_init_weights`: on the meta device, for the missing weights of a checkpoint, for mismatched label counts and
    across `base_model_prefix`."""

    covers = {
        "test_initialization": "test_init_weights_set_every_tensor",
        "test_can_init_all_missing_weights": (
            "test_init_weights_set_every_tensor",
            "test_partial_checkpoint_initialises_missing_weights",
        ),
        "test_init_weights_can_init_buffers": "test_init_weights_set_every_tensor",
        "test_can_be_initialized_on_meta": "test_init_weights_set_every_tensor",
        "test_correct_missing_keys": (
            "test_partial_checkpoint_initialises_missing_weights",
            "test_base_model_and_head_cross_loading",
        ),
        "test_from_pretrained_no_checkpoint": "test_partial_checkpoint_initialises_missing_weights",
        "test_load_with_mismatched_shapes": "test_mismatched_label_count",
        "test_mismatched_shapes_have_properly_initialized_weights": "test_mismatched_label_count",
        "test_model_base_model_prefix": "test_base_model_and_head_cross_loading",
        "test_save_load_fast_init_from_base": "test_base_model_and_head_cross_loading",
        "test_save_load_fast_init_to_base": "test_base_model_and_head_cross_loading",
    }

    def test_init_weights_set_every_tensor(self):
        """Built on the meta device and materialised, a model gets every weight and buffer from `initialize_weights`
        (none is left as it was in memory); `_init_weights` covers every tensor; and a model built the usual way is
        initialised as `_init_weights` says, module by module (no module's initialisation is skipped)."""

        def materialised(fill: float) -> PreTrainedModel:
            with torch.device("meta"):
                model = self.case.model_class(self.case.config())
            model.to_empty(device="cpu")
            with torch.no_grad():
                for tensor in (*model.parameters(), *model.buffers()):
                    tensor.fill_(fill if tensor.is_floating_point() else -7)
            return model

        first, second = materialised(float("nan")), materialised(123.0)
        for model in (first, second):
            torch.manual_seed(0)
            model.initialize_weights()
        assert_same_tensors(first.state_dict(), second.state_dict())

        def intended(seed: int) -> PreTrainedModel:
            model = materialised(float("nan"))
            torch.manual_seed(seed)
            init_every_module(model, model)
            return model

        by_module = initialisation(intended)
        assert all(torch.isfinite(t).all() for t in by_module.tensors.values() if t.is_floating_point())
        built = initialisation(lambda seed: self.case.build(seed=seed, perturbed=False))
        assert_initialised_like(first.state_dict(), built)
        assert_initialised_like(built.tensors, by_module)

    def test_partial_checkpoint_initialises_missing_weights(self, model, tmp_path):
        """`from_pretrained` of checkpoints holding half of the weights (every other key, then the other half: each
        weight is missing once while its neighbours load): the missing ones are reported and initialised as in a new
        model, the others loaded as saved; non-persistent buffers are rebuilt."""
        state = model.state_dict()
        reference = initialisation(lambda seed: self.case.build(seed=seed, perturbed=False))
        for half in (0, 1):
            dropped = set(sorted(state)[half::2])
            kept = {key: value for key, value in state.items() if key not in dropped}
            loaded, info = from_pretrained(type(model), checkpoint_dir(model, tmp_path / f"half{half}", kept))
            assert info["missing_keys"] == sorted(dropped) and not info["unexpected_keys"], info
            loaded_state = loaded.state_dict()
            assert_same_tensors({key: loaded_state[key] for key in kept}, kept)
            assert_initialised_like({key: loaded_state[key] for key in dropped}, reference)
            non_persistent = {name: buffer for name, buffer in loaded.named_buffers() if name not in state}
            assert_initialised_like(non_persistent, reference)

    def test_mismatched_label_count(self, model, inputs, tmp_path):
        """Another label set: refused unless `ignore_mismatched_sizes=True`, which re-initialises exactly the weights
        whose shape follows the label count (decoder and the encoder's semantic layers)."""
        model.save_pretrained(tmp_path)
        labels = {"id2label": OTHER_LABELS, "label2id": {name: index for index, name in OTHER_LABELS.items()}}
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            type(model).from_pretrained(tmp_path, **labels)
        loaded, info = from_pretrained(type(model), tmp_path, ignore_mismatched_sizes=True, **labels)
        reference = initialisation(lambda seed: self.case.build(seed=seed, perturbed=False, id2label=OTHER_LABELS))
        saved, reloaded, new = model.state_dict(), loaded.state_dict(), reference.tensors
        resized = {key for key in saved if saved[key].shape != new[key].shape}
        assert resized and info["mismatched_keys"] == sorted(resized) and not info["missing_keys"], info
        assert loaded.config.num_labels == encoder_config(loaded.config).num_labels == len(OTHER_LABELS)
        assert_same_tensors(
            {key: reloaded[key] for key in saved if key not in resized},
            {key: value for key, value in saved.items() if key not in resized},
        )
        assert_initialised_like({key: reloaded[key] for key in resized}, reference)
        checked = 0
        for name, tensor in flatten(forward(loaded, inputs)).items():
            if name == "class_queries_logits":  # the classes and "no object"
                assert tensor.shape[-1] == len(OTHER_LABELS) + 1
            elif name == "logits" or name.startswith("semantic_"):
                assert tensor.shape[1] == len(OTHER_LABELS), name
            else:
                continue
            checked += 1
        assert checked

    def test_base_model_and_head_cross_loading(self, model, tmp_path):
        """Through `base_model_prefix`: a base model's checkpoint loads into the model with a head (the head
        initialised as new) and the head's checkpoint into the base model (the head's weights reported unused)."""
        other = self.case.counterpart_class
        head = model if model.base_model is not model else other(model.config)
        base_model_class = other if model.base_model is not model else type(model)
        prefix = f"{head.base_model_prefix}."
        head_keys = head_only_keys(head)
        model.save_pretrained(tmp_path / "saved")
        loaded, info = from_pretrained(other, tmp_path / "saved")
        if base_model_class is other:  # head -> base: the unused head weights, but those the base model ignores
            unused = head_keys - matching(head_keys, other._keys_to_ignore_on_load_unexpected)
            assert info["unexpected_keys"] == sorted(unused) and not info["missing_keys"], info
            expected = {
                key.removeprefix(prefix): value for key, value in model.state_dict().items() if key not in head_keys
            }
            assert_same_tensors(loaded.state_dict(), expected)
        else:  # base -> head
            assert info["missing_keys"] == sorted(head_keys) and not info["unexpected_keys"], info
            state = loaded.state_dict()
            assert_same_tensors(
                {key.removeprefix(prefix): state[key] for key in state if key not in head_keys}, model.state_dict()
            )
            reference = initialisation(lambda seed: new_model(other, model.config, seed))
            assert_initialised_like({key: state[key] for key in head_keys}, reference)


class PrecisionChecks(CaseChecks):
    """Half-precision weights and bfloat16 autocast on CPU."""

    covers = {
        "model.dtype / .half() / .to(torch.bfloat16) forward": "test_half_precision_weights",
        "test_eager_matches_sdpa_inference (bfloat16 part)": "test_bfloat16_autocast",
    }

    def test_half_precision_weights(self, inputs):
        for dtype in (torch.float16, torch.bfloat16):
            model = self.case.build().to(dtype)
            assert model.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
            outputs = flatten(forward(model, {key: value.to(dtype) for key, value in inputs.items()}))
            assert all(torch.isfinite(tensor).all() for tensor in outputs.values()), dtype
            assert {tensor.dtype for tensor in outputs.values() if tensor.is_floating_point()} == {dtype}

    def test_bfloat16_autocast(self, model, inputs, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = flatten(forward(model, inputs))
        assert outputs.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.isfinite(outputs[name]).all() and relative_error(outputs[name], tensor) < 0.15, name


class ExportChecks(CaseChecks):
    """`torch.export` (static shapes; `semask.export` and tests/test_export.py cover dynamic shapes and ONNX)."""

    covers = {"test_torch_export": "test_torch_export"}

    def test_torch_export(self, model, inputs, reference):
        program = torch.export.export(model, (), dict(inputs), strict=False)
        assert_same_tensors(flatten(program.module()(**inputs)), reference, atol=self.case.kernel_atol, rtol=1e-4)


class BackboneChecks(CaseChecks):
    """transformers' backbone API: stage names, `out_features` / `out_indices`, channels and feature maps."""

    covers = {
        "BackboneTesterMixin.test_backbone_common_attributes": "test_backbone_common_attributes",
        "BackboneTesterMixin.test_channels": "test_backbone_common_attributes",
        "BackboneTesterMixin.test_config": ("test_backbone_common_attributes", "test_create_from_modified_config"),
        "BackboneTesterMixin.test_backbone_outputs": "test_backbone_outputs",
        "BackboneTesterMixin.test_backbone_stage_selection": "test_backbone_stage_selection",
        "BackboneTesterMixin.test_create_from_modified_config": "test_create_from_modified_config",
        "BackboneTesterMixin.test_forward_signature": "test_common_attributes",
    }

    def test_backbone_common_attributes(self, model):
        config = model.config
        assert (
            model.stage_names == config.stage_names == ["stem"] + [f"stage{i}" for i in range(1, config.num_layers + 1)]
        )
        assert model.num_features == [config.embed_dim, *stage_channels(config)]
        assert model.out_features == config.out_features == model.stage_names[1:]
        assert model.out_indices == config.out_indices == list(range(1, config.num_layers + 1))
        assert model.channels == [model.num_features[index] for index in model.out_indices]

    def test_backbone_outputs(self, model, inputs, outputs):
        config, batch_size = model.config, inputs["pixel_values"].shape[0]
        sizes = stage_sizes(config, *self.case.image_size)
        assert [tuple(f.shape) for f in outputs.feature_maps] == [
            (batch_size, channels, *size) for channels, size in zip(model.channels, sizes)
        ]
        assert outputs.hidden_states is None and outputs.attentions is None
        model.set_attn_implementation("eager")
        try:
            full = forward(model, inputs, output_hidden_states=True, output_attentions=True)
        finally:
            model.set_attn_implementation("sdpa")
        assert len(full.hidden_states) == config.num_layers + 1 and len(full.attentions) == sum(config.depths)
        as_tuple = forward(model, inputs, return_dict=False)
        assert_same_tensors(flatten(as_tuple[0]), flatten(outputs.feature_maps))

    def test_backbone_stage_selection(self, inputs):
        """`out_indices` / `out_features` (the stem included, negative indices) select the maps and channels."""
        sizes = stage_sizes(encoder_config(self.case.config()), *self.case.image_size)
        for selection, names in (({"out_indices": [0, 2]}, ["stem", "stage2"]), ({"out_indices": [-1]}, ["stage4"])):
            model = self.case.build(**selection)
            assert model.out_features == names
            feature_maps = forward(model, inputs).feature_maps
            assert len(feature_maps) == len(names) == len(model.channels)
            for feature_map, name, channels in zip(feature_maps, names, model.channels):
                stage = 0 if name == "stem" else int(name.removeprefix("stage")) - 1
                assert tuple(feature_map.shape) == (inputs["pixel_values"].shape[0], channels, *sizes[stage])

    def test_create_from_modified_config(self):
        """Changing `out_features` on a config keeps `out_indices` in step (and back); contradicting them fails."""
        config = self.case.config()
        config.out_features = ["stage2", "stage3"]
        assert config.out_indices == [2, 3]
        config.out_indices = [1]
        assert config.out_features == ["stage1"]
        assert type(self.case.model_class(config)).__name__ == "SemaskBackbone"
        assert self.case.model_class(config).channels == [config.embed_dim]
        with pytest.raises(ValueError, match="same stages"):
            self.case.config(out_features=["stage1"], out_indices=[2])
