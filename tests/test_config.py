import pytest

from dlm.core.config import Config, ConfigError, coerce, load_config
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
    with pytest.raises(ConfigError, match="sample_steps"):
        load_config(None, diffusion_steps=100, sample_steps=200)


def test_speed_options_are_typed():
    config = load_config(None, precision="bf16", compile=True)
    assert config.precision == "bf16" and config.compile is True
    assert load_config(None).precision == "auto" and load_config(None).compile is False
    with pytest.raises(ConfigError, match="one of: auto, fp32, bf16"):
        load_config(None, precision="fp16")
    assert coerce("compile", "false", from_text=True) is False
