"""The registry: built-ins through the hooks, plugins through the ``kvpolicy`` entry-point group."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvpolicy import Policy, Registry, get_registry

PLUGIN_SOURCE = textwrap.dedent(
    '''
    """A third-party kvpolicy plugin used by the tests: a strided selector."""
    from typing import ClassVar

    import attrs
    import torch

    from kvpolicy import hookimpl
    from kvpolicy.selectors import Selector


    @attrs.define
    class StrideSelector(Selector):
        """Keep every ``stride``-th position and the newest ``recent``."""

        name: ClassVar[str] = "every_kth"
        stride: int = 8
        recent: int = 4

        @property
        def budget(self):
            return None

        def keep(self, length):
            every = torch.arange(0, max(0, length - self.recent), self.stride)
            return torch.cat([every, torch.arange(max(0, length - self.recent), length)])


    @hookimpl
    def kvpolicy_selectors():
        return [StrideSelector]
    '''
)


def make_distribution(root, package: str, entry_points: str) -> None:
    """A minimal installed distribution (dist-info on sys.path), as pip would leave it."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(PLUGIN_SOURCE)
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    make_distribution(tmp_path, "stride_plugin", "[kvpolicy]\nstride_plugin = stride_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("stride_plugin", None)


def test_builtins_and_shipped_plugins_are_registered_with_their_providers():
    registry = get_registry()
    assert {"all", "log", "sink", "window"} <= set(registry.names("selector"))
    assert registry.provider("selector", "log") == "kvpolicy"
    assert registry.provider("quantizer", "native") == "kvpolicy"
    assert registry.provider("policy", "logquant") == "kvpolicy_logquant"
    assert registry.provider("policy", "partial_logquant") == "kvpolicy_logquant"
    assert registry.provider("policy", "kivi") == "kvpolicy_kivi"
    assert registry.provider("policy", "sink_kivi") == "kvpolicy_kivi"
    assert registry.provider("policy", "streaming") == "kvpolicy_streaming"
    assert registry.load_errors == {}


def test_third_party_selector_is_registered_and_usable_from_yaml(third_party, tmp_path):
    registry = Registry()
    assert registry.provider("selector", "every_kth") == "stride_plugin"
    yaml_path = tmp_path / "strided.yaml"
    yaml_path.write_text(
        textwrap.dedent(
            """
            name: strided
            keys:
              retain: [{type: every_kth, stride: 4, recent: 8}]
              quant: {bits: 2, group_size: 16, axis: channel}
            values:
              retain: [{type: every_kth, stride: 4, recent: 8}]
              quant: {bits: 2, group_size: 16, axis: token}
            """
        )
    )
    policy = Policy.load(str(yaml_path), registry=registry)
    layer = policy.new_layer(head_dim=16)
    layer.update(torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16))
    assert sorted(layer.key_store.fp_pos.tolist()) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 33, 34, 35, 36, 37, 38, 39]


def test_kvpolicy_list_shows_the_third_party_selector(third_party):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(third_party), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "kvpolicy.cli", "list"], capture_output=True, text=True, env=env, check=True
    )
    line = next(ln for ln in result.stdout.splitlines() if " every_kth " in ln)
    assert line.split()[0] == "selector" and "(plugin: stride_plugin)" in line
    assert "(plugin: kvpolicy_logquant)" in result.stdout


def test_a_name_clash_keeps_the_first_provider():
    from kvpolicy.hookspecs import hookimpl
    from kvpolicy.selectors import WindowSelector

    class Clash:
        @hookimpl
        def kvpolicy_selectors(self):
            return [WindowSelector]

    with pytest.warns(RuntimeWarning, match="registers selector 'window', already provided by 'kvpolicy'"):
        registry = Registry(load_entry_points=False, plugins={"clash": Clash()})
    assert registry.provider("selector", "window") == "kvpolicy"


def test_a_misspelt_hook_implementation_is_named_not_ignored():
    """pluggy would register ``kvpolicy_selector`` (no s) and never call it; the registry says so."""
    from kvpolicy import hookimpl

    class Misspelt:
        @hookimpl
        def kvpolicy_selector(self):
            return []

    with pytest.warns(RuntimeWarning, match="unknown hook 'kvpolicy_selector'.*did you mean 'kvpolicy_selectors'"):
        registry = Registry(load_entry_points=False, plugins={"misspelt": Misspelt()})
    assert "misspelt" in registry.load_errors


HIJACK_SOURCE = textwrap.dedent(
    """
    from kvpolicy.hookspecs import hookimpl


    @hookimpl(trylast=True)
    def kvpolicy_policies():
        window = [{"type": "window", "size": 8}]
        return [{
            "name": "logquant",
            "keys": {"retain": window, "quant": {"bits": 2, "group_size": 8, "axis": "channel"}},
            "values": {"retain": window, "quant": {"bits": 2, "group_size": 8, "axis": "token"}},
        }]
    """
)


@pytest.mark.parametrize("entry_point_name", ["kvpolicy_logquant", "my_logquant"])
def test_a_third_party_cannot_replace_a_shipped_plugin_or_policy(tmp_path, monkeypatch, entry_point_name):
    """Both directions: an entry point named like a shipped plugin, and one that registers a
    shipped policy's name (with trylast, which pluggy would otherwise order first)."""
    package = "hijack_plugin"
    make_distribution(tmp_path, package, f"[kvpolicy]\n{entry_point_name} = {package}\n")
    (tmp_path / package / "__init__.py").write_text(HIJACK_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.warns(RuntimeWarning) as caught:
            registry = Registry()
    finally:
        sys.modules.pop(package, None)
    assert registry.provider("policy", "logquant") == "kvpolicy_logquant"
    assert registry.policy_config("logquant") == get_registry().policy_config("logquant")
    assert {"logquant_mixed", "logquant_rot", "partial_logquant"} <= set(registry.names("policy"))
    (blamed,) = registry.load_errors  # the newcomer, never the shipped plugin
    assert (
        blamed.startswith(f"kvpolicy_logquant ({package}")
        if entry_point_name == "kvpolicy_logquant"
        else blamed == "my_logquant"
    )
    assert any(blamed in str(w.message) for w in caught)


def test_a_class_that_breaks_its_contract_is_skipped_with_the_plugin_named():
    from kvpolicy.hookspecs import hookimpl
    from kvpolicy.selectors import Selector

    class HalfSelector(Selector):  # keep() left abstract
        name = "half"

        def budget(self):
            return None

    class NoQuantize:
        name = "noq"
        supported_bits = (2,)

    class Broken:
        @hookimpl
        def kvpolicy_selectors(self):
            return [HalfSelector]

        @hookimpl
        def kvpolicy_quantizers(self):
            return [NoQuantize, "native"]

    with pytest.warns(RuntimeWarning) as caught:
        registry = Registry(load_entry_points=False, plugins={"broken_plugin": Broken()})
    text = " ".join(str(w.message) for w in caught)
    assert "'broken_plugin' registers a selector that does not implement the selector contract" in text
    assert "HalfSelector leaves keep abstract" in text
    assert "NoQuantize has no quantize, concat" in text and "is not a class (str 'native')" in text
    assert "half" not in registry.names("selector") and "noq" not in registry.names("quantizer")
    assert registry.provider("quantizer", "native") == "kvpolicy"
