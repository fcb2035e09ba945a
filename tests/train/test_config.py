from pathlib import Path

import pytest
import yaml
from fmboost.models import SamplerConfig
from fmboost.train.config import TrainConfig, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "faceshq_sd15_32to128.yaml", "lhq_sd15_32to128.yaml",
                                         "faces_taef2_32to128.yaml", "landscapes_taef2_32to128.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert set(yaml.safe_load(path.read_text())) <= set(config.to_dict())


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset_name: sample_photos\nlearning_rte: 0.1\n")
    with pytest.raises(ValueError, match="learning_rte"):
        load_config(path)


@pytest.mark.parametrize("key, value", [("learning_rate", "fast"), ("max_train_steps", 1.5), ("random_flip", 1),
                                        ("use_ema", "yes"), ("scale", True)])
def test_wrong_type_is_named(key, value):
    with pytest.raises(ValueError, match=key):
        load_config(None, {"dataset_name": "sample_photos", key: value})


def test_bad_choice_is_named():
    with pytest.raises(ValueError, match="mixed_precision"):
        load_config(None, {"dataset_name": "sample_photos", "mixed_precision": "fp8"})
    with pytest.raises(ValueError, match="objective"):
        load_config(None, {"dataset_name": "sample_photos", "objective": "gan"})


def test_cli_overrides_win_and_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset_name: sample_photos\nlearning_rate: 1.0e-4\n")
    config = load_config(path, ["--learning_rate", "3e-4", "--max_train_steps=7", "--random_flip", "false",
                                "--use_latent_cache", "--block_out_channels", "[8, 16]"])
    assert (config.learning_rate, config.max_train_steps, config.random_flip, config.use_latent_cache) == \
        (3e-4, 7, False, True)
    assert config.block_out_channels == [8, 16]
    assert parse_overrides(["--noise_sigma", "null"]) == {"noise_sigma": None}
    with pytest.raises(ValueError, match="lerning_rate"):
        load_config(path, ["--lerning_rate", "1"])


def test_exactly_one_data_source():
    with pytest.raises(ValueError, match="train_data_dir"):
        load_config(None, {})


def test_upsample_steps_are_the_cfm_sampler_steps():
    config = load_config(None, {"dataset_name": "sample_photos", "solver": "midpoint", "upsample_steps": 6,
                                "schedule": "cosine"})
    assert config.sampler_config() == SamplerConfig("midpoint", 6, "cosine")
    with pytest.raises(ValueError, match="upsample_steps must be >= 1"):
        load_config(None, {"dataset_name": "sample_photos", "upsample_steps": 0})
    with pytest.raises(ValueError, match="SamplerConfig.schedule"):
        load_config(None, {"dataset_name": "sample_photos", "schedule": "wiggly"})


def test_renamed_key_names_its_new_name(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("dataset_name: sample_photos\nnum_inference_steps: 4\n")
    for source in ((path, None), (None, {"dataset_name": "sample_photos", "num_inference_steps": 4}),
                   (None, ["--dataset_name", "sample_photos", "--num_inference_steps", "4"])):
        with pytest.raises(ValueError, match="'num_inference_steps' is now 'upsample_steps'"):
            load_config(*source)


def test_the_sampler_is_one_key_and_the_older_keys_still_load(tmp_path):
    config = load_config(None, {"dataset_name": "sample_photos", "sampler": "heun:cosine:3"})
    assert config.sampler_config() == SamplerConfig("heun", 3, "cosine")
    path = tmp_path / "old.yaml"
    path.write_text("dataset_name: sample_photos\nsolver: midpoint\nschedule: linear\nupsample_steps: 2\n")
    with pytest.warns(FutureWarning, match="'sampler: midpoint:linear:2'"):
        old = load_config(path)
    assert old.sampler == "midpoint:linear:2"
    with pytest.warns(FutureWarning, match="sampler: midpoint:linear:5"):  # an old override changes the new key
        assert load_config(path, ["--upsample_steps", "5"]).sampler == "midpoint:linear:5"
    with pytest.warns(FutureWarning):
        assert load_config(path, ["--sampler", "euler:linear:4"]).sampler == "euler:linear:4"  # a later new key wins
    with pytest.raises(ValueError, match="sampler"):
        load_config(None, {"dataset_name": "sample_photos", "sampler": "euler:wiggly:2"})
