"""`semask-convert --push-to-hub`: what is uploaded, offline, with the Hub client mocked."""

from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled
from test_hub_metadata import check_hub_metadata

from conftest import fpn_fixture_dir
from semask.conversion import main

REPO = "me/semask-fixture"
# model kind -> (its original fixture checkpoint, the options it needs: NHEADS is not in MaskFormer's weights)
CHECKPOINTS = {
    "fpn": lambda: (fpn_fixture_dir("tiny-windowed") / "original_checkpoint.pth", []),
    "maskformer": lambda: (
        Path(__file__).parent / "fixtures" / "original_semask_maskformer" / "tiny" / "original_checkpoint.pth",
        ["--decoder-attention-heads", "4"],
    ),
}
# Every file of each upload: the model's `push_to_hub` (weights, config, the code its `auto_map` needs) and the
# processor's; both add transformers' generic README.md, which the folder's card then replaces.
SEMASK_CODE = {"configuration_semask.py", "modeling_semask.py", "cpu_inference.py", "presets.py", "sizes.py"}
MODEL_FILES = {
    "fpn": {"README.md", "config.json", "model.safetensors", *SEMASK_CODE},
    "maskformer": {
        "README.md",
        "config.json",
        "model.safetensors",
        *SEMASK_CODE,
        "configuration_semask_maskformer.py",
        "modeling_semask_maskformer.py",
        "modeling_semask_mask_classification.py",
    },
}
PROCESSOR_FILES = {"README.md", "preprocessor_config.json", "image_processing_semask.py", "inference.py", "presets.py"}


@pytest.fixture
def fake_hub():
    """One mocked `HfApi` for transformers' `push_to_hub` and for the conversion's own calls."""
    fake = mock.MagicMock()
    fake.create_repo.return_value.repo_id = REPO
    with (
        mock.patch("transformers.utils.hub.hf_api", return_value=fake),
        mock.patch("transformers.utils.hub.ModelCard.load", side_effect=EntryNotFoundError("no card yet")),
        mock.patch("semask.conversion.HfApi", return_value=fake),
    ):
        yield fake


def convert(output, *extra, kind="fpn"):
    checkpoint, options = CHECKPOINTS[kind]()
    return main(["--checkpoint", str(checkpoint), "--output", str(output), *options, *extra])


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_push_uploads_model_processor_and_card(fake_hub, tmp_path, capsys, kind):
    output = tmp_path / "out"
    assert convert(output, "--push-to-hub", REPO, "--private", kind=kind) == 0
    assert f"Pushed to https://huggingface.co/{REPO}" in capsys.readouterr().out
    assert fake_hub.create_repo.call_args_list[0] == mock.call(REPO, private=True, exist_ok=True)

    commits = [call.kwargs for call in fake_hub.create_commit.call_args_list]
    assert [commit["repo_id"] for commit in commits] == [REPO, REPO]
    model_files, processor_files = ({op.path_in_repo for op in commit["operations"]} for commit in commits)
    assert model_files == MODEL_FILES[kind] and processor_files == PROCESSOR_FILES

    # the last upload replaces transformers' generic README.md with the folder's model card
    assert [call.kwargs["path_in_repo"] for call in fake_hub.upload_file.call_args_list] == ["README.md"]
    upload = fake_hub.upload_file.call_args.kwargs
    assert (upload["repo_id"], upload["path_or_fileobj"]) == (REPO, output / "README.md")
    assert [name for name, *_ in fake_hub.method_calls][-1] == "upload_file"
    card = ModelCard((output / "README.md").read_text())  # `ModelCard.load` is mocked here
    assert card.text.startswith(f"\n# {REPO}\n") and f'from_pretrained("{REPO}")' in card.text
    check_hub_metadata(output / "README.md")
    assert {path.name for path in output.iterdir()} == model_files | processor_files  # the folder, nothing else


def test_failed_push_keeps_the_converted_folder(tmp_path, capsys):
    fake = mock.MagicMock()
    fake.create_repo.side_effect = OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")
    with mock.patch("semask.conversion.HfApi", return_value=fake):
        assert convert(tmp_path / "out", "--push-to-hub", REPO) == 1
    error = capsys.readouterr().err
    assert f"was written but the upload to {REPO} failed" in error and "offline mode" in error
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_private_needs_a_repository(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert(tmp_path / "out", "--private")
    assert exit_info.value.code == 2
    assert "--private only applies with --push-to-hub REPO" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_push_nothing_is_uploaded(fake_hub, tmp_path):
    assert convert(tmp_path / "out") == 0
    assert not fake_hub.method_calls
    assert {"README.md", "preprocessor_config.json"} <= {path.name for path in (tmp_path / "out").iterdir()}
