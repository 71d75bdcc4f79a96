"""The example plugin, as installed: registered, listed, usable from YAML and in a cache."""

from __future__ import annotations

import subprocess
import sys

import torch

from kvpolicy import Policy, get_registry


def test_selector_and_policy_are_registered_by_this_plugin():
    registry = get_registry(refresh=True)
    assert registry.provider("selector", "stride") == "kvpolicy_stride"
    assert registry.provider("policy", "strided_kivi") == "kvpolicy_stride"


def test_kvpolicy_list_shows_it():
    out = subprocess.run([sys.executable, "-m", "kvpolicy.cli", "list"], capture_output=True, text=True, check=True)
    assert any(
        line.split()[:2] == ["selector", "stride"] and "kvpolicy_stride" in line for line in out.stdout.splitlines()
    )


def test_policy_keeps_window_and_anchors():
    policy = Policy.load("strided_kivi")
    assert policy.budget() == {"keys": 128, "values": 128}
    layer = policy.new_layer(head_dim=64)
    layer.update(torch.randn(1, 2, 400, 64), torch.randn(1, 2, 400, 64))
    kept = set(layer.key_store.fp_pos.tolist())
    assert kept == set(range(304, 400)) | {0, 64, 128, 192, 256}
    assert len(layer.key_store.packed_pos) + len(layer.key_store.staging_pos) == 400 - len(kept)
