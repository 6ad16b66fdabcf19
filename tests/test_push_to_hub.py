"""`semask-convert --push-to-hub`: what is uploaded, offline, with the Hub client mocked."""

from unittest import mock

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled

from conftest import fpn_fixture_dir
from semask.conversion import main

REPO = "me/semask-fixture"


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


def convert(output, *extra):
    checkpoint = fpn_fixture_dir("tiny-windowed") / "original_checkpoint.pth"
    return main(["--checkpoint", str(checkpoint), "--output", str(output), *extra])


def test_push_uploads_model_processor_and_card(fake_hub, tmp_path, capsys):
    output = tmp_path / "out"
    assert convert(output, "--push-to-hub", REPO, "--private") == 0
    assert f"Pushed to https://huggingface.co/{REPO}" in capsys.readouterr().out
    assert fake_hub.create_repo.call_args_list[0] == mock.call(REPO, private=True, exist_ok=True)

    commits = [call.kwargs for call in fake_hub.create_commit.call_args_list]
    assert [commit["repo_id"] for commit in commits] == [REPO, REPO]
    model_files, processor_files = ({op.path_in_repo for op in commit["operations"]} for commit in commits)
    assert {"config.json", "model.safetensors", "configuration_semask.py", "modeling_semask.py"} <= model_files
    assert {"preprocessor_config.json", "image_processing_semask.py"} <= processor_files
    assert "model.safetensors" not in processor_files

    # the last upload replaces transformers' generic README.md with the folder's model card
    upload = fake_hub.upload_file.call_args.kwargs
    assert (upload["repo_id"], upload["path_in_repo"]) == (REPO, "README.md")
    assert upload["path_or_fileobj"] == output / "README.md"
    card = ModelCard((output / "README.md").read_text())  # `ModelCard.load` is mocked here
    assert card.data.model_name == REPO and f'from_pretrained("{REPO}")' in card.text
    local = {path.name for path in output.iterdir()}
    assert {"README.md", "preprocessor_config.json", "model.safetensors"} <= local
    assert local <= model_files | processor_files  # every file of the folder went up


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
