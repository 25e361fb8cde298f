"""The never-learned reference as a preset (presets.reference_preset / preset_of) and as a run
setting (RunConfig.never_learned, `manu run --never-learned`), without training anything: the
training itself is exercised by the positive-control flow test (a planted set's reference) and
measured on `lite` (docs/embedded.md)."""

import json

import pytest
from pydantic import ValidationError

from manu_core import data as mdata
from manu_core.presets import PRESETS, get_preset, preset_of, reference_preset


def test_a_reference_is_its_preset_without_the_forget_people():
    lite = get_preset("lite")
    ref = reference_preset(lite, "forget_5")
    assert ref.name == "lite-without-forget_5"
    assert ref.exclude == tuple(sorted(mdata.load_official_split("forget_5")))
    assert ref.key() != lite.key() and ref.spec == lite.spec and ref.finetune == lite.finetune
    ids = reference_preset(get_preset("tiny"), ("303", "093"))
    assert ids.name.startswith("tiny-without-ids-") and ids.exclude == ("093", "303")
    assert reference_preset(get_preset("tiny"), ("093", "303")).key() == ids.key()  # order does not matter
    with pytest.raises(mdata.DataError, match="never learned"):
        reference_preset(get_preset("tiny"), ("001",))  # a person the preset never learned


def test_a_reference_folder_is_evaluated_as_its_preset(tmp_path):
    (tmp_path / "manu_preset.json").write_text(json.dumps({"preset": {"name": "lite-without-forget_5"},
                                                            "reference_of": "lite"}))
    assert preset_of(tmp_path) is PRESETS["lite"]  # so it gets the embedded evaluation settings


def test_never_learned_setting_and_cli_refuse_what_they_cannot_use(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.pipeline import RunConfig

    assert RunConfig(never_learned={"forget_5": str(tmp_path)}).never_learned == {"forget_5": str(tmp_path)}
    with pytest.raises(ValidationError, match="never_learned"):
        RunConfig(never_learned="sometimes")
    out = CliRunner().invoke(app, ["run", "--model", "tiny", "--never-learned", str(tmp_path / "nowhere")])
    assert out.exit_code == 2 and "--never-learned takes auto, train, none or a model folder" in out.output
