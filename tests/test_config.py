"""CDVFTConfig: JSON round trip, pattern semantics, overrides and validation."""

import json

import pytest

from cdvft_jax import CDVFTConfig, config_from_dict, config_from_json
from cdvft_jax.config import matches, matches_within

QUERY = "roberta/encoder/layer/0/attention/self/query"


def test_json_round_trip_keeps_every_field():
    config = CDVFTConfig(
        target_modules=["query", "attention/self/value"],
        exclude_modules=r".*layer/11/.*",
        modules_to_save=["classifier"],
        block_size=64,
        num_factors=5,
        alpha=2.5,
        init="identity",
        overrides={r".*layer/0/.*": {"block_size": 32, "alpha": 1.0}},
    )
    text = config.to_json()
    data = json.loads(text)
    assert data["method"] == "cdvft"
    assert data["target_modules"] == ["query", "attention/self/value"]
    assert data["overrides"] == {r".*layer/0/.*": {"alpha": 1.0, "block_size": 32}}
    restored = CDVFTConfig.from_json(text)
    assert restored == config
    assert config_from_json(text) == config
    assert hash(restored) == hash(config)


def test_regex_target_survives_round_trip_as_a_string():
    config = CDVFTConfig(target_modules=r".*/(query|value)")
    assert config_from_dict(config.to_dict()).target_modules == r".*/(query|value)"


def test_suffix_list_matches_whole_segments_and_regex_matches_full_path():
    assert matches(QUERY, ("query",))
    assert matches(QUERY, ("self/query",))
    assert matches(QUERY, ("attention.self.query",)) is False  # dots are normalised by the config only
    assert matches(QUERY, CDVFTConfig(target_modules=["attention.self.query"]).target_modules)
    assert not matches(QUERY, ("uery",))
    assert matches(QUERY, r".*/query")
    assert not matches(QUERY, r"query")  # a regex must match the full path
    assert matches_within("classifier/out_proj/kernel", ("classifier",))
    assert not matches_within("roberta/classifier_like/kernel", ("classifier",))


def test_overrides_apply_per_layer_and_later_entries_win():
    config = CDVFTConfig(
        overrides={r".*layer/0/.*": {"block_size": 8, "alpha": 3.0}, r".*layer/0/.*value": {"alpha": 4.0}}
    )
    query = config.layer_config(QUERY)
    value = config.layer_config(QUERY.replace("query", "value"))
    other = config.layer_config(QUERY.replace("layer/0", "layer/1"))
    assert (query.block_size, query.alpha) == (8, 3.0)
    assert (value.block_size, value.alpha) == (8, 4.0)
    assert other is config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(target_modules="("), "not a valid regular expression"),
        (dict(target_modules=["query", ""]), "non-empty strings"),
        (dict(init="gaussian"), "init must be one of"),
        (dict(block_size=0), "block_size must be a positive int or None"),
        (dict(block_size=2.5), "block_size must be a positive int or None"),
        (dict(num_factors=2), "num_factors must be an odd int"),
        (dict(alpha="big"), "alpha must be a finite number"),
        (dict(alpha=float("nan")), "alpha must be a finite number, got nan"),
        (dict(alpha=float("inf")), "alpha must be a finite number, got inf"),
        (dict(overrides={".*": {"alpha": float("nan")}}), "alpha must be a finite number"),
        (dict(overrides={"(": {"alpha": 1.0}}), "not a valid regular expression"),
        (dict(overrides={".*": {"target_modules": ["key"]}}), r"cannot override \['target_modules'\]"),
        (dict(overrides={".*": {"num_factors": 4}}), "num_factors must be an odd int"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CDVFTConfig(**kwargs)


def test_bad_json_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown adapter method 'loraxx'"):
        config_from_dict({"method": "loraxx", "target_modules": ["q"]})
    with pytest.raises(ValueError, match=r"no fields \['rank'\]"):
        config_from_dict({"method": "cdvft", "rank": 8})
    with pytest.raises(ValueError, match="unknown adapter method None"):
        config_from_dict({"target_modules": ["q"]})


def test_config_is_frozen():
    config = CDVFTConfig()
    with pytest.raises(AttributeError):
        config.alpha = 2.0  # type: ignore[misc]
