import dataclasses

import pytest

from dlm import families
from dlm.core.config import SECTIONS, Config, ConfigError, coerce, keys, load_config, notebook_parameter, section_keys, section_of
from tests.conftest import ROOT

PRESETS = sorted((ROOT / "params").glob("*.yaml"))


def test_every_preset_loads():
    names = {p.stem for p in PRESETS}
    assert {"smoke", "default", "seed", "seed_naive"} <= names
    for path in PRESETS:
        assert isinstance(load_config(path), Config)


def test_presets_hold_the_recipes_they_promise():
    seed = load_config(ROOT / "params" / "seed.yaml")
    assert (seed.embed_dim, seed.batch_size, seed.seq_len, seed.epochs) == (256, 8, 64, 100)
    naive = load_config(ROOT / "params" / "seed_naive.yaml")
    assert naive.predict == "epsilon" and naive.schedule == "linear" and naive.diffusion_steps == 1000
    assert naive.rounding_target == "clean" and naive.rounding == "untied" and naive.weight_decay_scope == "all"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="Unknown config key 'epoch'.*Did you mean 'epochs'"):
        load_config(path)


@pytest.mark.parametrize("text, key, expected", [
    ("epochs: ten\n", "epochs", "an integer"),
    ("schedule: quadratic\n", "schedule", "one of: sqrt, linear, cosine"),
    ("use_learned_embeddings: 3\n", "use_learned_embeddings", "true or false"),
    ("max_train_tokens: 1.5\n", "max_train_tokens", "an integer or null"),
])
def test_ill_typed_values_name_the_key_and_the_allowed_values(tmp_path, text, key, expected):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"'{key}'" in str(error.value) and expected in str(error.value)


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("epochs: 5\nlr: 1\n")
    config = load_config(path, epochs=7)
    assert config.epochs == 7 and config.lr == 1.0 and isinstance(config.lr, float)


def test_command_line_text_is_parsed_by_field_type():
    assert coerce("epochs", "12", from_text=True) == 12
    assert coerce("rounding_weight", "0.5", from_text=True) == 0.5
    assert coerce("use_learned_embeddings", "false", from_text=True) is False
    assert coerce("init_from_pretrained", "none", from_text=True) is None
    with pytest.raises(ConfigError, match="'embed_dim'"):
        coerce("embed_dim", "wide", from_text=True)


def test_missing_preset_and_inconsistent_values(tmp_path):
    with pytest.raises(ConfigError, match="No preset file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, width=30, heads=4)
    # the Gaussian chain has diffusion_steps timesteps; the masked chain's steps are not capped by them
    with pytest.raises(ConfigError, match="'sample_steps' \\(200\\) must be at most diffusion_steps \\(100\\)"):
        families.check_config(load_config(None, diffusion_steps=100, sample_steps=200))
    families.check_config(load_config(None, model="masked", sample_steps=5000))
    with pytest.raises(ConfigError, match="'sample_steps' must be at least 1"):
        load_config(None, sample_steps=0)


def test_speed_options_are_typed():
    config = load_config(None, precision="bf16", compile=True)
    assert config.precision == "bf16" and config.compile is True
    assert load_config(None).precision == "auto" and load_config(None).compile is False
    with pytest.raises(ConfigError, match="one of: auto, fp32, bf16"):
        load_config(None, precision="fp16")
    assert coerce("compile", "false", from_text=True) is False


def test_every_key_has_one_section_and_sections_read_the_values():
    config = load_config(None, sample_steps=50, lr=1e-3)
    assert sorted(k for s in SECTIONS for k in section_keys(s)) == sorted(f.name for f in dataclasses.fields(Config))
    assert config.section("sampling")["sample_steps"] == 50 and config.section("training")["lr"] == 1e-3
    assert set(config.section("runtime")) == {"device", "threads", "precision", "compile", "progress"}
    assert section_of("model") == "model" and section_of("seq_len") == "data"
    with pytest.raises(ConfigError, match="No config section 'optim'"):
        config.section("optim")


def test_keys_list_every_key_with_its_type_and_comment():
    listed = {key.name: key for key in keys()}
    assert list(listed) == [f.name for f in dataclasses.fields(Config)]
    assert listed["seq_len"].comment == "tokens per training window" and listed["seq_len"].type == "an integer"
    assert listed["max_train_seconds"].comment.startswith("stop once the training loop")  # the lines above it
    assert listed["max_train_seconds"].type == "a number or null" and listed["max_train_seconds"].section == "training"
    assert "---" not in " ".join(key.comment for key in keys())  # section rulers are not comments of a key
    assert notebook_parameter(listed["tokenizer"]) == (
        "tokenizer: Optional[str] = None  # word (rare words <unk>), bpe or char (no <unk>) (one of: word, bpe, char)")
    assert notebook_parameter(listed["epochs"]).startswith("epochs: Optional[int] = None  # ")


def test_loss_settings_and_sample_options_are_read_from_the_config_by_name():
    from dlm.families.gaussian import objective
    from dlm.families.gaussian_objective import LossSettings
    from dlm.runs.sample import SampleOptions

    config = load_config(None, predict="epsilon", rounding_weight=0.5, prior_loss=False, time_warp=True)
    settings = objective(config).settings
    for f in dataclasses.fields(LossSettings):
        assert section_of(f.name) in ("gaussian", "blocks") and getattr(settings, f.name) == getattr(config, f.name)
    # every sampling key is a sampling option, with the Config's default and the run's value
    recipe = {f.metadata["config"]: f for f in dataclasses.fields(SampleOptions) if "config" in f.metadata}
    assert set(recipe) == set(section_keys("sampling"))
    assert all(recipe[key].default == Config.__dataclass_fields__[key].default for key in recipe)
    tuned = config.replace(sample_steps=30, sample_eta=0.0, decode_temperature=0.7, clamp=False)
    options = SampleOptions.from_config(tuned, num_samples=3, steps=None, eta=0.5)
    assert (options.steps, options.eta, options.temperature, options.clamp) == (30, 0.5, 0.7, False)
    assert options.num_samples == 3 and options.decoder == "learned"
    with pytest.raises(TypeError):
        SampleOptions.from_config(config, stpes=3)
