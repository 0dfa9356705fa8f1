"""Every bad input a new user gave the CLI ends in one line `dlm CMD: error: ...`, exit 2, no
traceback, and nothing written (or lost). In-process through dlm.cli.main: the fast lane."""

import json
import logging
import math
import os
import shutil
import typing

import pytest
import torch

from dlm.cli import main
from dlm.core.checkpoint import load_checkpoint, save_checkpoint
from dlm.core.config import ConfigError, field_types, load_config, load_yaml, machine_memory_bytes, training_memory_bytes
from dlm.core.data import check_destination, check_run_folder
from dlm.core.runtime import pick_device
from dlm.runs.sample import SampleOptions
from tests.conftest import ROOT, capable, family_list, key_readers, make_corpus, option_readers, toy_run_dir

SMOKE = str(ROOT / "params" / "smoke.yaml")
QUICK = ["--max_steps", "2", "--precision", "fp32", "--device", "cpu", "--min_count", "1",
         "--max_train_tokens", "none"]


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dlm {command}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A diffusion run and an AR run, two steps each (the module's only training)."""
    root = tmp_path_factory.mktemp("runs")
    corpus = make_corpus(root / "corpus.txt")
    for name, command in (("gaussian", "train"), ("ar", "train-ar")):
        assert main([command, SMOKE, "--run_dir", str(root / name), "--corpus", str(corpus), *QUICK]) == 0
    return root


# --- training: every setting, checked before any work -------------------------------------------

def test_a_preset_run_as_another_family_names_the_keys_it_leaves_out(tmp_path, capsys):
    """`dlm train-ar params/smoke.yaml`: the AR at the smoke preset's size; the Gaussian keys the
    preset sets are named and left out, while the same key given by the user is refused."""
    corpus = str(make_corpus(tmp_path / "corpus.txt"))
    assert main(["train-ar", SMOKE, "--run_dir", str(tmp_path / "ar"), "--corpus", corpus, *QUICK]) == 0
    out = capsys.readouterr().out
    assert "is a preset of another family: its diffusion_steps, sample_steps (read by no 'ar' run) are left out" in out
    saved = load_yaml(tmp_path / "ar" / "config.yaml")
    assert saved["diffusion_steps"] == 2000 and saved["sample_steps"] == 200 and saved["width"] == 32
    refused(capsys, "train-ar", ["train-ar", SMOKE, "--run_dir", str(tmp_path / "ar2"), "--corpus", corpus,
                                 "--sample_steps", "7", *QUICK],
            f"'sample_steps' (7) is an option of {key_readers('sample_steps')}", tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--rounding_weight", "nan"], "'rounding_weight' must be a finite number, got nan"),
    (["--lr", "inf"], "'lr' must be a finite number, got inf"),
    (["--max_steps", "-1"], "'max_steps' must be at least 1 (or left out, null), got -1"),
    (["--val_batches", "0"], "'val_batches' must be at least 1, got 0"),
    (["--threads", "-2"], "'threads' must be a number of threads, or 0 or null for torch's choice; got -2"),
    (["--device", "tpu"], "one of: auto, cpu, cuda"),
    (["--width", "1000000"], "GiB to train"),
    (["--progress", "false"], "'false' follows a switch, which takes no value: write --KEY or --no-KEY"),
    (["--block_size", "5"], "'block_size' (5) must divide seq_len (16): use one of 1, 2, 4, 8, 16"),
    (["--block_size", "4", "--left_to_right", "1"], "'block_size' and 'left_to_right' both order the generation"),
    (["--control_tasks", "infill,guidence"], "'control_tasks' names guidence: use a comma list of infill, prefix"),
    (["--tokenizer", "bpe", "--bpe_vocab_size", "500"], "'bpe_vocab_size' must be in [2000, 8000]"),
    (["--tokenizer", "sentencepiece"], "one of: word, bpe, char"),
    # the registry names every family; a Gaussian-only key on a masked run names the key and the family
    (["--model", "gpt"], f"Unknown model family 'gpt': use one of {family_list()}."),
    (["--model", "masked", "--embedding_norm", "l2"],
     "'embedding_norm' (l2) is an option of the gaussian family; the 'masked' family does not read it"),
    (["--model", "masked", "--no-use_learned_embeddings"],
     "'use_learned_embeddings' (False) is an option of the gaussian family"),
    (["--model", "masked", "--predict", "epsilon"], "'predict' (epsilon) is an option of the gaussian family"),
    (["--model", "masked", "--self_condition", "0.5"], "'self_condition' (0.5) is an option of the gaussian family"),
    (["--model", "masked", "--sample_x0", "expected"], "'sample_x0' (expected) is an option of the gaussian family"),
    (["--model", "masked", "--block_size", "4"], "A masked run with block_size trains every block at once"),
    (["--model", "masked", "--timestep_sampling", "loss_second_moment"],
     "'timestep_sampling' (loss_second_moment) is an option of the gaussian family; the 'masked' family does not"),
    (["--model", "ar", "--timestep_sampling", "loss_second_moment"],
     "'timestep_sampling' (loss_second_moment) is an option of the gaussian family; the 'ar' family does not read it"),
    # a key every other family ignores is refused by name, with the family that reads it (issue 32, item 7)
    (["--mask_rate_min", "0.3"], "'mask_rate_min' (0.3) is an option of the masked family; the 'gaussian' family does "
                                 "not read it: leave it at its default (0.001) or use model: masked."),
    (["--model", "ar", "--sample_x0", "posterior"], "'sample_x0' (posterior) is an option of the gaussian family; the 'ar'"),
    (["--model", "ar", "--block_size", "4", "--block_training", "all"],
     f"'block_size' (4) is an option of {key_readers('block_size')}; the 'ar' family does not read it"),
    (["--block_training", "all"], "'block_training' (all) applies to block runs only: set block_size"),
    (["--sample_steps", "101"], "'sample_steps' (101) must be at most diffusion_steps (100)"),
    (["--timestep_sampling", "loss_second_moment", "--left_to_right", "1"],
     "'timestep_sampling: loss_second_moment' draws one timestep per sequence and 'left_to_right' one per position"),
    (["--timestep_sampling", "loss_second_moment", "--time_warp"],
     "'timestep_sampling: loss_second_moment' draws one timestep per sequence and 'time_warp' its own"),
    (["--timestep_sampling", "importance"], "one of: uniform, loss_second_moment"),
    (["--model", "masked", "--mask_rate_min", "0.6", "--mask_rate_max", "0.5"], "'mask_rate_min' (0.6) must be below"),
])
def test_bad_settings_are_refused_before_training(tmp_path, capsys, extra, message):
    run_dir = tmp_path / "run"
    assert main(["train", SMOKE, "--run_dir", str(run_dir), *extra]) == 2
    assert message in one_error_line(capsys, "train")
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides, message", [
    ({"lr": 0.0}, "'lr' must be in (0, inf)"),
    ({"weight_decay": -0.1}, "'weight_decay' must be in [0, inf)"),
    ({"dropout": 1.0}, "'dropout' must be in [0, 1)"),
    ({"grad_clip": -1.0}, "'grad_clip' must be in [0, inf)"),
    ({"rounding_weight": -1.0}, "'rounding_weight' must be in [0, 1000]"),
    ({"embedding_init_std": 0.0}, "'embedding_init_std' must be in (0, inf)"),
    ({"embedding_lr_scale": -math.inf}, "'embedding_lr_scale' must be a finite number"),
    ({"embedding_scale": math.nan}, "'embedding_scale' must be a finite number"),
    ({"sample_eta": math.nan}, "'sample_eta' must be a finite number"),
    ({"sample_eta": 1.5}, "'sample_eta' must be in [0, 1]"),
    ({"clamp_fraction": math.inf}, "'clamp_fraction' must be a finite number"),
    ({"decode_temperature": -1.0}, "'decode_temperature' must be in [0, inf)"),
    ({"self_condition": math.nan}, "'self_condition' must be a finite number"),
    ({"left_to_right": -0.5}, "'left_to_right' must be in [0, inf)"),
    ({"ema_decay": 1.0}, "'ema_decay' must be in [0, 1)"),
    ({"max_train_seconds": math.inf}, "'max_train_seconds' must be a finite number"),
    ({"max_train_seconds": 0.0}, "'max_train_seconds' must be in (0, inf)"),
    ({"warmup_steps": -5}, "'warmup_steps' must be 0 or more"),
    ({"max_train_tokens": 0}, "'max_train_tokens' must be at least 1"),
    ({"diffusion_steps": 10**11}, "GiB to train"),
    ({"embed_dim": 10**8}, "GiB to train"),
    ({"seq_len": 10**7}, "GiB to train"),
    ({"batch_size": 10**9}, "GiB to train"),
])
def test_every_number_setting_is_finite_and_in_range(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(SMOKE, **overrides)
    assert message in str(error.value)


def test_every_float_key_is_checked_for_finiteness():
    for key, tp in field_types().items():
        if float in (tp, *typing.get_args(tp)):
            with pytest.raises(ConfigError, match=f"'{key}' must be a finite number"):
                load_config(SMOKE, **{key: math.nan})


def test_memory_estimate_names_the_sizes_and_the_machine():
    with pytest.raises(ConfigError, match=r"needs about [\d,.]+ GiB to train \(width 1000000.*this machine has"):
        load_config(SMOKE, width=1_000_000)
    for preset in ("default", "paper_scale"):  # the shipped presets fit (24 GiB machines)
        assert training_memory_bytes(load_config(ROOT / "params" / f"{preset}.yaml")) < 8 * 2**30
    assert machine_memory_bytes() > 2**30
    # training every block at once feeds the clean window beside the noised one
    plain = training_memory_bytes(load_config(SMOKE, block_size=4))
    assert training_memory_bytes(load_config(SMOKE, block_size=4, block_training="all")) > 1.5 * plain


def test_yaml_numeric_strings_are_read_as_numbers(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 1e-3\nweight_decay: 1E-2\n")  # PyYAML reads these as strings
    assert load_yaml(preset)["lr"] == "1e-3"
    config = load_config(preset)
    assert config.lr == 0.001 and config.weight_decay == 0.01
    preset.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="'lr' got 'fast'; it must be a number"):
        load_config(preset)
    preset.write_text("lr: .nan\n")
    with pytest.raises(ConfigError, match="'lr' must be a finite number"):
        load_config(preset)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_word_vectors_with_non_finite_values(tmp_path, capsys, bad):
    corpus = make_corpus(tmp_path / "corpus.txt")
    vectors = tmp_path / "vectors.txt"
    vectors.write_text(f"2 16\nspeak {' '.join(['0.5'] * 16)}\nRomeo {' '.join(['0.1'] * 15)} {bad}\n")
    assert main(["train", SMOKE, "--run_dir", str(tmp_path / "run"), "--corpus", str(corpus), *QUICK,
                 "--init_from_pretrained", str(vectors)]) == 2
    assert "vectors.txt:3 ('Romeo') has a value that is not a finite number" in one_error_line(capsys, "train")
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- the run folder ------------------------------------------------------------------------------

def test_run_dir_that_is_a_file_under_a_file_or_empty(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    cases = [(str(afile), "is a file: give a folder"), (str(afile / "run"), "which is a file: choose another folder"),
             ("", "run_dir is empty: give a folder"), ("  ", "run_dir is empty"),
             ("/proc/dlm_run/x", "cannot be created")]
    monkeypatch.chdir(tmp_path)
    for run_dir, message in cases:
        assert main(["train", SMOKE, "--run_dir", run_dir]) == 2
        assert message in one_error_line(capsys, "train")
    assert afile.read_text() == "keep me"
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()


def test_check_run_folder_leaves_nothing_behind(tmp_path):
    assert check_run_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    readonly = tmp_path / "ro"
    readonly.mkdir(mode=0o555)
    if not os.access(readonly, os.W_OK):  # root may write anywhere
        with pytest.raises(ValueError, match="no write permission"):
            check_run_folder(readonly / "run")


@pytest.mark.parametrize("in_the_way, message", [
    ("file", "--tensorboard writes its event files to 'RUN/tensorboard', which is a file: move that file away, or "
             "train without --tensorboard."),
    ("dangling link", "--tensorboard's folder 'RUN/tensorboard' cannot be created: File exists. Choose another run "
                      "folder, or train without --tensorboard."),
])
@pytest.mark.parametrize("resume", [False, True])
def test_a_tensorboard_folder_that_cannot_be_made_is_refused_before_the_run_folder(runs, tmp_path, capsys, in_the_way,
                                                                                    message, resume):
    run = tmp_path / "run"
    if resume:
        shutil.copytree(runs / "gaussian", run)
    else:
        run.mkdir()
    if in_the_way == "file":
        (run / "tensorboard").write_text("keep me")
    else:
        (run / "tensorboard").symlink_to(tmp_path / "nowhere" / "tb")
    corpus = make_corpus(tmp_path / "corpus.txt")
    refused(capsys, "train", ["train", SMOKE, "--run_dir", str(run), "--corpus", str(corpus), *QUICK, "--tensorboard",
                              *(["--resume"] if resume else [])], message.replace("RUN", str(run)), tmp_path)
    if not resume:  # nothing of a run was made beside what was in the way
        assert [p.name for p in run.iterdir()] == ["tensorboard"]


def test_train_function_checks_the_run_folder(tmp_path, smoke_config):
    from dlm.runs.train import train

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        train(smoke_config, tmp_path / "afile")
    with pytest.raises(ValueError, match="empty"):
        train(smoke_config, "")


def test_corpus_that_is_a_folder(tmp_path, capsys):
    assert main(["train", SMOKE, "--run_dir", str(tmp_path / "run"), "--corpus", str(tmp_path)]) == 2
    assert "is a folder: give a UTF-8 text file" in one_error_line(capsys, "train")


# --- sampling ------------------------------------------------------------------------------------

BAD_SAMPLE_OPTIONS = [
    (["--eta", "nan"], "eta must be a finite number, got nan"),
    (["--eta", "2"], "eta must be between 0"),
    (["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (["--temperature", "-1"], "temperature must be 0 (argmax) or positive"),
    (["--record_every", "-2"], "record_every must be 0 (no trajectory) or a number of steps, got -2"),
    (["--batch_size", "0"], "batch_size (samples drawn at once) must be at least 1, got 0"),
    (["--batch_size", "-1"], "batch_size (samples drawn at once) must be at least 1, got -1"),
    (["--num_samples", "0"], "num_samples must be at least 1, got 0"),
    (["--device", "tpu"], "device 'tpu' is not one dlm runs on: use auto, cpu, cuda or cuda:N"),
]
OPTION_NAMES = {"--eta": "eta", "--temperature": "temperature", "--record_every": "record_every",
                "--batch_size": "batch_size", "--num_samples": "num_samples"}


@pytest.mark.parametrize("total_steps", [2000, None], ids=["gaussian", "ar"])
@pytest.mark.parametrize("extra, message", [case for case in BAD_SAMPLE_OPTIONS if case[0][0] in OPTION_NAMES])
def test_bad_sample_options_fast(total_steps, extra, message):
    """The same checks as the CLI's, on SampleOptions (the diffusion chain and AR generate call it)."""
    flag, value = extra
    options = SampleOptions(**{OPTION_NAMES[flag]: (int if flag in ("--record_every", "--batch_size", "--num_samples")
                                                    else float)(value)})
    with pytest.raises(ValueError) as error:
        options.validate(total_steps)
    assert message in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gaussian", "ar"])
@pytest.mark.parametrize("extra, message", BAD_SAMPLE_OPTIONS)
def test_bad_sample_options(runs, tmp_path, capsys, model, extra, message):
    if model == "ar" and extra[0] in ("--eta", "--record_every"):  # options the AR sampler has none of
        message = f"{extra[0]} is an option of the"
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(runs / model), "--out", str(out), "--num_samples", "2", *extra]) == 2
    assert message in one_error_line(capsys, "sample")
    assert not out.exists()


@pytest.mark.slow
def test_a_diverged_run_is_not_sampled_into_empty_text(runs, tmp_path, capsys):
    checkpoint = runs / "gaussian" / "checkpoints" / "last.pt"
    payload = load_checkpoint(checkpoint)
    for name in ("model", "ema"):
        if isinstance(payload.get(name), dict):
            payload[name] = {k: v.float().fill_(math.nan) if v.is_floating_point() else v
                             for k, v in payload[name].items()}
    bad = tmp_path / "diverged.pt"
    save_checkpoint(bad, payload)
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(runs / "gaussian"), "--checkpoint", str(bad), "--out", str(out)]) == 2
    assert "holds nan or inf weights: the run diverged" in one_error_line(capsys, "sample")
    assert not out.exists()
    payload = load_checkpoint(checkpoint)  # a run trained with rounding_weight: nan before it was refused
    payload["config"]["rounding_weight"] = math.nan
    save_checkpoint(bad, payload)
    assert main(["sample", "--run_dir", str(runs / "gaussian"), "--checkpoint", str(bad), "--out", str(out)]) == 2
    line = one_error_line(capsys, "sample")
    assert "trained with a setting that dlm refuses now" in line and "'rounding_weight' must be a finite" in line
    assert not out.exists()


@pytest.mark.slow
def test_good_sampling_still_works(runs, tmp_path, capsys):
    for model, chain in (("gaussian", ["--steps", "5", "--eta", "0"]), ("ar", [])):
        out = tmp_path / f"{model}.jsonl"
        assert main(["sample", "--run_dir", str(runs / model), "--out", str(out), "--num_samples", "3",
                     "--batch_size", "2", *chain]) == 0
        assert len([json.loads(line) for line in out.read_text().splitlines()]) == 3


def test_sample_options_validate_directly():
    SampleOptions().validate(2000)
    SampleOptions(steps=10**6).validate()  # no chain (AR): steps are not checked
    with pytest.raises(ValueError, match="clamp_fraction must be a finite number"):
        SampleOptions(clamp_fraction=math.nan).validate(2000)


@pytest.mark.parametrize("name, message", [
    ("tpu", "is not one dlm runs on"), ("cuda:x", "is not one dlm runs on"), ("cpu:0", "is not one dlm runs on"),
])
def test_pick_device_names(name, message):
    with pytest.raises(ConfigError, match=message):
        pick_device(name)
    assert pick_device("cpu") == torch.device("cpu")


# --- infill (classifier-free control) -------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """Untrained runs (seq_len 16, 50 diffusion steps), saved in milliseconds: a diffusion run, an AR
    run, and a diffusion run whose corpus has no line breaks (so no blank line to end a speech)."""
    from tests.conftest import toy_run_dir

    root = tmp_path_factory.mktemp("toy_runs")
    toy_run_dir(root / "gaussian")
    toy_run_dir(root / "ar", model="ar")
    toy_run_dir(root / "masked", model="masked")
    toy_run_dir(root / "one_line", text="To be, or not to be: that is the question.")
    toy_run_dir(root / "blocks", block_size=4, block_training="all")  # a Gaussian block run, prefix cached
    toy_run_dir(root / "blocks_one", block_size=4)  # trained one block per window: its prefix run every step
    return root


BAD_INFILL = [
    ("gaussian", ["--template", ""], "The template is empty: write fixed words and __ blanks"),
    ("gaussian", ["--template", "  "], "The template is empty"),
    ("gaussian", ["--template", "__ " * 17], "The template is 17 tokens long, more than the run's seq_len (16)"),
    ("gaussian", ["--template", "To be zorgle __ blorp"],
     "not in the run's vocabulary: 'zorgle', 'blorp'. Use words from the run's vocabulary (its vocab.json)"),
    ("gaussian", ["--prefix", ""], "The prefix is empty"),
    ("gaussian", ["--prefix", "Hamlet"], "not in the run's vocabulary: 'Hamlet'"),
    ("gaussian", ["--length", "0"], "--length must be between 1 and 12 (the run's seq_len 16 less"),
    ("gaussian", ["--length", "13"], "--length must be between 1 and 12"),
    ("gaussian", ["--template", "__", "--mbr", "0"], "--mbr must be at least 1"),
    ("gaussian", ["--template", "__", "--steps", "51"], "steps must be between 1 and the run's diffusion_steps (50)"),
    ("gaussian", ["--template", "__", "--num_samples", "0"], "num_samples must be at least 1"),
    ("ar", ["--template", "To __ be"], "--template is not available for the 'ar' family (an autoregressive run "
                                       "writes left to right): use --prefix"),
    ("ar", ["--length", "4"], "--length is not available for the 'ar' family (an autoregressive run writes left to "
                              f"right): use --prefix, or a run of {capable('length')} for --length"),
    ("masked", ["--template", "To be zorgle __"], "not in the run's vocabulary: 'zorgle'"),
    ("masked", ["--template", "__", "--steps", "0"], "steps must be at least 1, got 0"),
    ("masked", ["--template", "__", "--steps", "12801"], "steps must be at most 12,800 for this run, got 12,801: a "
                                                           "masked chain unmasks each of a window's 16 positions"),
    ("one_line", ["--length", "4"], "--length needs the blank line that ends a speech, but this run's vocabulary "
                                    "has no newline token"),
]


@pytest.mark.parametrize("run, extra, message", BAD_INFILL)
def test_bad_infill_inputs(toy_runs, tmp_path, capsys, run, extra, message):
    out = tmp_path / "infill.jsonl"
    assert main(["infill", "--run_dir", str(toy_runs / run), "--out", str(out), "--steps", "3", *extra]) == 2
    assert message in one_error_line(capsys, "infill")
    assert not out.exists()


def test_infill_all_blanks_is_an_unconditional_sample(toy_runs, tmp_path, capsys):
    out = tmp_path / "infill.jsonl"
    assert main(["infill", "--run_dir", str(toy_runs / "gaussian"), "--template", "__ __", "--steps", "3",
                 "--num_samples", "2", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["fixed_positions"] for r in records] == [[], []]


# What each family's sampler reads, written out here (not read from the families): a record lists these
# options and no other, so a masked or AR record never claims a spacing, clamp or decoder it did not use.
READ_BY = {"gaussian": {"num_samples", "seed", "batch_size", "steps", "spacing", "clamp", "clamp_fraction", "eta",
                         "x0", "temperature", "unk", "decoder", "record_every"},
           "masked": {"num_samples", "seed", "batch_size", "steps", "temperature", "unk", "record_every", "sampler"},
           "ar": {"num_samples", "seed", "batch_size", "temperature", "unk"}}
OPTION_FIELDS = {"num_samples", "seed", "batch_size", "steps", "spacing", "clamp", "clamp_fraction", "eta", "x0",
                 "temperature", "unk", "decoder", "record_every", "sampler"}


@pytest.mark.parametrize("model", list(READ_BY))
def test_sample_and_infill_records_list_what_the_sampler_read(toy_runs, tmp_path, capsys, model):
    assert set(SampleOptions.__dataclass_fields__) == OPTION_FIELDS  # a new option is added to READ_BY too
    steps = [] if model == "ar" else ["--steps", "3"]
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(toy_runs / model), "--out", str(out), "--num_samples", "2", *steps]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    assert set(record) & OPTION_FIELDS == READ_BY[model], set(record) & OPTION_FIELDS ^ READ_BY[model]
    assert record["model"] == model and "text" in record and "ids" in record
    control = tmp_path / "c.jsonl"
    assert main(["infill", "--run_dir", str(toy_runs / model), "--prefix", "To be", "--num_samples", "2",
                 "--out", str(control), *steps]) == 0
    record = json.loads(control.read_text().splitlines()[0])
    assert set(record) & OPTION_FIELDS == READ_BY[model]
    # only the Gaussian chain rounds the fixed words too; the others give them back as given
    assert ("kept_by_rounding" in record) == (model == "gaussian")


@pytest.mark.parametrize("run", ["blocks", "blocks_one"])
@pytest.mark.parametrize("extra", [["--template", "__ __ be __ __ __ __ __ __ question"], ["--prefix", "To be"],
                                   ["--length", "3"]])
def test_every_control_works_on_a_gaussian_block_run(toy_runs, tmp_path, capsys, run, extra):
    out = tmp_path / "infill.jsonl"
    assert main(["infill", "--run_dir", str(toy_runs / run), "--steps", "3", "--num_samples", "2",
                 "--out", str(out), *extra]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record in records:
        fixed = dict(zip(record["fixed_positions"], record["fixed_ids"]))
        window = record.get("window_ids", record["ids"])
        assert len(window) == 16 and all(window[i] == word for i, word in fixed.items())


def test_a_block_chain_reads_the_fixed_words_of_its_finished_blocks(toy_runs, monkeypatch):
    """A fixed word the rounding would never give (it is banned from the draws) is still what the
    later blocks read as their context."""
    from dlm.families import gaussian_sampling
    from dlm.runs.build import load_run

    run = load_run(toy_runs / "blocks")
    word = run.tokenizer.stoi["question"]
    ids = torch.full((2, 16), run.tokenizer.pad_id)
    ids[:, 1] = word
    known = torch.zeros(2, 16, dtype=torch.bool)
    known[:, 1] = True
    fixed = gaussian_sampling.known_positions_hook(run.model, ids, known)
    contexts = []  # the words before and in each block, as each block's chain fixes them

    def spy(model, words, positions):
        contexts.append(words.clone())
        return fixed_hook(model, words, positions)

    fixed_hook = gaussian_sampling.known_positions_hook
    monkeypatch.setattr(gaussian_sampling, "known_positions_hook", spy)
    options = SampleOptions.from_config(run.config, steps=2)
    states = list(gaussian_sampling.sample_chain(run.model, run.objective, options, (2, 16),
                                                 generator=torch.Generator().manual_seed(0), hooks=[fixed],
                                                 banned=(word,)))
    assert (states[-1].words[:, 1] != word).all()  # what the rounding made of it, as decoded
    assert [c.shape[1] for c in contexts] == [4, 8, 12, 16]
    assert all((c[:, 1] == word).all() for c in contexts[1:])


@pytest.mark.parametrize("run, extra, message", [
    ("masked", ["--steps", "5"], "--steps scores the bound of a shortened chain; the 'masked' family's bound has no "
                                 "such chain: drop --steps."),
    ("masked", ["--spacing", "uniform"], "--spacing is an option of the gaussian family's sampler; the 'masked'"),
    ("ar", ["--steps", "5"], "A likelihood bound is not available for the 'ar' family"),
    ("ar", ["--x0", "expected"], "Its NLL is exact: give it as --ar_run."),
    ("gaussian", ["--steps", "0"], "--steps must be between 1 and the run's diffusion_steps (50), got 0."),
    ("gaussian", ["--steps", "51"], "--steps must be between 1 and the run's diffusion_steps (50), got 51."),
    ("gaussian", ["--spacing", "uniform"], "--spacing places the steps of a shortened chain: give --steps N too"),
])
def test_the_bound_of_a_chain_is_asked_of_a_gaussian_run_only(toy_runs, tmp_path, capsys, run, extra, message):
    refused(capsys, "evaluate", ["evaluate", "--nll", "--run_dir", str(toy_runs / run), "--windows", "2",
                                 "--json", str(tmp_path / "e.json"), *extra], message, tmp_path, toy_runs)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command, steps, message", [
    ("sample", "0", "steps must be at least 1, got 0."),
    ("sample", "12801", "steps must be at most 12,800 for this run, got 12,801"),
    ("sample", str(10**6), "from 50 x 16^2 = 12,800 steps on, fewer than 1 sample in 100 has two positions unmasked"),
    ("evaluate", str(10**6), "steps must be at most 12,800 for this run, got 1,000,000"),
])
def test_masked_steps_are_bounded_before_anything_runs(toy_runs, tmp_path, capsys, command, steps, message):
    destination = (["--out", str(tmp_path / "s.jsonl")] if command == "sample" else
                   ["--matched", "--teacher", str(toy_runs / "ar"), "--json", str(tmp_path / "e.json")])
    before = snapshot(tmp_path, toy_runs)
    assert main([command, "--run_dir", str(toy_runs / "masked"), "--steps", steps, *destination]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # not even the chain's cost: nothing runs
    assert message in one_error_line_from(captured.err, command)
    assert snapshot(tmp_path, toy_runs) == before and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["sample", "infill", "evaluate"])  # every command that draws a run's samples
@pytest.mark.parametrize("run, extra, message", [
    ("masked", ["--sampler", "first_hitting", "--steps", "5"],
     "--steps sets the steps of the grid and confidence samplers; first_hitting unmasks one position per denoiser "
     "call and takes no steps: drop --steps."),
    ("gaussian", ["--sampler", "confidence"], "--sampler is an option of the masked family's sampler; the "
                                              "'gaussian' family has none: drop --sampler."),
    ("ar", ["--sampler", "grid"], "--sampler is an option of the masked family's sampler; the 'ar' family has none"),
])
def test_a_masked_sampler_is_asked_of_a_masked_run_alone(toy_runs, tmp_path, capsys, command, run, extra, message):
    destination = {"sample": ["--out", str(tmp_path / "s.jsonl")],
                   "infill": ["--prefix", "To be", "--out", str(tmp_path / "c.jsonl")],
                   "evaluate": ["--matched", "--teacher", str(toy_runs / "ar"), "--json", str(tmp_path / "e.json")]}
    before = snapshot(tmp_path, toy_runs)
    assert main([command, "--run_dir", str(toy_runs / run), *destination[command], *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert message in one_error_line_from(captured.err, command)
    assert snapshot(tmp_path, toy_runs) == before and not list(tmp_path.iterdir())


@pytest.mark.parametrize("evaluation, message", [
    (["--nll", "--run_dir", "RUNS/masked"], "--nll scores held-out windows and draws none: drop --sampler"),
    (["--samples", "TMP/s.jsonl", "--teacher", "RUNS/ar"], "--samples scores samples already drawn and draws none"),
])
def test_sampler_is_refused_by_an_evaluation_that_draws_no_samples(toy_runs, tmp_path, capsys, evaluation, message):
    argv = [arg.replace("RUNS", str(toy_runs)).replace("TMP", str(tmp_path)) for arg in evaluation]
    refused(capsys, "evaluate", ["evaluate", *argv, "--sampler", "confidence", "--json", str(tmp_path / "e.json")],
            "--sampler chooses the chain --matched draws --run_dir's samples with; " + message, tmp_path, toy_runs)
    assert not list(tmp_path.iterdir())


def test_past_the_masked_bound_two_positions_rarely_unmask_at_one_step():
    """The bound's claim, drawn: at 50 n^2 steps fewer than 1 window in 100 has two of its n
    positions unmasked at the same step (an oracle apart from the bound's arithmetic)."""
    from dlm.families.masked import most_steps, unmask_chain

    positions, windows = 4, 4000
    z = torch.full((windows, positions), 9)
    shared = torch.zeros(windows, dtype=torch.bool)
    predict = lambda ids, rows: torch.zeros(*ids.shape, 9)  # noqa: E731 -- any words: only the timing counts
    for state in unmask_chain(predict, z, 9, most_steps(positions), torch.Generator().manual_seed(0)):
        shared |= state.unmasked.sum(1) > 1
    assert shared.float().mean() < 0.01
    z_few = torch.full((windows, positions), 9)
    few = torch.zeros(windows, dtype=torch.bool)
    for state in unmask_chain(predict, z_few, 9, positions * 2, torch.Generator().manual_seed(0)):
        few |= state.unmasked.sum(1) > 1
    assert few.float().mean() > 0.1  # with few steps it is common: the bound is where it stops mattering


# A Gaussian chain's option given for a masked run: one line naming the option and the family, nothing written.
GAUSSIAN_ONLY = [
    ("sample", ["--clamp"], "--clamp is an option of the gaussian family's sampler; the 'masked' family has none"),
    ("sample", ["--no-clamp"], "--clamp is an option of the gaussian family's sampler"),
    ("sample", ["--x0", "expected"], "--x0 is an option of the gaussian family's sampler; the 'masked' family"),
    ("sample", ["--decoder", "cosine"], "--decoder is an option of the gaussian family's sampler; the 'masked'"),
    ("sample", ["--eta", "0"], "--eta is an option of the gaussian family's sampler"),
    ("sample", ["--spacing", "uniform"], "--spacing is an option of the gaussian family's sampler"),
    ("evaluate", ["--nll", "--x0", "expected"], "--x0 is an option of the gaussian family's sampler; the 'masked'"),
    ("train-classifier", ["--attribute", "question"],
     "A latent classifier (noised latents for guidance) is not available for the 'masked' family"),
    ("train-classifier", ["--attribute", "question"], "Train the judge (--kind judge) on it, or give a run of the "
                                                      "gaussian family."),
]


@pytest.mark.parametrize("command, extra, message", GAUSSIAN_ONLY)
def test_gaussian_options_on_a_masked_run(toy_runs, tmp_path, capsys, command, extra, message):
    out = tmp_path / "out.jsonl"
    destination = {"sample": ["--out", str(out)], "evaluate": ["--json", str(out)],
                   "train-classifier": ["--out", str(out.with_suffix(".pt"))]}[command]
    assert main([command, "--run_dir", str(toy_runs / "masked"), *destination, *extra]) == 2
    assert message in one_error_line(capsys, command)
    assert not list(tmp_path.iterdir())


# A sampling option the AR sampler does not read (it has no chain), given for an AR run: one line naming
# the option and the family, nothing written; the options it reads, and every default, still sample.
UNREAD_BY_AR = [
    ("sample", ["--clamp"], "--clamp is an option of the gaussian family's sampler; the 'ar' family has none: drop --clamp"),
    ("sample", ["--no-clamp"], "--clamp is an option of the gaussian family's sampler; the 'ar' family has none"),
    ("sample", ["--clamp_fraction", "0.5"], "--clamp_fraction is an option of the gaussian family's sampler; the 'ar'"),
    ("sample", ["--eta", "0"], "--eta is an option of the gaussian family's sampler; the 'ar' family has none"),
    ("sample", ["--eta", "nan"], "--eta is an option of the gaussian family's sampler; the 'ar' family has none"),
    ("sample", ["--x0", "expected"], "--x0 is an option of the gaussian family's sampler; the 'ar' family has none"),
    ("sample", ["--spacing", "uniform"], "--spacing is an option of the gaussian family's sampler; the 'ar' family"),
    ("sample", ["--decoder", "cosine"], "--decoder is an option of the gaussian family's sampler; the 'ar' family"),
    ("sample", ["--steps", "5"], f"--steps is an option of {option_readers('steps')}; "
                                 "the 'ar' family has none: drop --steps"),
    ("sample", ["--record_every", "2"], f"--record_every is an option of {option_readers('record_every')}; "
                                        "the 'ar' family has none"),
    ("infill", ["--prefix", "To be", "--steps", "3"], f"--steps is an option of {option_readers('steps')}"),
    ("evaluate", ["--matched", "--steps", "5"], f"--steps is an option of {option_readers('steps')}"),
    ("evaluate", ["--matched", "--spacing", "uniform"], "--spacing is an option of the gaussian family's sampler"),
    ("evaluate", ["--matched", "--x0", "expected"], "--x0 is an option of the gaussian family's sampler; the 'ar'"),
]


@pytest.mark.parametrize("command, extra, message", UNREAD_BY_AR)
def test_options_the_ar_sampler_does_not_read(toy_runs, tmp_path, capsys, command, extra, message):
    out = tmp_path / "out.jsonl"
    destination = {"sample": ["--out", str(out)], "infill": ["--out", str(out)],
                   "evaluate": ["--json", str(out.with_suffix(".json")), "--teacher", str(toy_runs / "ar")]}[command]
    assert main([command, "--run_dir", str(toy_runs / "ar"), *destination, *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in one_error_line_from(err, command)
    assert not list(tmp_path.iterdir())


def test_the_options_the_ar_sampler_reads_and_every_default_still_sample(toy_runs, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(toy_runs / "ar"), "--out", str(out), "--num_samples", "3",
                 "--batch_size", "2", "--seed", "1", "--temperature", "0.5", "--no-unk", "--decoder", "learned",
                 "--record_every", "0"]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert main(["sample", "--run_dir", str(toy_runs / "ar"), "--out", str(out), "--num_samples", "2",
                 "--overwrite"]) == 0
    assert main(["infill", "--run_dir", str(toy_runs / "ar"), "--prefix", "To be", "--num_samples", "2"]) == 0


# --- classifier-guided control ------------------------------------------------------------------

@pytest.mark.parametrize("command, extra, message", [
    ("train-classifier", ["--attribute", "colour:red"], "Unknown attribute 'colour:red': use question (the window"),
    ("train-classifier", ["--attribute", "word:Jupiter"], "'Jupiter' is not a word of the run's vocabulary"),
    ("train-classifier", ["--attribute", "question", "--steps", "0"], "steps must be at least 1, got 0"),
    ("control-table", ["--attribute", "colour:red"], "Unknown attribute 'colour:red'"),
    ("control-table", ["--attribute", "question"], "No latent classifier at"),
    ("control-table", ["--attribute", "question", "--strengths", "0.1,strong"], "--strengths must be numbers"),
    ("control-table", ["--attribute", "question", "--strengths", "nan"], "--strengths must be positive"),
])
def test_bad_control_inputs(runs, tmp_path, capsys, command, extra, message):
    destination = ["--out", str(tmp_path / "c.pt")] if command == "train-classifier" else [
        "--ar_run", str(runs / "ar"), "--out_dir", str(tmp_path / "table")]
    assert main([command, "--run_dir", str(runs / "gaussian"), *destination, *extra]) == 2
    assert message in one_error_line(capsys, command)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("run, message", [
    ("masked", "Classifier guidance of 'RUN/checkpoints/last.pt' is not available for the 'masked' family: its chain "
               "moves between discrete words"),
    ("masked", "(dlm.families.masked). Guide a run of the gaussian family; dlm infill controls this one"),
    ("ar", "is not available for the 'ar' family"),
    ("blocks", "Classifier guidance steers one chain over the whole window; this run samples in blocks (block_size 4)"),
])
def test_control_table_refuses_a_run_guidance_cannot_steer_before_asking_for_classifiers(toy_runs, tmp_path, capsys,
                                                                                         run, message):
    line = refused(capsys, "control-table", ["control-table", "--run_dir", str(toy_runs / run), "--ar_run",
                                             str(toy_runs / "ar"), "--attribute", "question", "--out_dir",
                                             str(tmp_path / "table")],
                   message.replace("RUN", str(toy_runs / run)), tmp_path, toy_runs)
    assert "train-classifier" not in line and not (tmp_path / "table").exists()


# --- destinations: one check (dlm.core.data.check_destination), before any work, for every writer --

def snapshot(*roots) -> dict:
    """Every file under `roots`, path -> bytes: what a refused command must leave byte-identical."""
    return {p: p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, command: str, argv: list[str], message: str, *roots) -> str:
    before = snapshot(*roots)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = one_error_line_from(err, command)
    assert message in line, line
    assert snapshot(*roots) == before
    return line


def one_error_line_from(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dlm {command}: error: "), lines
    return lines[0]


LONG_NAME = "x" * 300


@pytest.mark.parametrize("out, message", [
    ("RUN/checkpoints/last.pt", "must end in .jsonl, e.g. last.jsonl"),
    ("RUN/checkpoints/more.jsonl", "lies inside the run's checkpoints folder"),
    ("HERE/notes.txt", "must end in .jsonl, e.g. notes.jsonl"),
    ("/dev/null", "is a device or other special file"),
    ("/proc/dlm_nope/x.jsonl", "cannot be written: No such file or directory"),
    (f"HERE/{LONG_NAME}.jsonl", "cannot be written: File name too long"),
    ("HERE/taken.jsonl", "the txt file beside --out 'HERE/taken.txt' is a folder"),
    ("HERE/afile/x.jsonl", "which is a file: choose another path"),
    ("", "--out is empty"),
])
def test_sample_out_is_refused_before_sampling(toy_runs, tmp_path, capsys, out, message):
    run = tmp_path / "run"
    shutil.copytree(toy_runs / "gaussian", run)
    (tmp_path / "taken.txt").mkdir()
    (tmp_path / "afile").write_text("keep me")
    out = out.replace("RUN", str(run)).replace("HERE", str(tmp_path))
    message = message.replace("HERE", str(tmp_path))
    refused(capsys, "sample", ["sample", "--run_dir", str(run), "--steps", "2", "--num_samples", "2", "--out", out],
            message, tmp_path)
    assert not list(tmp_path.glob("*.jsonl")) and not (tmp_path / "afile.txt").exists()
    assert not os.path.exists("/dev/null.txt") and not os.path.exists("/proc/dlm_nope")


def sample_argv(run, out, *extra):
    return ["sample", "--run_dir", str(run), "--steps", "2", "--num_samples", "2", "--batch_size", "1",
            "--out", str(out), *extra]


@pytest.mark.parametrize("existing", [["s.jsonl"], ["s.txt"], ["s.trajectory.json"], ["s.jsonl", "s.txt"]])
def test_sample_never_replaces_samples_unless_asked(toy_runs, tmp_path, capsys, existing):
    for name in existing:
        (tmp_path / name).write_text("earlier samples\n")
    line = refused(capsys, "sample", sample_argv(toy_runs / "gaussian", tmp_path / "s.jsonl"),
                   f"already holds {', '.join(existing)}: pass --overwrite to replace that set of samples", tmp_path)
    assert str(tmp_path) in line


def test_sample_overwrite_replaces_the_whole_set(toy_runs, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(sample_argv(toy_runs / "gaussian", out, "--record_every", "1")) == 0
    assert out.with_suffix(".trajectory.json").is_file()
    (tmp_path / "s.txt").write_text("an unrelated file that happens to share the name\n")
    assert main(sample_argv(toy_runs / "gaussian", out, "--overwrite", "--seed", "1")) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seed"] for r in records] == [1, 1]
    assert len((tmp_path / "s.txt").read_text().splitlines()) == 2
    # the old trajectory belonged to other samples: it is gone, not left beside these
    assert not out.with_suffix(".trajectory.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl", "s.txt"]  # no temp file left


def test_samples_cut_short_keep_whole_batches_only(toy_runs, tmp_path, monkeypatch, capsys):
    """A disk that fills during the second batch: the files end at the first batch's last whole
    line (never half a JSON line), and an older set is replaced only by samples that exist."""
    from dlm.runs import sample

    out = tmp_path / "s.jsonl"
    out.write_text("earlier samples\n")
    real_fsync, calls = os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) > 2:  # the second batch's first file: its lines written, not yet safe
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(sample.os, "fsync", full_disk)
    assert main(sample_argv(toy_runs / "gaussian", out, "--overwrite")) != 0
    capsys.readouterr()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [0] and len(out.with_suffix(".txt").read_text().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl", "s.txt"]
    calls.clear()
    out.write_text("earlier samples\n")
    out.with_suffix(".txt").unlink()
    monkeypatch.setattr(sample.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert main(sample_argv(toy_runs / "gaussian", out, "--overwrite")) != 0
    assert out.read_text() == "earlier samples\n" and sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


@pytest.mark.parametrize("command", ["infill", "evaluate", "stats", "train-classifier", "control-table"])
@pytest.mark.parametrize("where, message", [
    ("/proc/dlm_nope/FILE", "cannot be written: No such file or directory"),
    (f"HERE/{LONG_NAME}FILE", "cannot be written: File name too long"),
    ("HERE/afile/FILE", "which is a file: choose another path"),
])
def test_every_writer_checks_its_destination_first(toy_runs, tmp_path, capsys, command, where, message):
    (tmp_path / "afile").write_text("keep me")
    diffusion, ar = str(toy_runs / "gaussian"), str(toy_runs / "ar")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"text": "To be"}) + "\n")
    destination = where.replace("HERE", str(tmp_path))
    argv = {
        "infill": ["infill", "--run_dir", diffusion, "--template", "__", "--steps", "2",
                   "--out", destination.replace("FILE", "f.jsonl")],
        "evaluate": ["evaluate", "--samples", str(samples), "--teacher", ar, "--json", destination.replace("FILE", "e.json")],
        "stats": ["stats", "--samples", str(samples), "--run_dir", diffusion, "--json", destination.replace("FILE", "s.json")],
        "train-classifier": ["train-classifier", "--run_dir", diffusion, "--attribute", "question", "--steps", "1",
                             "--out", destination.replace("FILE", "c.pt")],
        "control-table": ["control-table", "--run_dir", diffusion, "--ar_run", ar, "--attribute", "question",
                          "--out_dir", destination.replace("FILE", "table")],
    }[command]
    refused(capsys, command, argv, message, tmp_path, toy_runs)


def test_check_destination_leaves_nothing_behind(tmp_path):
    assert check_destination(tmp_path / "a" / "b" / "x.jsonl", suffix=".jsonl") == tmp_path / "a" / "b" / "x.jsonl"
    assert not (tmp_path / "a").exists()  # the folders it made to try are gone again
    (tmp_path / "x.jsonl").write_text("old")
    check_destination(tmp_path / "x.jsonl")
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"] and (tmp_path / "x.jsonl").read_text() == "old"


# --- long work: written as it goes, interruptible, refused up front when it cannot fit -------------

def test_sample_writes_batch_by_batch_the_draws_of_one_call(toy_runs, tmp_path, capsys):
    from dlm.runs.build import load_run

    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(toy_runs / "gaussian"), "--steps", "2", "--num_samples", "5",
                 "--batch_size", "2", "--seed", "3", "--out", str(out)]) == 0
    from dlm.runs.sample import generate

    run = load_run(toy_runs / "gaussian")
    options = SampleOptions.from_config(run.config, num_samples=5, steps=2, batch_size=2, seed=3)
    ids = generate(run, options).ids  # one call, every batch (one batch of 5 draws otherwise)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["ids"] for r in records] == ids.tolist() and [r["index"] for r in records] == list(range(5))
    assert len(out.with_suffix(".txt").read_text().splitlines()) == 5


def test_ctrl_c_while_sampling_keeps_the_finished_batches(toy_runs, tmp_path, capsys, monkeypatch):
    from dlm.families import gaussian

    calls = []

    def interrupted_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = gaussian.generate
    monkeypatch.setattr(gaussian, "generate", interrupted_on_the_third_batch)
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(toy_runs / "gaussian"), "--steps", "2", "--num_samples", "10",
                 "--batch_size", "2", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted after 4 of 10 samples: 4 samples kept in" in err
    assert err.strip().splitlines()[-1] == "dlm sample: interrupted" and "Traceback" not in err
    assert len(out.read_text().splitlines()) == 4 and len(out.with_suffix(".txt").read_text().splitlines()) == 4


@pytest.mark.parametrize("full_for", ["s.jsonl", "s.txt"])
def test_a_full_disk_while_sampling_keeps_whole_lines_of_both_files(toy_runs, tmp_path, capsys, monkeypatch,
                                                                    small_disk, full_for):
    from dlm.runs.sample import SampleWriter

    real_add = SampleWriter.add

    def disk_fills_after_the_first_batch(writer, batch):
        if writer.count:
            small_disk.full_for = full_for  # half of this batch's lines fit
        real_add(writer, batch)

    monkeypatch.setattr(SampleWriter, "add", disk_fills_after_the_first_batch)
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(toy_runs / "gaussian"), "--steps", "2", "--num_samples", "6",
                 "--batch_size", "2", "--record_every", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = one_error_line_from(err, "sample")
    assert f"The disk holding '{tmp_path}' is full: 's.jsonl' could not be written. 2 samples are kept in it" in line
    assert "Free space on that disk (df -h shows what is left) and sample again." in line
    assert [json.loads(row)["index"] for row in out.read_text().splitlines()] == [0, 1]  # every line whole
    assert out.read_bytes().endswith(b"\n") and len(out.with_suffix(".txt").read_text().splitlines()) == 2
    assert not out.with_suffix(".trajectory.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["sample", "--num_samples", str(10**9), "--record_every", "1", "--steps", "2", "--out", "OUT"],
     "GiB of trajectory; this machine has"),
    (["evaluate", "--nll", "--windows", str(10**10)], "held-out windows need about"),  # not run with the guard off: 80 GB
])
def test_what_cannot_fit_in_memory_is_refused_up_front(toy_runs, tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "s.jsonl")) for a in argv] + ["--run_dir", str(toy_runs / "gaussian")]
    refused(capsys, argv[0], argv, message, tmp_path)


def test_a_bug_inside_dlm_shows_its_traceback_and_asks_to_report_it(toy_runs, tmp_path, capsys, monkeypatch):
    from dlm.runs import sample

    def broken(*args, **kwargs):
        raise ValueError("an internal slip")

    monkeypatch.setattr(sample.SampleWriter, "add", broken)
    assert main(["sample", "--run_dir", str(toy_runs / "gaussian"), "--steps", "2", "--num_samples", "2",
                 "--out", str(tmp_path / "s.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: an internal slip" in err
    assert err.strip().splitlines()[-1].startswith("dlm sample: internal error: this is a bug in dlm")


# --- dlm evaluate: samples files a user may hand it, and evaluations that do not mix --------------

@pytest.mark.parametrize("content, message", [
    (b'{"text": 123}\n', "line 1: each line must be a JSON object whose 'text' is a string (got int)"),
    (b'{"text": "To be"}\n{"text": null}\n', "line 2: each line must be a JSON object whose 'text' is a string (got NoneType)"),
    (b'"To be, or not to be"\n', "line 1: each line must be a JSON object whose 'text' is a string (got str)"),
    (b'{"ids": [1, 2]}\n', "(got no 'text')"),
    (b'{"text": ""}\n{"text": "  "}\n', "holds only empty texts: there is nothing to score"),
    (b'{"text": "caf\xe9"}\n', "is not UTF-8 text (byte 13)"),
    (b'{"text": "To be"\n', "is not JSON lines (line 1:"),
    (b"\n\n", "holds no samples"),
])
def test_bad_samples_files_name_the_file_and_line(toy_runs, tmp_path, capsys, content, message):
    samples = tmp_path / "s.jsonl"
    samples.write_bytes(content)
    line = refused(capsys, "evaluate", ["evaluate", "--samples", str(samples), "--teacher", str(toy_runs / "ar"),
                                        "--json", str(tmp_path / "e.json")], message, tmp_path)
    assert str(samples) in line


def test_a_sample_longer_than_the_heldout_text_is_refused(runs, tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"text": "speak , " * 100_000}) + "\n")
    refused(capsys, "evaluate", ["evaluate", "--samples", str(samples), "--teacher", str(runs / "ar")],
            "A sample of 200000 tokens is longer than the held-out text it is compared with", tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--nll", "--samples", "S"], "--nll and --samples are separate evaluations: --nll scores --run_dir's held-out "
                                  "windows, not a samples file"),
    (["--matched", "--samples", "S", "--teacher", "AR"], "--matched and --samples are separate evaluations"),
    (["--nll", "--matched", "--teacher", "AR"], "--nll and --matched are separate evaluations"),
])
def test_evaluations_that_would_be_ignored_are_refused(toy_runs, tmp_path, capsys, argv, message):
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "To be"}) + "\n")
    argv = [a.replace("S", str(tmp_path / "s.jsonl")).replace("AR", str(toy_runs / "ar")) if len(a) <= 2 else a
            for a in argv]
    refused(capsys, "evaluate", ["evaluate", "--run_dir", str(toy_runs / "gaussian"), *argv], message, tmp_path)


# --- dlm report: its folder and every --param, before the first notebook starts -------------------

@pytest.mark.parametrize("argv, message", [
    (["--reports_dir", "HERE/afile"], "--reports_dir 'HERE/afile' is a file: give a folder"),
    (["--reports_dir", "/proc/dlm_nope/reports"], "--reports_dir '/proc/dlm_nope/reports' cannot be created"),
    (["--reports_dir", "HERE/afile/reports"], "which is a file: choose another folder"),
    (["--param", "train.lr=[1"], "--param 'train.lr=[1': the value '[1' is not YAML"),
    (["--param", "sample.num_sampels=3"], "sample.ipynb has no parameter 'num_sampels'. Did you mean 'num_samples'?"),
    (["--param", "collapse_analysis.stepz=3"], "collapse_analysis.ipynb has no parameter 'stepz'. Did you mean 'steps'?"),
    (["--param", "train.lrr=0.1"], "train.ipynb has no parameter 'lrr'. Did you mean 'lr'?"),
])
def test_report_destination_and_params_are_checked_before_any_notebook(tmp_path, capsys, monkeypatch, argv, message):
    from dlm.workbench import workbook

    def no_notebook_may_run(*args, **kwargs):
        raise AssertionError("a notebook ran before the report's inputs were checked")

    monkeypatch.setattr(workbook, "execute", no_notebook_may_run)
    (tmp_path / "afile").write_text("keep me")
    argv = [a.replace("HERE", str(tmp_path)) for a in argv]
    reports = [] if "--reports_dir" in argv else ["--reports_dir", str(tmp_path / "reports")]
    before = snapshot(tmp_path)
    assert main(["report", SMOKE, "--name", "r", *reports, *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message.replace("HERE", str(tmp_path)) in one_error_line_from(err, "report")
    assert snapshot(tmp_path) == before and not (tmp_path / "reports").exists()


MASKED_SMOKE = str(ROOT / "params" / "masked_smoke.yaml")


@pytest.mark.parametrize("preset, argv, message", [
    (MASKED_SMOKE, ["--param", "train.predict=logits"], "'predict' (logits) is an option of the gaussian family; the "
                                                        "'masked' family does not read it"),
    (SMOKE, ["--param", "train.block_size=4", "--param", "train.block_training=all", "--param",
             "train.self_condition=0.5"], "'block_training: all' feeds the window twice"),
    (SMOKE, ["--from_run", "MASKED"], "--from_run 'MASKED' holds a run of model 'masked', but the preset (with its "
                                      "--param train.* keys) trains model 'gaussian'"),
    (MASKED_SMOKE, ["--from_run", "DIFF"], "holds a run of model 'gaussian', but the preset"),
    (SMOKE, ["--param", "sample.teacher_dir=HERE/nowhere"], "--param sample.teacher_dir: 'HERE/nowhere' was not found"),
    (SMOKE, ["--param", "sample.teacher_dir=DIFF"], "--param sample.teacher_dir 'DIFF' is a 'gaussian' run, not an "
                                                    "autoregressive one"),
    (SMOKE, ["--param", "control.ar_run=MASKED"], "--param control.ar_run 'MASKED' is a 'masked' run"),
    (SMOKE, ["--param", "sample.steps=0"], "--param sample.steps: steps must be between 1 and the run's "
                                           "diffusion_steps (100), got 0."),
    (SMOKE, ["--param", "sample.steps=101"], "diffusion_steps (100), got 101."),
    (SMOKE, ["--param", "train.preview_steps=0"], "--param train.preview_steps: steps must be between 1"),
    (SMOKE, ["--param", "collapse_analysis.steps=500"], "--param collapse_analysis.steps: steps must be between 1"),
    (SMOKE, ["--param", "sample.steps=ten"], "--param sample.steps takes a number of steps (-1: the run's "
                                             "sample_steps), got 'ten'."),
    (MASKED_SMOKE, ["--param", "sample.steps=100000"], "--param sample.steps: steps must be at most 12,800"),
    (MASKED_SMOKE, ["--param", "sample.curve_steps=10,100000"], "--param sample.curve_steps: steps must be at most"),
])
def test_report_values_are_checked_before_the_first_notebook(toy_runs, tmp_path, capsys, monkeypatch, preset, argv,
                                                             message):
    from dlm.workbench import workbook

    monkeypatch.setattr(workbook, "execute", lambda *args, **kwargs: pytest.fail("a notebook ran"))
    names = {"MASKED": toy_runs / "masked", "DIFF": toy_runs / "gaussian", "HERE": tmp_path}
    for name, path in names.items():
        argv = [a.replace(name, str(path)) for a in argv]
        message = message.replace(name, str(path))
    before = snapshot(tmp_path, toy_runs)
    assert main(["report", preset, "--name", "r", "--reports_dir", str(tmp_path / "reports"), *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in one_error_line_from(err, "report")
    assert snapshot(tmp_path, toy_runs) == before and not (tmp_path / "reports").exists()


def test_ctrl_c_during_a_report_says_interrupted_and_stops_its_kernel(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys
    import types

    from dlm.workbench import workbook

    kernel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a kernel, busy training
    cleaned = []

    class Manager:  # what stop_kernels reads of a jupyter_client kernel manager
        provisioner = types.SimpleNamespace(process=kernel)

        def cleanup_connection_file(self):
            cleaned.append("connection file")

        def cleanup_ipc_files(self):
            cleaned.append("ipc sockets")

    manager = Manager()

    def training(notebook, output, parameters, **kwargs):  # Ctrl-C while the train notebook runs
        workbook.STARTED_KERNELS.add(manager)
        raise KeyboardInterrupt

    monkeypatch.setattr(workbook, "execute", training)
    try:
        assert main(["report", SMOKE, "--name", "r", "--reports_dir", str(tmp_path / "reports")]) == 130
    finally:
        kernel.kill()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ZMQError" not in err
    assert err.strip().splitlines() == [f"dlm report: interrupted in train.ipynb: what the report wrote is kept in "
                                        f"{tmp_path / 'reports' / 'r'} (report.json says 'interrupted'); --overwrite "
                                        f"starts it again."]
    report = json.loads((tmp_path / "reports" / "r" / "report.json").read_text())
    assert report["status"] == "interrupted" and report["interrupted"] == "train"
    assert "interrupted" in (tmp_path / "reports" / "index.html").read_text()
    assert kernel.poll() is not None and kernel.returncode != 0  # stopped, not left to train on
    assert cleaned == ["connection file", "ipc sockets"] and manager not in workbook.STARTED_KERNELS


def test_known_params_of_every_notebook_pass_the_check():
    from dlm.workbench.workbook import check_notebook_parameters, notebooks_dir

    check_notebook_parameters({"train": {"lr": 0.1, "nll_windows": 2}, "sample": {"num_samples": 2},
                               "collapse_analysis": {"steps": 5}, "control": {"task": "infill"}}, notebooks_dir())


# --- the benchmark scripts users run: the CLI's checks and its one line, before any work ------------

def benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv, message", [
    ("scaling", ["x=HERE/nowhere", "--teacher", "AR"], "Run folder 'HERE/nowhere' does not exist"),
    ("scaling", ["x=DIFF", "--teacher", "DIFF"], "The teacher must be an autoregressive run"),
    ("scaling", ["x=AR", "--teacher", "AR"], "row 'x': an autoregressive run is the --teacher's row"),
    ("scaling", ["x=DIFF", "--teacher", "AR", "--seeds", "0"], "--seeds must be at least 1, got 0."),
    ("scaling", ["x=DIFF", "--teacher", "AR", "--samples", "0"], "--samples must be at least 1, got 0."),
    ("scaling", ["x=DIFF", "--teacher", "AR", "--windows", "1"], "--windows must be at least 2"),
    ("scaling", ["x=DIFF", "--teacher", "AR", "--draws", "0"], "--draws must be a positive number of timesteps"),
    ("scaling", ["x=DIFF", "--teacher", "AR", "--steps", "0"], "row 'x': steps must be between 1 and the run's "
                                                              "diffusion_steps (50), got 0."),
    ("scaling", ["x=DIFF", "--teacher", "AR", "--steps", "5000"], "diffusion_steps (50), got 5000."),
    ("scaling", ["x=DIFF", "--teacher", "AR", "--speed_steps", "500"], "--speed_steps: steps must be between 1"),
    ("scaling", ["x=MASKED", "--teacher", "AR", "--steps", "100000"], "steps must be at most 12,800 for this run"),
    ("scaling", ["x=DIFF", "--teacher", "AR", "--out", "HERE/afile"], "--out 'HERE/afile/scaling.csv' lies under"),
    ("scaling", ["x=DIFF", "--teacher", "AR", "--entropy", "-1"], "--entropy is a unigram entropy in bits, a "
                                                                  "positive number, got -1.0."),
    ("scaling", ["x=DIFF", "--teacher", "OTHER_VOCAB"], "--teacher was trained with another vocabulary than"),
    ("spacing", ["HERE/nowhere", "AR"], "Run folder 'HERE/nowhere' does not exist"),
    ("spacing", ["DIFF", "MASKED"], "The teacher must be an autoregressive run"),
    ("spacing", ["MASKED", "AR"], "is of model 'masked': spacing.py compares the timestep spacings of the Gaussian"),
    ("spacing", ["AR", "AR"], "is of model 'ar': spacing.py compares"),
    ("spacing", ["DIFF", "AR", "--samples", "0"], "--samples must be at least 1, got 0."),
    ("spacing", ["DIFF", "AR", "--windows", "1"], "--windows must be at least 2"),
    ("spacing", ["DIFF", "AR", "--steps", "0"], "steps must be between 1 and the run's diffusion_steps (50), got 0."),
    ("spacing", ["DIFF", "AR", "--steps", "5", "5000"], "diffusion_steps (50), got 5000."),
    ("spacing", ["DIFF", "AR", "--out", "HERE/afile"], "--out 'HERE/afile/spacing.csv' lies under"),
    ("spacing", ["DIFF", "AR", "--entropy", "-1"], "--entropy is a unigram entropy in bits, a positive number"),
])
def test_benchmark_scripts_refuse_bad_input_in_one_line_before_any_work(toy_runs, tmp_path, capsys, monkeypatch,
                                                                         script, argv, message):
    from dlm.evaluation import likelihood, matched

    def no_work(*args, **kwargs):
        raise AssertionError("a bound or a sample was computed before the inputs were checked")

    for module, name in ((matched, "temperature_sampler"), (likelihood, "nll_bound"), (likelihood, "compare_with_ar")):
        monkeypatch.setattr(module, name, no_work)
    (tmp_path / "afile").write_text("keep me")
    toy_run_dir(tmp_path / "one_line_ar", model="ar", text="To be, or not to be: that is the question.")
    names = {"OTHER_VOCAB": tmp_path / "one_line_ar", "DIFF": toy_runs / "gaussian", "AR": toy_runs / "ar",
             "MASKED": toy_runs / "masked", "HERE": tmp_path}
    for name, path in names.items():
        argv = [a.replace(name, str(path)) for a in argv]
        message = message.replace(name, str(path))
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = snapshot(tmp_path, toy_runs)
    assert benchmark(script).main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: ") and message in lines[0], lines
    assert snapshot(tmp_path, toy_runs) == before and not (tmp_path / "out").exists()


# --- presets, corpora, resuming, pretrained vectors ------------------------------------------------

def test_a_key_given_twice_in_a_preset_is_refused(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 0.001\ncorpus: nowhere.txt\nlr: 0.1\n")  # no corpus: a missed duplicate fails fast
    refused(capsys, "train", ["train", str(preset), "--run_dir", str(tmp_path / "run")],
            f"In {preset}, 'lr' is set twice (lines 1 and 3): keep the one you mean and delete the other", tmp_path)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--rounding_weight", "1e30"], "'rounding_weight' must be in [0, 1000]"),
    (["--corpus", "/dev/zero"], "Corpus '/dev/zero' is a device or other special file: give a UTF-8 text file"),
])
def test_smaller_settings_seen(tmp_path, capsys, argv, message):
    refused(capsys, "train", ["train", SMOKE, "--run_dir", str(tmp_path / "run"), *argv], message, tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_failed_init_from_pretrained_leaves_no_run_folder(tmp_path, capsys):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("speak 0.5 oops\n")
    corpus = make_corpus(tmp_path / "corpus.txt")
    refused(capsys, "train", ["train", SMOKE, "--run_dir", str(tmp_path / "run"), "--corpus", str(corpus), *QUICK,
                              "--init_from_pretrained", str(vectors)], "is not 'word v1 v2 ...' text", tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_min_count_above_every_word_is_refused_before_training(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus.txt")
    refused(capsys, "train", ["train", SMOKE, "--run_dir", str(tmp_path / "run"), "--corpus", str(corpus), *QUICK,
                              "--min_count", "1000000"], "min_count 1000000 keeps 0 words of the", tmp_path)
    assert not (tmp_path / "run").exists()
    assert "100.0% of its tokens <unk>" in refused(capsys, "train-ar", [
        "train-ar", SMOKE, "--run_dir", str(tmp_path / "ar"), "--corpus", str(corpus), *QUICK, "--min_count", "1000000"],
        "or lower, or tokenizer bpe or char (no <unk>)", tmp_path)


CORPUS_CHANGED = "is not the corpus"


def test_a_run_refuses_a_corpus_that_is_not_the_one_it_was_trained_on(tmp_path, capsys):
    """Every command that reads a run's corpus again checks its SHA-256 against the one the run
    recorded: an edited file is one line naming --accept_corpus_change, and nothing is written."""
    corpus = make_corpus(tmp_path / "corpus.txt")
    for name, command in (("run", "train"), ("ar", "train-ar")):
        assert main([command, SMOKE, "--run_dir", str(tmp_path / name), "--corpus", str(corpus), *QUICK]) == 0
    samples = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(tmp_path / "run"), "--num_samples", "2", "--out", str(samples)]) == 0
    capsys.readouterr()
    original = corpus.read_bytes()
    corpus.write_bytes(original.replace(b"Romeo", b"Tybalt"))  # the same length of text, other words
    run, ar, out = str(tmp_path / "run"), str(tmp_path / "ar"), str(tmp_path / "out.json")
    readers = {
        "train": ["train", SMOKE, "--run_dir", run, "--resume", "--corpus", str(corpus), "--max_steps", "4", *QUICK[2:]],
        "stats": ["stats", "--samples", str(samples), "--run_dir", run, "--json", out],
        "evaluate": ["evaluate", "--samples", str(samples), "--teacher", ar, "--json", out],
        "--nll": ["evaluate", "--nll", "--run_dir", run, "--windows", "2", "--draws", "1", "--json", out],
        "--matched": ["evaluate", "--matched", "--run_dir", run, "--teacher", ar, "--num_samples", "2", "--json", out],
        "train-classifier": ["train-classifier", "--run_dir", run, "--attribute", "question", "--kind", "judge",
                             "--steps", "1", "--out", str(tmp_path / "c.pt")],
    }
    for argv in readers.values():
        line = refused(capsys, argv[0], argv, CORPUS_CHANGED, tmp_path)
        assert "--accept_corpus_change to use this text knowingly" in line and str(corpus) in line
    # knowingly: read as it is now (and a resume then records the text it trained on)
    for argv in (readers["stats"], readers["train"]):
        assert main([*argv, "--accept_corpus_change"]) == 0
    assert main(readers["stats"]) == 0
    corpus.write_bytes(original)
    assert refused(capsys, "stats", readers["stats"], CORPUS_CHANGED, tmp_path)


def test_a_relative_corpus_path_read_from_another_folder_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_corpus(tmp_path / "a" / "corpus.txt", seed=0)
    make_corpus(tmp_path / "b" / "corpus.txt", seed=1)  # another text under the same relative name
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", SMOKE, "--run_dir", str(tmp_path / "run"), "--corpus", "corpus.txt", *QUICK]) == 0
    monkeypatch.chdir(tmp_path / "b")
    line = refused(capsys, "evaluate", ["evaluate", "--nll", "--run_dir", str(tmp_path / "run"), "--windows", "2",
                                        "--draws", "1"], CORPUS_CHANGED, tmp_path)
    assert "a relative path is read from the folder dlm runs in" in line


def test_a_run_that_recorded_no_corpus_hash_still_works_and_says_so_once(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="dlm")
    corpus = make_corpus(tmp_path / "corpus.txt")
    assert main(["train", SMOKE, "--run_dir", str(tmp_path / "run"), "--corpus", str(corpus), *QUICK]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    assert len(payload.pop("corpus_sha256")) == 64  # as a run trained before dlm recorded it
    save_checkpoint(last, payload)
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"text": "speak , speak"}) + "\n")
    caplog.clear()
    for _ in range(2):
        assert main(["stats", "--samples", str(samples), "--run_dir", str(tmp_path / "run")]) == 0
    assert caplog.text.count("records no corpus SHA-256") == 1, caplog.text


@pytest.mark.parametrize("command, folder, message", [
    ("train-ar", "gaussian", "holds a run of model 'gaussian', not 'ar': resume it with dlm train and its own preset"),
    ("train", "ar", "holds a run of model 'ar', not 'gaussian': resume it with dlm train-ar and its own preset"),
])
def test_resuming_with_another_family_is_refused(runs, tmp_path, capsys, command, folder, message):
    run = tmp_path / folder
    shutil.copytree(runs / folder, run)
    preset = str(ROOT / "params" / ("ar.yaml" if command == "train-ar" else "smoke.yaml"))
    refused(capsys, command, [command, preset, "--run_dir", str(run), "--resume", *QUICK[:2]], message, tmp_path)


# --- train-classifier: its options checked first, a better classifier never replaced ---------------

@pytest.mark.parametrize("extra, message", [
    (["--batch_size", "1"], "batch_size must be at least 2 (each batch holds windows with and without the attribute)"),
    (["--batch_size", "0"], "batch_size must be at least 2"),
    (["--batch_size", "-1"], "batch_size must be at least 2"),
    (["--width", "0"], "width must be a positive multiple of 4 (the classifier's attention heads), got 0"),
    (["--width", "6"], "width must be a positive multiple of 4"),
    (["--depth", "-1"], "depth must be at least 1 (transformer blocks), got -1"),
    (["--depth", "0"], "depth must be at least 1"),
])
def test_bad_classifier_options(toy_runs, tmp_path, capsys, extra, message):
    refused(capsys, "train-classifier", ["train-classifier", "--run_dir", str(toy_runs / "gaussian"), "--attribute",
                                         "question", "--out", str(tmp_path / "c.pt"), *extra], message, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_classifier_is_replaced_only_by_a_better_one(runs, tmp_path, capsys):
    out = tmp_path / "c.pt"
    argv = ["train-classifier", "--run_dir", str(runs / "gaussian"), "--attribute", "question", "--kind", "judge",
            "--steps", "2", "--batch_size", "4", "--width", "8", "--depth", "1", "--out", str(out)]
    assert main(argv) == 0
    payload = load_checkpoint(out)
    payload["metrics"]["heldout_balanced_accuracy"] = 1.0  # a previous classifier nothing can beat
    save_checkpoint(out, payload)
    kept = out.read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    assert "not better on held-out windows than the one kept at" in capsys.readouterr().out
    assert out.read_bytes() == kept and (tmp_path / "c.new.pt").is_file()
    payload["metrics"]["heldout_balanced_accuracy"] = -1.0  # a worse one is replaced
    save_checkpoint(out, payload)
    assert main(argv) == 0
    assert load_checkpoint(out)["metrics"]["heldout_balanced_accuracy"] >= 0


def test_memory_guards_directly():
    from dlm.core.errors import UserError
    from dlm.evaluation.likelihood import check_windows_fit
    from dlm.families.contract import Chain
    from dlm.runs.sample import check_memory

    check_windows_fit(256, 64)
    check_memory(SampleOptions(num_samples=64, record_every=10), 64, Chain(blocks=1, timesteps=2000))
    with pytest.raises(UserError, match="held-out windows need about"):
        check_windows_fit(10**10, 64)
    with pytest.raises(UserError, match="GiB of trajectory"):
        check_memory(SampleOptions(num_samples=10**9, record_every=1), 64, Chain(blocks=1, timesteps=2000))
