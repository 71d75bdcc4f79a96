"""Every decoder family of the installed transformers, built small from its config class.

For each ``model_type`` with a causal-LM class, a tiny random model (2 layers, 4 heads of 32) is
built from its config class, and greedy ``generate()`` of a 12-token prompt runs with
DynamicCache, then with each of :data:`POLICIES` through ``make_cache``. Outcomes:

* ``equal``: the policy's logits equal DynamicCache's exactly (``kivi``'s budget, 128 tokens,
  exceeds the 16-token sequence, so it quantizes nothing and must equal it too);
* ``refused``: a kvpolicy error said why (the message is recorded);
* ``differs`` / ``crash``: a silent wrong answer or a raw error, which the test fails on;
* ``not built``: the config class does not build small with these settings, or DynamicCache
  itself fails on it (the reason is recorded); nothing was asked of kvpolicy.

:data:`VARIANTS` adds the configurations a family's defaults skip (ALiBi, parallel attention,
biases, QK-norm under other names), each under its own name.

``python -m tests.family_sweep [name ...]`` prints one JSON line per family or variant. The test
runs it in a subprocess whose address space is capped, since a family whose config
ignores the small settings could otherwise take the machine's memory.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import warnings

POLICIES = ("full", "kivi")
#: config attributes set wherever a config class has them
SMALL = dict(
    vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=256, n_layer=2, n_head=4, n_embd=128, d_model=128,
    num_layers=2, ffn_dim=64, n_positions=256, moe_intermediate_size=32, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, sliding_window=6, attention_chunk_size=6,
    sliding_window_pattern=2, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=8, n_group=1, topk_group=1, pad_token_id=0, bos_token_id=1, eos_token_id=None,
    encoder_hash_byte_group_vocab=128, hidden_size_global=128,
)  # fmt: skip
#: families whose sub-configs (``text_config``, ``encoder_config`` ...) get :data:`SMALL` too: their
#: defaults build billions of parameters (BLT: 500,002-entry hash embeddings) and reached the
#: memory cap or the watchdog instead of kvpolicy
NESTED = (
    "blt", "dots3_note", "emu3", "fuyu", "gemma3", "gemma4", "gemma4_unified", "gemma4_unified_assistant", "llama4",
    "mllama", "qwen3_5", "qwen3_5_moe", "qwen4_exp",
)  # fmt: skip
#: name -> (model_type, config attributes set on top of SMALL): what the defaults do not build
VARIANTS = {
    "falcon+alibi": ("falcon", {"alibi": True}),
    "falcon+parallel_attn+bias": ("falcon", {"parallel_attn": True, "bias": True, "new_decoder_architecture": False}),
    "stablelm+qk_layernorm": ("stablelm", {"qk_layernorm": True}),
    "persimmon+qk_layernorm": ("persimmon", {"qk_layernorm": True}),
    "phi+qk_layernorm": ("phi", {"qk_layernorm": True}),
    "llama+attention_bias": ("llama", {"attention_bias": True}),
    "qwen2+sliding_window": ("qwen2", {"use_sliding_window": True, "max_window_layers": 1}),
}
MEMORY_CAP = 10 << 30
#: a watchdog against a family that hangs, not a time limit: the slowest family took 32 s on a
#: 2-core machine with another job on it, and twice that under parallel test workers
SECONDS_PER_FAMILY = 180


class _Timeout(Exception):
    pass


def families() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def names() -> list[str]:
    """Every family's ``model_type``, then every variant's name."""
    return [name for name, _ in families()] + list(VARIANTS)


def _has(config, name: str) -> bool:
    """``hasattr``, also for attributes a heterogeneous config sets per layer (reading them raises)."""
    try:
        getattr(config, name)
    except AttributeError:
        return False
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError: set per layer
        return True
    return True


def build(model_type: str, class_name: str, overrides: dict | None = None):
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class()
    settable = {
        k: v for k, v in SMALL.items() if _has(defaults, k) and not isinstance(getattr(config_class, k, None), property)
    }
    if model_type in NESTED:
        for name, sub in vars(defaults).items():
            if isinstance(sub, transformers.PretrainedConfig):
                own = {k: v for k, v in sub.to_dict().items() if k not in ("layer_types", "per_layer_config")}
                settable[name] = own | {k: v for k, v in SMALL.items() if k in own}
    model_class = getattr(transformers, class_name)
    for attention in ("sdpa", "eager"):  # eager where a family has no SDPA path
        config = config_class(**settable, **(overrides or {}))
        config._attn_implementation = attention
        torch.manual_seed(0)
        try:
            return model_class(config).eval()
        except ValueError as err:
            if attention == "eager" or "does not support an attention implementation" not in str(err):
                raise
    raise AssertionError("unreachable")


def one_family(name: str, class_name: str, overrides: dict | None = None) -> dict:
    import torch

    from kvpolicy import KVPolicyError, load_policy
    from kvpolicy.generation import cache_kwargs

    row = {"family": name}
    model_type = VARIANTS[name][0] if name in VARIANTS else name
    try:
        model = build(model_type, class_name, overrides)
        ids = torch.randint(2, 100, (1, 12), generator=torch.Generator().manual_seed(0))
        common = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            reference = torch.stack(model.generate(ids, **common).logits)
    except (Exception, _Timeout) as err:
        return row | {"outcome": "not built", "detail": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    original = model.config._attn_implementation
    for name in POLICIES:
        try:
            with torch.no_grad():
                out = model.generate(ids, **common, **cache_kwargs(load_policy(name).make_cache(model)))
            difference = (torch.stack(out.logits) - reference).abs().max().item()
            row[name] = "equal" if difference == 0 else f"differs by {difference:.3g}"
        except KVPolicyError as err:
            row[name] = "refused"
            row["detail"] = f"{type(err).__name__}: {err}"
        except (Exception, _Timeout) as err:
            row[name] = "crash"
            row["detail"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        if model.config._attn_implementation != original:  # make_cache switched it: back for the next policy
            model.set_attn_implementation(original)
    outcomes = {row[name] for name in POLICIES}
    row["outcome"] = outcomes.pop() if len(outcomes) == 1 else "mixed: " + ", ".join(row[n] for n in POLICIES)
    return row


def main(argv: list[str]) -> int:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    def alarm(*_):
        raise _Timeout(f"over {SECONDS_PER_FAMILY} s")

    signal.signal(signal.SIGALRM, alarm)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    classes = dict(families())
    runs = [(name, classes[name], None) for name in classes]
    runs += [(name, classes[model_type], overrides) for name, (model_type, overrides) in VARIANTS.items()]
    for name, class_name, overrides in runs:
        if argv and name not in argv:
            continue
        signal.alarm(SECONDS_PER_FAMILY)
        try:
            row = one_family(name, class_name, overrides)
        except _Timeout as err:
            row = {"family": name, "outcome": "not built", "detail": str(err)}
        finally:
            signal.alarm(0)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
