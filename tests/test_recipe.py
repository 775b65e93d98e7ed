"""The shipped configs pass the recipe's own checks; a misspelled key is an error with the closest name."""

import pytest
from omegaconf import OmegaConf

from conftest import PROJECT_ROOT, TINY_CONFIG
from recipes.ref_finetune import CONFIG_SCHEMA
from ref_tuning.config import ConfigError, validate_config


@pytest.mark.parametrize("config_file", ["configs/ref_tuning.yaml", "configs/ref_tuning_lora.yaml", TINY_CONFIG])
def test_shipped_configs_are_valid(config_file):
    validate_config(OmegaConf.load(PROJECT_ROOT / config_file), CONFIG_SCHEMA)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.n_sample=16", "unknown config key 'dataset.n_sample': did you mean 'n_samples'?"),
        ("batchsize=2", "unknown config key 'batchsize': did you mean 'batch_size'?"),
        ("optimizer.learning_rate=1e-5", "unknown config key 'optimizer.learning_rate'"),
    ],
)
def test_misspelled_keys_are_errors(override, message):
    cfg = OmegaConf.merge(OmegaConf.load(PROJECT_ROOT / TINY_CONFIG), OmegaConf.from_dotlist([override]))
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        validate_config(cfg, CONFIG_SCHEMA)
