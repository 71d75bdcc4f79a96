"""The embedded models' converted-weights cache: made once, reused, remade when its source changes."""

from __future__ import annotations

import json

import pytest
import torch

import kvpolicy.models as models
from tests.conftest import tiny_llama


class _Tokenizer:
    def save_pretrained(self, folder):
        (folder / "tokenizer.json").write_text("{}")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF 'file' whose conversion yields a tiny Llama; counts conversions."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"x" * 10)
    conversions = []

    def convert(folder, name):
        conversions.append(name)
        return tiny_llama(), _Tokenizer()

    monkeypatch.setenv("KVPOLICY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "default_model_path", lambda name: (gguf.parent, gguf.name))
    monkeypatch.setattr(models, "_from_gguf", convert)
    return gguf, conversions


def test_the_first_load_converts_and_later_loads_reuse_the_cache(fake_gguf, tmp_path):
    gguf, conversions = fake_gguf
    folder = models._converted("smollm2")
    assert folder == tmp_path / "cache" / "models" / "smollm2"
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert json.loads((folder / "kvpolicy-source.json").read_text())["bytes"] == 10
    assert models._converted("smollm2") == folder
    assert conversions == ["model.gguf"]
    gguf.write_bytes(b"y" * 11)  # a new version of the package's file
    models._converted("smollm2")
    assert len(conversions) == 2
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_a_failed_conversion_leaves_no_cache(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_from_gguf", lambda folder, name: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        models._converted("smollm2")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_an_unknown_model_names_the_embedded_ones():
    from kvpolicy.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown model 'smollm'.*Did you mean 'smollm2'"):
        models.embedded_model("smollm")


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2"])
def test_cached_weights_and_tokenizer_equal_the_gguf(name):
    """What the cache serves is the GGUF's model: equal weights, token ids and logits."""
    model, tokenizer = models.load_default_model(name, dtype=torch.float32)
    source, source_tokenizer = models._from_gguf(*models.default_model_path(name))
    cached, original = model.state_dict(), source.state_dict()
    assert cached.keys() == original.keys()
    assert all(torch.equal(cached[k], original[k]) for k in original)
    text = "Caf\u00e9 d\u00e9j\u00e0 vu \u2014 def f(x):\n\treturn x ** 2  # \U0001f600"
    assert tokenizer(text)["input_ids"] == source_tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source.eval()(ids).logits)


def _split_gguf(tmp_path, parts: int = 3, tensors: int = 7):
    """A GGUF-headed file of ``parts`` part files, and the ``SplitGGUF`` that describes it."""
    import struct

    data = models.GGUF_MAGIC + struct.pack("<IQQ", 3, tensors, 0) + bytes(range(256)) * 4
    size = len(data)
    cut = -(-size // parts)
    paths = []
    for n in range(parts):
        path = tmp_path / "wheels" / f"part{n + 1:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data[n * cut : (n + 1) * cut])
        paths.append(path)
    split = models.SplitGGUF("fake.gguf", "no_such_module_part{}", parts, size, tensors, "no-such-part{}", "0.1")
    return split, paths, data


def test_a_split_gguf_is_joined_once_checked_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPOLICY_CACHE_DIR", str(tmp_path / "cache"))
    split, parts, data = _split_gguf(tmp_path)
    assert split.assemble() is None  # no part package installed and nothing joined before
    target = split.assemble(parts)
    assert target == tmp_path / "cache" / "gguf" / "fake.gguf" and target.read_bytes() == data
    for part in parts:
        part.unlink()
    assert split.assemble() == target  # reused without the parts


def test_a_split_gguf_refuses_missing_or_wrong_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPOLICY_CACHE_DIR", str(tmp_path / "cache"))
    split, parts, _ = _split_gguf(tmp_path)
    with pytest.raises(FileNotFoundError, match="2 of its 3 parts"):
        split.assemble(parts[:2])
    parts[1].write_bytes(b"short")
    with pytest.raises(ValueError, match="parts hold"):
        split.assemble(parts)
    other = models.SplitGGUF("fake.gguf", split.module, 3, split.size, 99, split.distribution, "0.1")
    _, parts, _ = _split_gguf(tmp_path)
    with pytest.raises(ValueError, match="with 7 tensors, expected version 2 or 3 with 99"):
        other.assemble(parts)
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-joined is left
