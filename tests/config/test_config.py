"""Config as data: validation messages, YAML/dict round-trip, safe loading, shipped examples."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvpolicy import ConfigError, Policy, PolicyConfig, get_registry

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "policies").glob("*.yaml"))


def base() -> dict:
    return {
        "name": "p",
        "keys": {"retain": [{"type": "log", "window": 8}], "quant": {"bits": 2, "group_size": 32, "axis": "channel"}},
        "values": {"retain": [{"type": "window", "size": 8}], "quant": {"bits": 4, "group_size": 32}},
    }


@pytest.mark.parametrize("name", ["full", "kivi", "logquant", "partial_logquant", "streaming", "sink_kivi"])
def test_registered_policies_round_trip_through_yaml(name, tmp_path):
    policy = Policy.load(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(policy.to_yaml())
    again = Policy.from_yaml(path)
    assert again.config == policy.config
    assert PolicyConfig.from_dict(policy.to_dict()) == policy.config


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policies_load(path):
    policy = Policy.load(str(path))
    assert policy.name == path.stem
    assert policy.budget()["keys"] is None or policy.budget()["keys"] <= 192


def test_each_shipped_policy_is_one_yaml_file_of_its_plugin_package():
    """One source per policy: the registry's configs are the plugin packages' own files."""
    registry = get_registry()
    root = Path(__file__).parents[2]
    files = {p.stem: p for p in root.glob("kvpolicy*/**/policies/*.yaml")}
    shipped = {
        "full",
        "kivi",
        "sink_kivi",
        "logquant",
        "logquant_rot",
        "logquant_mixed",
        "partial_logquant",
        "streaming",
    }
    assert set(files) == shipped
    for name, path in files.items():
        assert registry.policy_config(name) == PolicyConfig.from_yaml(path)
        assert registry.provider("policy", name) == ("kvpolicy" if name == "full" else path.parent.parent.name)


@pytest.mark.parametrize(
    "mutate,field,value,allowed",
    [
        (lambda d: d["keys"]["quant"].update(bits=0), "keys.quant.bits", 0, "positive integer"),
        (lambda d: d["keys"]["quant"].update(bits="two"), "keys.quant.bits", "two", "positive integer"),
        (lambda d: d["values"]["quant"].update(axis="row"), "values.quant.axis", "row", "channel | token"),
        (lambda d: d["values"]["quant"].update(group_size=-8), "values.quant.group_size", -8, "positive integer"),
        (lambda d: d["values"].update(demote="drop"), "values.demote", "drop", "quantize | evict"),
        (lambda d: d["keys"].update(retain=[]), "keys.retain", [], "non-empty list"),
        (lambda d: d["keys"].update(retain="window"), "keys.retain", "window", "list of selectors"),
        (lambda d: d["keys"].update(colour="red"), "keys.colour", "red", "one of the keys"),
        (lambda d: d.update(extra=1), "policy.extra", 1, "one of the keys"),
        (lambda d: d["keys"]["quant"].update(nbits=2), "keys.quant.nbits", 2, "one of the keys"),
        (lambda d: d.pop("values"), "values", None, "section is required"),
        (lambda d: d.update(name=""), "name", "", "non-empty string"),
    ],
)
def test_bad_values_name_field_value_and_allowed(mutate, field, value, allowed):
    data = base()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        PolicyConfig.from_dict(data)
    assert err.value.field == field
    assert err.value.value == value
    assert allowed in err.value.allowed
    assert field in str(err.value) and repr(value) in str(err.value)


@pytest.mark.parametrize(
    "selector,message",
    [
        ({"type": "window", "size": -4}, "keys.retain[0].size: got -4"),
        ({"type": "log", "window": 0}, "keys.retain[0].window: got 0"),
        ({"type": "window", "width": 4}, "keys.retain[0]"),
    ],
)
def test_bad_selector_parameters_are_named(selector, message):
    data = base()
    data["keys"]["retain"] = [selector]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Policy.from_dict(data)


def test_yaml_string_and_missing_file():
    text = yaml.safe_dump(base())
    assert PolicyConfig.from_yaml(text).name == "p"
    with pytest.raises(ConfigError, match="existing YAML file or a registered policy name"):
        Policy.load("does/not/exist.yaml")


def test_single_selector_mapping_is_accepted():
    data = base()
    data["keys"]["retain"] = {"type": "window", "size": 4}
    assert Policy.from_dict(data).budget()["keys"] == 4


def test_union_budget_is_the_sum():
    data = base()
    data["values"]["retain"] = [{"type": "sink", "size": 4}, {"type": "window", "size": 124}]
    assert Policy.from_dict(data).budget() == {"keys": 24, "values": 128}


def test_a_key_given_twice_is_refused_with_its_line():
    text = (
        "name: p\nkeys:\n  retain: [{type: window, size: 8}]\n  retain: [{type: all}]\n"
        "values:\n  retain: [{type: all}]\n"
    )
    with pytest.raises(
        ConfigError, match=r"yaml: got 'retain'; allowed: each key once per mapping \(given again on line 4\)"
    ):
        PolicyConfig.from_yaml(text)


@pytest.mark.parametrize("suffix", [".json", ".txt", ""])
def test_a_policy_file_of_another_format_is_named_as_such(tmp_path, suffix):
    path = tmp_path / f"policy{suffix}"
    path.write_text(yaml.safe_dump(base()))
    with pytest.raises(ConfigError, match=r"\.yaml/\.yml file; a file with another extension is not read"):
        Policy.load(str(path))


def test_an_upper_case_yaml_suffix_is_read(tmp_path):
    path = tmp_path / "policy.YAML"
    path.write_text(yaml.safe_dump(base()))
    assert Policy.load(str(path)).name == "p"


@pytest.mark.parametrize("kind", ["directory", "not utf-8"])
def test_unreadable_policy_files_name_the_file(tmp_path, kind):
    path = tmp_path / "policy.yaml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(
        ConfigError, match="policy file: got .*policy.yaml.*" + ("directory" if kind == "directory" else "UTF-8")
    ):
        Policy.load(str(path))


def test_a_huge_per_channel_group_is_refused():
    data = base()
    data["keys"]["quant"].update(axis="channel", group_size=1_000_000)
    with pytest.raises(ConfigError, match="keys.quant.group_size: got 1000000; allowed: at most 1024 tokens"):
        Policy.from_dict(data)


def test_a_side_that_never_demotes_needs_no_quantizer_setting_that_fits_the_model():
    """`full` on a model with head_dim 32 (its default group of 64 does not divide it): it never
    quantizes, so its quantizer settings are not checked against the model."""
    layer = Policy.load("full").new_layer(head_dim=32)
    assert layer.key_store.backend is None and layer.value_store.backend is None


def test_yaml_merge_keys_load_as_the_mapping_they_expand_to():
    """``<<: *anchor`` is valid YAML: merged keys can be overridden by the mapping's own."""
    merged = PolicyConfig.from_yaml(
        "name: m\n"
        "keys: &side\n"
        "  retain: [{type: window, size: 64}]\n"
        "  quant: &quant {backend: native, bits: 2, group_size: 32, axis: channel}\n"
        "values:\n"
        "  <<: *side\n"
        "  quant: {<<: *quant, axis: token}\n"
    )
    retain = [{"type": "window", "size": 64}]
    plain = PolicyConfig.from_dict(
        {
            "name": "m",
            "keys": {"retain": retain, "quant": {"bits": 2, "group_size": 32, "axis": "channel"}},
            "values": {"retain": retain, "quant": {"bits": 2, "group_size": 32, "axis": "token"}},
        }
    )
    assert merged == plain
