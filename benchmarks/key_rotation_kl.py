"""Rotated against unrotated keys, teacher-forced along the 16-bit cache's own summaries.

For each policy: the policy with ``rotate: hadamard`` on its keys and with ``rotate: none``
(every layer entry too; values as written), whatever ``rotate: auto`` resolves to on the
model. Each summary prompt of ``kvpolicy evaluate``'s summary task is prefilled once at 16
bits; the 16-bit cache writes ``--steps`` greedy tokens; each variant's
cache takes the same prefill and is fed the same tokens. Prints the KL divergence from the
16-bit next-token distribution per step (mean, max, steps above 1 nat). CPU, float32:

    python -m benchmarks.key_rotation_kl --model qwen2.5-coder-0.5b logquant_mixed \\
        examples/policies/logquant_2p5.yaml examples/policies/logquant_3bit.yaml examples/policies/logquant_4bit.yaml

A proxy: it locates where a cache's distribution departs; task scores make the claims.
"""

from __future__ import annotations

import argparse
import copy

import torch

from kvpolicy import Policy, load_policy
from kvpolicy.evaluation.decoding import ingest
from kvpolicy.evaluation.shared_prefill import prefill_rows
from kvpolicy.evaluation.summarization import Summarization
from kvpolicy.generation import forward_cache_kwargs
from kvpolicy.models import load_default_model


def with_key_rotation(policy: Policy, rotate: str) -> Policy:
    """``policy`` with ``rotate`` (``hadamard`` or ``none``) on its keys, in its ``layers`` entries too."""
    data = copy.deepcopy(policy.config.to_dict())
    data["keys"]["quant"]["rotate"] = rotate
    for entry in data.get("layers") or []:
        if isinstance(entry.get("keys"), dict) and "quant" in entry["keys"]:
            entry["keys"]["quant"]["rotate"] = rotate
    data["name"] = f"{policy.name}_keys_{'rotated' if rotate == 'hadamard' else 'unrotated'}"
    return Policy.from_dict(data)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("policies", nargs="+", help="shipped policy names or YAML files")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    model, tokenizer = load_default_model(args.model, dtype=torch.float32)
    samples = Summarization().build(tokenizer, True)
    variants = []
    for name in args.policies:
        policy = Policy.from_yaml(name) if name.endswith(".yaml") else load_policy(name)
        variants.append((f"{policy.name}, keys rotated", with_key_rotation(policy, "hadamard")))
        variants.append((f"{policy.name}, keys unrotated", with_key_rotation(policy, "none")))
    kl: dict[str, list[torch.Tensor]] = {label: [] for label, _ in variants}
    for start in range(0, len(samples), args.batch):
        ids = torch.tensor([s.ids for s in samples[start : start + args.batch]])
        source, first = prefill_rows(model, ids)
        reference, token, tokens, logprobs = copy.deepcopy(source), first[:, None], [], []
        for _ in range(args.steps):
            tokens.append(token)
            out = model(token, **forward_cache_kwargs(model, reference), use_cache=True).logits[:, -1]
            logprobs.append(out.log_softmax(-1))
            token = out.argmax(-1)[:, None]
        for label, policy in variants:
            cache = ingest(policy.make_cache(model), source)
            steps = []
            for token, p16 in zip(tokens, logprobs, strict=True):
                q = model(token, **forward_cache_kwargs(model, cache), use_cache=True).logits[:, -1].log_softmax(-1)
                steps.append((p16.exp() * (p16 - q)).sum(-1))
            kl[label].append(torch.stack(steps, 1))
            print(f"prompts {start + 1}-{start + len(ids)}: {label}", flush=True)
    print(f"\n{args.model}: {len(samples)} summary prompts of {len(samples[0].ids)} tokens, {args.steps} steps each")
    print(f"{'policy':<42} {'mean KL':>8} {'max KL':>8} {'steps > 1 nat':>14}")
    for label, parts in kl.items():
        k = torch.cat(parts)
        print(f"{label:<42} {float(k.mean()):8.4f} {float(k.max()):8.3f} {int((k > 1).sum()):>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
