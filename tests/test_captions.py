"""The pages' words in each family's own terms (dlm.workbench.captions), the control notebook's
sections that a family lacks or a report did not ask for, and the configuration table by family."""

import pytest

from dlm.core.config import Config
from dlm.core.errors import UserError
from dlm.families import FAMILIES
from dlm.workbench import captions, notebook

# Words that belong to the Gaussian family alone: no page of another family may use them.
GAUSSIAN_WORDS = ("sigma0", "q(x0|w)", "MSE", "rounding", "Diffusion-LM")


def text_of(markdown) -> str:
    return markdown.data


@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "gaussian"])
def test_no_caption_of_another_family_uses_the_gaussian_family_s_words(name):
    shown = [text_of(captions.caption(name, "losses")), text_of(captions.caption(name, "table")),
             text_of(captions.family_line(Config(model=name))), text_of(captions.verdict_where(name))]
    if captions.has(name, "likelihood"):
        shown.append(text_of(captions.likelihood(name)))
    if captions.has(name, "trajectory"):
        shown.append(captions.trajectory_note(name))
    for text in shown:
        assert not [word for word in GAUSSIAN_WORDS if word in text], text


def test_the_gaussian_captions_explain_its_geometry_and_its_two_losses():
    assert "sigma0" in text_of(captions.caption("gaussian", "table"))
    losses = text_of(captions.caption("gaussian", "losses"))
    assert "MSE" in losses and "rounding" in losses
    assert "Diffusion-LM" in text_of(captions.likelihood("gaussian"))
    assert "collapse-analysis page" in text_of(captions.verdict_where("gaussian"))


def test_the_masked_pages_say_what_the_masked_family_is():
    assert "NELBO" in text_of(captions.caption("masked", "losses")) and "NELBO" in text_of(captions.likelihood("masked"))
    assert "mask rate" in captions.trajectory_note("masked") and "<mark>" in captions.trajectory_note("masked")
    where = text_of(captions.verdict_where("masked"))
    assert "samples page" in where and "no collapse-analysis page" in where
    assert text_of(captions.family_line(Config(model="masked"))).startswith("A run of **masked (absorbing-state) "
                                                                            "diffusion (MDLM)**")
    blocks = Config(model="masked", block_size=4, block_training="all")
    assert "masked block diffusion (BD3-LM), blocks of 4 tokens generated left to right" in text_of(
        captions.family_line(blocks))


def test_a_section_the_family_lacks_is_one_line_with_why():
    assert captions.lacks("gaussian", "guidance") is None and captions.lacks("masked", "likelihood") is None
    line = captions.lacks("masked", "guidance")
    assert line.startswith("Classifier guidance is not available for the 'masked' family: its chain moves between "
                           "discrete words") and line.endswith("(dlm.families.masked).")
    assert captions.lacks("masked", "cosine").startswith("The cosine decoder is not available for the 'masked' family: "
                                                         "it has no rounding step")
    assert "its NLL is exact" in captions.lacks("ar", "likelihood")
    assert "no reverse chain" in captions.lacks("ar", "trajectory") and "no reverse chain" in captions.lacks("ar", "curve")
    with pytest.raises(ValueError, match="no 'trajectory' caption"):
        captions.caption("ar", "trajectory")


def test_a_section_opens_with_its_caption_or_is_one_line(capsys, monkeypatch):
    shown = []
    monkeypatch.setattr(captions, "display", shown.append)
    assert captions.section("gaussian", "cosine") and capsys.readouterr().out == ""
    assert "cosine similarity" in text_of(shown.pop())
    assert captions.section("masked", "likelihood") and "NELBO" in text_of(shown.pop())  # the family's own caption
    assert not captions.section("masked", "cosine", skipped="not asked")  # the family's reason comes first
    assert capsys.readouterr().out.startswith("The cosine decoder is not available for the 'masked' family: ")
    assert not captions.section("masked", "curve", skipped="Not computed here (curve_steps is empty).")
    assert capsys.readouterr().out == "Not computed here (curve_steps is empty).\n" and shown == []


def test_a_control_section_says_why_it_is_not_shown(capsys, monkeypatch):
    monkeypatch.setattr(captions, "display", lambda shown: None)
    assert notebook.shows_task("gaussian", "guidance", ["infill", "guidance"])
    assert capsys.readouterr().out == ""
    assert not notebook.shows_task("masked", "guidance", ["infill", "prefix", "length"])  # not asked, and not available
    out = capsys.readouterr().out
    assert out.startswith("Classifier guidance is not available for the 'masked' family: ") and out.count("\n") == 1
    assert not notebook.shows_task("masked", "length", ["infill", "prefix"])
    assert capsys.readouterr().out.startswith("Not asked for: the task parameter ('infill,prefix') leaves out length")
    assert notebook.control_tasks("infill, guidance") == ["infill", "guidance"]
    with pytest.raises(UserError, match="Unknown task.s. guidence: use infill, prefix, length, guidance"):
        notebook.control_tasks("infill,guidence")


def test_the_configuration_table_lists_the_keys_the_run_s_family_reads():
    masked = Config(model="masked", mask_rate_min=0.3)
    table, line = notebook.configuration_table(masked, masked)
    assert line is None
    shown = set(table.index)
    assert {"mask_rate_min", "lr", "seq_len", "embed_dim", "sample_steps"} <= shown
    assert not shown & {"schedule", "diffusion_steps", "predict", "rounding_weight", "clamp", "sample_eta", "rounding"}
    gaussian = set(notebook.configuration_table(Config(), Config())[0].index)
    assert {"schedule", "diffusion_steps", "clamp", "rounding"} <= gaussian and "mask_rate_min" not in gaussian
