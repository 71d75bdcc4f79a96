"""Reliability: bad input, left-padded batches, cache reuse and transformers features.

Every case records what was tried and what happened (see ``tests/recording.py``); the
docs' reliability page is rendered from that record:

    KVPOLICY_RECORD=docs/results/reliability.json pytest -n 0 tests/test_reliability.py tests/test_soak.py
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import attrs
import pytest
import torch
import yaml
from transformers import (
    DynamicCache,
    Gemma4TextConfig,
    MllamaTextConfig,
    MptConfig,
    MptForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import kvpolicy
from kvpolicy import Policy, PolicyConfig
from kvpolicy.errors import (
    CacheMismatchError,
    ConfigError,
    MissingDependencyError,
    NotSupportedError,
    UnknownNameError,
    UnsupportedModelError,
)
from kvpolicy.evaluation.agreement import greedy_agreement
from kvpolicy.generation import cache_kwargs
from tests.cache.test_cache import greedy, left_padded_batch
from tests.conftest import tiny_llama
from tests.recording import record

SHIPPED = ["full", "kivi", "sink_kivi", "logquant", "partial_logquant", "streaming"]


def policy_dict(**keys_changes) -> dict:
    keys = {"retain": [{"type": "window", "size": 8}], "quant": {"bits": 2, "group_size": 32, "axis": "channel"}}
    keys.update(keys_changes)
    values = {"retain": [{"type": "window", "size": 8}], "quant": {"bits": 2, "group_size": 32, "axis": "token"}}
    return {"name": "p", "keys": keys, "values": values}


def with_quant(**quant) -> dict:
    data = policy_dict()
    data["values"]["quant"].update(quant)
    return data


class _Holder:
    """A stand-in model: only ``config`` is read before anything runs."""

    def __init__(self, config):
        self.config = config


def _policy_path(tmp_path, name: str, content: bytes | None) -> None:
    """``Policy.load`` of a path: a directory (``content`` None) or a file of these bytes."""
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    Policy.load(str(path))


def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1,
        n_group=1, topk_group=1,
    )  # fmt: skip
    return DeepseekV3ForCausalLM(config).eval()


def _latents_slip(monkeypatch) -> None:
    """A family kvpolicy has no rule for, whose attention reads tensors derived from what the
    cache returned (DeepSeek V3 with its latent-attention check taken away): the step after
    the first is refused instead of attending the new tokens alone."""
    import kvpolicy.cache.layers

    full = [kvpolicy.cache.layers.LayerSpec(i, "full_attention", 2, 16, None, 2) for i in range(2)]
    monkeypatch.setattr(kvpolicy.cache.layers, "model_layers", lambda model: full)
    model = _deepseek_v3()
    model.generate(torch.ones(1, 6, dtype=torch.long), max_new_tokens=3,
                   **cache_kwargs(Policy.load("full").make_cache(model)))  # fmt: skip


def _output_attentions() -> None:
    model = tiny_llama()
    cache = Policy.load("kivi").make_cache(model)
    model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=1, output_attentions=True,
                   return_dict_in_generate=True, **cache_kwargs(cache))  # fmt: skip


def _yaml(tmp_path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    Policy.load(str(path))


def _mismatch(kind: str) -> None:
    cache = Policy.load("kivi").make_cache(tiny_llama())
    k = torch.randn(2, 1, 5, 64)
    cache.update(k, k, 0)
    other = {"dtype": k.half(), "batch": torch.randn(3, 1, 1, 64), "device": k.to("meta")}[kind]
    cache.update(other, other, 0)


def _missing_package(monkeypatch, module: str, backend: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    parent, _, child = module.rpartition(".")
    if parent in sys.modules:  # an earlier import left the submodule on its package
        monkeypatch.delattr(sys.modules[parent], child, raising=False)
    Policy.from_dict(with_quant(backend=backend)).make_cache(tiny_llama())


def _linear_attention_model():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2)
    config.layer_types = ["full_attention", "linear_attention"]
    Policy.load("kivi").make_cache(_Holder(config))


def _hybrid_refused(name: str) -> None:
    from tests.cache.test_hybrid import REFUSED, build

    config_name, model_name, settings, _ = REFUSED[name]
    model = build(config_name, model_name, settings, attention="eager")
    model.generate(
        torch.randint(1, 256, (1, 20)), max_new_tokens=2, **cache_kwargs(Policy.load("full").make_cache(model))
    )


def _not_attached() -> None:
    model = tiny_llama()
    cache = Policy.load("kivi").make_cache(model)
    model.set_attn_implementation("eager")
    model(torch.randint(1, 256, (1, 4)), past_key_values=cache)


@attrs.frozen
class BadInput:
    label: str
    trigger: Callable
    error: type[BaseException]
    says: tuple[str, ...]


BAD_INPUTS = [
    BadInput("policy name `logqant`", lambda tp, mp: Policy.load("logqant"), UnknownNameError,
             ("unknown policy 'logqant'", "Did you mean 'logquant'", "Registered policies:")),
    BadInput("selector type `windw`", lambda tp, mp: Policy.from_dict(policy_dict(retain=[{"type": "windw"}])),
             UnknownNameError, ("unknown selector 'windw'", "Did you mean 'window'")),
    BadInput("quantizer backend `natve`", lambda tp, mp: Policy.from_dict(with_quant(backend="natve")),
             UnknownNameError, ("unknown quantizer 'natve'", "Did you mean 'native'", "hqq, native, quanto")),
    BadInput("executor `fusd`", lambda tp, mp: Policy.from_dict({**policy_dict(), "executor": "fusd"}),
             UnknownNameError, ("unknown executor 'fusd'", "Did you mean 'fused'")),
    BadInput("window size `'big'` (wrong type)",
             lambda tp, mp: Policy.from_dict(policy_dict(retain=[{"type": "window", "size": "big"}])),
             ConfigError, ("keys.retain[0].size: got 'big'",)),
    BadInput("window size `-4` (negative budget)",
             lambda tp, mp: Policy.from_dict(policy_dict(retain=[{"type": "window", "size": -4}])),
             ConfigError, ("keys.retain[0].size: got -4", "positive")),
    BadInput("unknown key `retian`", lambda tp, mp: PolicyConfig.from_dict(policy_dict(retian=[])),
             ConfigError, ("keys.retian", "one of the keys")),
    BadInput("`bits: 5` on the native backend", lambda tp, mp: Policy.from_dict(with_quant(bits=5)).make_cache(
        tiny_llama()), ConfigError, ("values.quant.bits: got 5", "2 | 3 | 4 | 8 for backend 'native'")),
    BadInput("`bits: 8` on the hqq backend",
             lambda tp, mp: Policy.from_dict(with_quant(bits=8, backend="hqq")).make_cache(tiny_llama()),
             ConfigError, ("values.quant.bits: got 8", "2 | 4 for backend 'hqq'")),
    BadInput("per-token `group_size: 48` with head_dim 64",
             lambda tp, mp: Policy.from_dict(with_quant(group_size=48)).make_cache(tiny_llama()),
             ConfigError, ("values.quant.group_size: got 48", "a divisor of head_dim=64")),
    BadInput("`axis: row`", lambda tp, mp: PolicyConfig.from_dict(with_quant(axis="row")), ConfigError,
             ("values.quant.axis: got 'row'", "channel | token")),
    BadInput("keys evicted, values quantized",
             lambda tp, mp: PolicyConfig.from_dict(policy_dict(demote="evict")), ConfigError,
             ("eviction must apply to keys and values alike",)),
    BadInput("YAML with a Python object tag", lambda tp, mp: _yaml(tp, "name: !!python/object/apply:os.system ['x']\n"),
             ConfigError, ("valid YAML",)),
    BadInput("YAML syntax error", lambda tp, mp: _yaml(tp, "name: [unclosed\n"), ConfigError, ("valid YAML",)),
    BadInput("YAML that is a list", lambda tp, mp: _yaml(tp, "- a\n- b\n"), ConfigError, ("mapping",)),
    BadInput("policy file that does not exist", lambda tp, mp: Policy.load("no/such/policy.yaml"), ConfigError,
             ("existing YAML file or a registered policy name",)),
    BadInput("policy path that is a directory", lambda tp, mp: _policy_path(tp, "dir.yaml", None), ConfigError,
             ("policy file: got", "dir.yaml", "this is a directory")),
    BadInput("policy file that is not UTF-8", lambda tp, mp: _policy_path(tp, "latin1.yaml", b"name: caf\xe9\n"),
             ConfigError, ("policy file: got", "latin1.yaml", "a UTF-8 text file")),
    BadInput("policy file in JSON", lambda tp, mp: _policy_path(tp, "policy.json", b"{}"), ConfigError,
             ("policy.json", "a .yaml/.yml file", "another extension is not read")),
    BadInput("YAML with a key given twice", lambda tp, mp: _yaml(tp, "name: a\nname: b\n"), ConfigError,
             ("yaml: got 'name'", "each key once per mapping (given again on line 2)")),
    BadInput("per-channel `group_size: 1000000`",
             lambda tp, mp: Policy.from_dict(policy_dict(quant={"axis": "channel", "group_size": 1_000_000})),
             ConfigError, ("keys.quant.group_size: got 1000000", "at most 1024 tokens per per-channel group")),
    BadInput("`make_cache` on something that is not a transformers model",
             lambda tp, mp: Policy.load("kivi").make_cache(torch.nn.Linear(2, 2)), UnsupportedModelError,
             ("expected a transformers model", "got Linear")),
    BadInput("unknown keys of mixed types", lambda tp, mp: Policy.from_dict({**policy_dict(), 1: "x", "zzz": 2}),
             ConfigError, ("policy.zzz: got 2", "one of the keys")),
    BadInput("a YAML mapping used as a key", lambda tp, mp: PolicyConfig.from_yaml("? {a: 1}\n: 2\nname: x\n"),
             ConfigError, ("a mapping as a key on line 1", "plain (scalar) keys")),
    BadInput("YAML nested thousands of levels", lambda tp, mp: PolicyConfig.from_yaml("a: " + "[" * 3000 + "]" * 3000),
             ConfigError, ("YAML nested a few levels deep",)),
    BadInput("a 5,000-digit integer", lambda tp, mp: PolicyConfig.from_yaml(
        yaml.safe_dump(policy_dict()).replace("bits: 2", "bits: " + "9" * 5000, 1)),
             ConfigError, ("integers of at most 9007199254740992",)),
    BadInput("multi-head latent attention (DeepSeek V3)", lambda tp, mp: Policy.load("full").make_cache(_deepseek_v3()),
             UnsupportedModelError, ("DeepseekV3ForCausalLM (deepseek_v3)", "multi-head latent attention")),
    BadInput("cross-attention layers among the decoder layers (Mllama)", lambda tp, mp: Policy.load("full").make_cache(
        _Holder(MllamaTextConfig(num_hidden_layers=4, cross_attention_layers=[1]))),
             UnsupportedModelError, ("has cross-attention layers (1)", "image encoder's keys and values")),
    BadInput("attention set per layer (Gemma 4)", lambda tp, mp: Policy.load("full").make_cache(
        _Holder(Gemma4TextConfig())),
             UnsupportedModelError, ("sets its attention per layer", "'head_dim' is a per-layer attribute")),
    BadInput("attention outside the AttentionInterface (MPT)", lambda tp, mp: Policy.load("full").make_cache(
        MptForCausalLM(MptConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2))),
             UnsupportedModelError, ("MptForCausalLM (mpt) does not take a custom attention function",)),
    BadInput("keys transformed between the cache and attention (unknown family)", lambda tp, mp: _latents_slip(mp),
             NotSupportedError, ("never reached the 'kvpolicy' attention function", "use DynamicCache")),
    BadInput("`output_attentions=True` under a kvpolicy cache", lambda tp, mp: _output_attentions(), NotSupportedError,
             ("output_attentions=True", "returns no attention weights")),
    BadInput("backend `quanto` without optimum-quanto installed",
             lambda tp, mp: _missing_package(mp, "optimum.quanto", "quanto"), MissingDependencyError,
             ("optimum-quanto", "pip install 'kvpolicy[quanto]'")),
    BadInput("backend `hqq` without hqq installed",
             lambda tp, mp: _missing_package(mp, "hqq.core.quantize", "hqq"), MissingDependencyError,
             ("'hqq'", "pip install 'kvpolicy[hqq]'")),
    BadInput("attention-logit soft-capping (Gemma 2)", lambda tp, mp: _hybrid_refused("gemma2"), NotSupportedError,
             ("Gemma2Attention asks its attention for attention-logit soft-capping",)),
    BadInput("learned attention sinks (GPT-OSS)", lambda tp, mp: _hybrid_refused("gpt_oss"), NotSupportedError,
             ("GptOssAttention asks its attention for learned attention sinks",)),
    BadInput("`layer_types` naming an unknown factory",
             lambda tp, mp: Policy.from_dict({**policy_dict(), "layer_types": {"sliding_attention": "windw"}}),
             ConfigError, ("layer_types.sliding_attention: got 'windw'", "a registered layer factory: policy, window")),
    BadInput("encoder-decoder model (T5)", lambda tp, mp: Policy.load("kivi").make_cache(T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))),
             UnsupportedModelError, ("cross-attention",)),
    BadInput("model with linear-attention layers", lambda tp, mp: _linear_attention_model(), UnsupportedModelError,
             ("(llama) has 'linear_attention' layers", "no kvpolicy cache layer serves")),
    BadInput("float16 tensors into a float32 cache", lambda tp, mp: _mismatch("dtype"), CacheMismatchError,
             ("holds torch.float32", "got torch.float16")),
    BadInput("batch 3 into a batch-2 cache", lambda tp, mp: _mismatch("batch"), CacheMismatchError,
             ("(batch, kv_heads, head_dim)=(2, 1, 64)", "(3, 1, 64)")),
    BadInput("tensors on another device", lambda tp, mp: _mismatch("device"), CacheMismatchError,
             ("on cpu", "got torch.float32 on meta")),
    BadInput("cache used after the model left `kvpolicy` attention", lambda tp, mp: _not_attached(), RuntimeError,
             ("attention set to 'kvpolicy'", "'eager'")),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c.label)
def test_bad_input_gets_a_clear_error(case, tmp_path, monkeypatch):
    with pytest.raises(case.error) as caught:
        case.trigger(tmp_path, monkeypatch)
    message = str(caught.value)
    for piece in case.says:
        assert piece in message, f"{piece!r} not in {message!r}"
    record("bad_input", f"{BAD_INPUTS.index(case):02d}", input=case.label, error=type(caught.value).__name__,
           message=message)  # fmt: skip


def test_a_broken_plugin_is_named_and_the_others_still_load(tmp_path, monkeypatch):
    from tests.policy.test_registry import make_distribution

    make_distribution(tmp_path, "fine_plugin", "[kvpolicy]\nbroken = no_such_module_here\nfine = fine_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning) as warned:
        registry = kvpolicy.Registry()
    sys.modules.pop("fine_plugin", None)
    message = str(next(w.message for w in warned if "broken" in str(w.message)))
    assert "plugin 'broken' failed to load" in message and "ModuleNotFoundError" in message
    assert "every_kth" in registry.names("selector") and "logquant" in registry.names("policy")
    record("bad_input", "99", input="a plugin whose module is missing", error="RuntimeWarning (others load)",
           message=message)  # fmt: skip


def test_yaml_cannot_construct_objects(tmp_path):
    marker = tmp_path / "ran"
    text = yaml.safe_dump(policy_dict()) + f"executor: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ConfigError):
        _yaml(tmp_path, text)
    assert not marker.exists()


# --- left-padded batches ---------------------------------------------------------------


left_padded = functools.partial(left_padded_batch, seed=3)


@pytest.mark.parametrize("name", ["streaming", "sink_kivi"])
def test_sinks_are_each_rows_first_real_tokens(name):
    model = tiny_llama()
    lengths = [300, 150, 20, 3]
    inputs = left_padded(lengths)
    cache = Policy.load(name).make_cache(model)
    with torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, past_key_values=plain, use_cache=True)
    width, layer = max(lengths), cache.layers[0]
    sinks = layer.sinks
    slots = layer.key_store.fp_pos < sinks
    for row, n in enumerate(lengths):
        first_real = plain.layers[0].keys[row, :, width - n : width - n + min(sinks, n)]
        held = layer.key_store.fp[row][:, slots][:, : min(sinks, n)]
        assert torch.equal(held, first_real), f"row {row}"


@pytest.mark.parametrize("name", ["streaming", "full"])
def test_padded_rows_equal_each_row_alone_exactly_without_quantization(name):
    model = tiny_llama()
    lengths = [300, 150, 20, 3]
    inputs = left_padded(lengths)
    policy = Policy.load(name)
    with torch.no_grad():
        together = model.generate(**inputs, past_key_values=policy.make_cache(model), max_new_tokens=40,
                                  do_sample=False)  # fmt: skip
        width = inputs["input_ids"].shape[1]
        for row, n in enumerate(lengths):
            ids = inputs["input_ids"][row : row + 1, width - n :]
            alone = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=policy.make_cache(model),
                max_new_tokens=40,
                do_sample=False,
            )
            assert torch.equal(together[row, width:], alone[0, n:]), f"row {row} ({n} tokens)"


#: Tolerance for quantizing policies, in standard deviations of the row-alone logits.
#: Retention and quantization blocks follow the batch's positions, not the row's: a
#: padded row is selected at the batch's length (logquant's log pattern falls partly on
#: padding) and its first real tokens share a quantization group with padding tokens.
#: LogQuant's schedule also depends on the prefill's length (its authors' prefill rule),
#: which in a batch is the padded width: a 36-token row in a 323-token batch has some of its
#: keys thinned by the end of 64 steps, which alone it would keep (measured: drift 1.7 std
#: for partial_logquant there; the reliability page records every row's drift).
BATCH_LOGIT_DRIFT = 2.0
#: a greedy token may differ from the row alone only where the alone top-two logits are
#: closer than this (a near tie), after which the two continuations are not compared
BATCH_NEAR_TIE = 0.25


@pytest.mark.model
@pytest.mark.parametrize("name", SHIPPED)
def test_left_padded_batch_matches_each_prompt_alone(smollm, name):
    from tests.models.test_smollm2 import PROMPTS, batch

    model, tokenizer = smollm
    policy = kvpolicy.load_policy(name)

    def generate(inputs):
        with torch.no_grad():
            return model.generate(**inputs, past_key_values=policy.make_cache(model), max_new_tokens=64,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True)  # fmt: skip

    inputs = batch(tokenizer, PROMPTS)
    width = inputs["input_ids"].shape[1]
    together = generate(inputs)
    for row, prompt in enumerate(PROMPTS):
        single = batch(tokenizer, [prompt])
        n = single["input_ids"].shape[1]
        alone = generate(single)
        new_alone = alone.sequences[0, n:]
        assert len(new_alone) > 8, "the row should generate real text"
        steps = len(new_alone)
        new_together = together.sequences[row, width : width + steps]
        result = greedy_agreement(
            new_together, torch.stack(together.logits[:steps])[:, row], new_alone, torch.stack(alone.logits)[:, 0]
        )
        outcome = "same tokens"
        if not result.identical:
            margin = result.divergence_margin
            assert margin <= BATCH_NEAR_TIE, f"row {row} step {result.agreed}: not a near tie ({margin:.3f})"
            outcome = f"near tie at token {result.agreed} (margin {margin:.3f} std), then diverges"
        agreed, drift = result.agreed, result.drift
        if name in ("full", "streaming"):
            assert result.identical and drift < 1e-3
        assert drift <= BATCH_LOGIT_DRIFT, f"row {row}: logits drift {drift:.3f} std"
        record("batching", f"{SHIPPED.index(name)}{row}", policy=name, prompt_tokens=n, batch_width=width,
               agreed=agreed, compared=len(new_alone), drift_std=round(drift, 4), outcome=outcome)  # fmt: skip


# --- cache reuse and transformers features ---------------------------------------------


def _generate(model, cache, inputs, **kwargs):
    return greedy(model, inputs, cache, n=12, **kwargs)


def feature_multi_turn(model, policy):
    cache = policy.make_cache(model)
    first = left_padded([200, 90])
    out = _generate(model, cache, first)
    follow = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.cat([first["attention_mask"], torch.ones(2, out.shape[1] - first["input_ids"].shape[1] + 7)], 1)
    second = _generate(model, cache, {"input_ids": torch.cat([out, follow], 1), "attention_mask": mask.long()})
    assert second.shape == (2, out.shape[1] + 7 + 12) and cache.get_seq_length() == second.shape[1] - 1
    if policy.name == "full":
        dyn = DynamicCache(config=model.config)
        out_d = _generate(model, dyn, first)
        again = _generate(model, dyn, {"input_ids": torch.cat([out_d, follow], 1), "attention_mask": mask.long()})
        assert torch.equal(second, again)
        return "works; equals DynamicCache"
    return "works"


def _stored(cache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        for store in (layer.key_store, layer.value_store):
            tensor, _ = store.view().materialize()
            out.append(tensor)
    return out


def _batch_method(model, policy, apply: Callable, expect: Callable) -> None:
    cache = policy.make_cache(model)
    with torch.no_grad():
        model(**left_padded([260, 100, 180]), past_key_values=cache, use_cache=True)
    before = _stored(cache)
    apply(cache)
    after = _stored(cache)
    for b, a in zip(before, after):
        assert torch.equal(a, expect(b))


def feature_reorder(model, policy):
    index = torch.tensor([2, 0, 0])
    _batch_method(model, policy, lambda c: c.reorder_cache(index), lambda t: t[index])
    return "works; rows move exactly"


def feature_select_repeat(model, policy):
    _batch_method(model, policy, lambda c: c.batch_repeat_interleave(2), lambda t: t.repeat_interleave(2, 0))
    index = torch.tensor([0, 2])
    _batch_method(model, policy, lambda c: c.batch_select_indices(index), lambda t: t[index])
    return "works; rows move exactly"


def feature_beam_search(model, policy):
    out = _generate(model, policy.make_cache(model), left_padded([200, 90]), num_beams=3)
    assert out.shape == (2, 212)
    if policy.name == "full":
        assert torch.equal(out, _generate(model, DynamicCache(config=model.config), left_padded([200, 90]),
                                          num_beams=3))  # fmt: skip
        return "works; equals DynamicCache"
    return "works"


def feature_reset(model, policy):
    cache = policy.make_cache(model)
    _generate(model, cache, left_padded([250]))
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory().total_bytes == 0
    assert torch.equal(_generate(model, cache, left_padded([40], seed=9)),
                       _generate(model, policy.make_cache(model), left_padded([40], seed=9)))  # fmt: skip
    return "works; equals a fresh cache"


def feature_assisted(model, policy):
    inputs = {"input_ids": left_padded([30])["input_ids"]}
    with torch.no_grad():
        out = model.generate(**inputs, past_key_values=policy.make_cache(model), assistant_model=tiny_llama(seed=1),
                             max_new_tokens=12, do_sample=False)  # fmt: skip
    assert torch.equal(out, _generate(model, DynamicCache(config=model.config), inputs))
    return "works; equals greedy decoding"


def feature_crop(model, policy):
    cache = policy.make_cache(model)
    _generate(model, cache, left_padded([30]))
    length = cache.get_seq_length()
    cache.crop(-5)
    assert cache.get_seq_length() == length - 5
    return "works"


def feature_offload(model, policy):
    cache = policy.make_cache(model)
    _generate(model, cache, left_padded([30]))
    cache.layers[0].offload()


FEATURES = {
    "multi-turn (continue on the same cache)": feature_multi_turn,
    "beam search (`reorder_cache`)": feature_beam_search,
    "`reorder_cache`": feature_reorder,
    "`batch_repeat_interleave` / `batch_select_indices`": feature_select_repeat,
    "`reset`": feature_reset,
    "`crop` (rollback)": feature_crop,
    "assisted decoding (crops)": feature_assisted,
    "offload": feature_offload,
}
#: what each policy cannot do, by design
REFUSED = (
    {("`crop` (rollback)", p) for p in SHIPPED if p != "full"}
    | {("assisted decoding (crops)", p) for p in SHIPPED if p != "full"}
    | {("offload", p) for p in SHIPPED}
)


@pytest.fixture(scope="module")
def feature_model():
    return tiny_llama()


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_transformers_feature_works_or_is_refused_clearly(feature_model, feature, name):
    policy = kvpolicy.load_policy(name)
    if (feature, name) in REFUSED:
        # newer transformers refuse assisted decoding themselves (a ValueError naming the crop)
        # before asking the cache; older ones reach kvpolicy's NotSupportedError
        refusals = (NotSupportedError, ValueError) if feature == "assisted decoding (crops)" else NotSupportedError
        with pytest.raises(refusals) as caught:
            FEATURES[feature](feature_model, policy)
        result = f"refused: {caught.value}"
    else:
        result = FEATURES[feature](feature_model, policy)
    key = f"{list(FEATURES).index(feature)}{SHIPPED.index(name)}"
    record("features", key, feature=feature, policy=name, result=result)


def test_every_decoder_family_equals_dynamic_cache_or_is_refused():
    """Every causal-LM family of the installed transformers that builds small from its config
    class: `full`, and `kivi` with a budget above the sequence, give DynamicCache's logits
    exactly, or kvpolicy refuses the model with a message; so does every variant the defaults
    skip (ALiBi, parallel attention, biases, QK-norm names). No family may answer otherwise
    (see tests/family_sweep.py; two processes, one per core)."""
    import json
    import subprocess
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from tests import family_sweep

    names = family_sweep.names()
    root = Path(__file__).parent.parent

    def sweep(pending: list[str]) -> list[dict]:
        """Rows of ``pending``, in order. A process that dies (a crash, or killed for memory by
        the machine) goes on in a new one; a family it died on twice is a crash of its own."""
        rows, deaths = [], dict.fromkeys(pending, 0)
        while pending:
            run = subprocess.run([sys.executable, "-m", "tests.family_sweep", *pending], cwd=root,
                                 capture_output=True, text=True, timeout=1800)  # fmt: skip
            rows += [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
            done = {row["family"] for row in rows}
            pending = [name for name in pending if name not in done]
            if pending:
                dead = pending[0]
                deaths[dead] += 1
                if deaths[dead] == 2:
                    detail = f"the process died on it twice (exit {run.returncode}): {run.stderr[-300:]}"
                    rows.append({"family": dead, "outcome": "crash", "detail": detail} | dict.fromkeys(
                        family_sweep.POLICIES, "crash"))  # fmt: skip
                    pending.pop(0)
        return rows

    with ThreadPoolExecutor(2) as pool:  # two processes at a time, one per core
        rows = [row for half in pool.map(sweep, (names[0::2], names[1::2])) for row in half]
    assert sorted(r["family"] for r in rows) == sorted(names)
    for row in rows:
        record("families", row["family"], **row)
    wrong = [
        row
        for row in rows
        if row["outcome"] != "not built" and not {row[p] for p in family_sweep.POLICIES} <= {"equal", "refused"}
    ]
    assert not wrong, wrong
    built = {row["family"] for row in rows if row["outcome"] != "not built"}
    assert set(family_sweep.VARIANTS) <= built, set(family_sweep.VARIANTS) - built  # each variant really ran
    assert sum(row["outcome"] == "equal" for row in rows) >= 40  # the sweep really ran models through kvpolicy
