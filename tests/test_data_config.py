"""DataConfig / SyntheticConfig: defaults, parsing from dicts, one-line ConfigErrors."""

import pytest

from moelab.data.config import DataConfig, ShardSource, SyntheticConfig
from moelab.errors import ConfigError


def test_defaults_are_valid_and_round_trip():
    cfg = DataConfig()
    assert cfg.source == "synthetic" and cfg.tokenizer == "byte" and cfg.synthetic.n_entities == 200
    again = DataConfig.model_validate(cfg.model_dump())
    assert again == cfg


def test_shards_source_from_dict():
    cfg = DataConfig.model_validate({"source": "shards", "shards": [{"path": "a", "weight": 3}, {"path": "b"}], "seq_len": 128})
    assert cfg.shards == [ShardSource(path="a", weight=3.0), ShardSource(path="b", weight=1.0)]


@pytest.mark.parametrize("bad, where", [
    ({"source": "shards"}, "needs at least one entry"),
    ({"source": "web"}, "source"),
    ({"seq_len": 1}, "seq_len"),
    ({"shards": [{"path": "a", "weight": 0}]}, "shards.0.weight"),
    ({"shards": [{"path": "a", "wieght": 1}]}, "shards.0.wieght"),
    ({"synthetic": {"max_ops": 99}}, "synthetic.max_ops"),
    ({"tokenizer": ""}, "tokenizer"),
])
def test_invalid_data_config_is_one_line_config_error(bad, where):
    with pytest.raises(ConfigError) as e:
        DataConfig.model_validate(bad)
    msg = str(e.value)
    assert where in msg and "\n" not in msg and msg.startswith("DataConfig: ")
    with pytest.raises(ConfigError):
        DataConfig(**bad)


def test_synthetic_config_nested_error_names_path():
    with pytest.raises(ConfigError, match=r"^DataConfig: synthetic\.modulus: .*\(got 1\); fix the config$"):
        DataConfig(synthetic={"modulus": 1})
    assert SyntheticConfig(seed=5).seed == 5
