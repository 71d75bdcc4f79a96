"""How far tensor-parallel generation drifts from one process, per policy.

    python -m benchmarks.tp_agreement --model random-llama --policies full,kivi,logquant --executor fused

Runs ``examples/tensor_parallel.py`` on 2 ranks and in one process on the same
checkpoint, then prints, per policy: new tokens that agree before the first difference,
the largest logit difference while the tokens agree, and that difference relative to
the spread (standard deviation) of the one-process logits at the same step. These
figures are what ``tests/distributed/test_tensor_parallel.py``'s tolerance is set from.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from kvpolicy.evaluation.agreement import GreedyAgreement, greedy_agreement

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tensor_parallel.py"


def example():
    spec = importlib.util.spec_from_file_location("tensor_parallel_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row_agreements(tp: dict, one: dict) -> list[GreedyAgreement]:
    """Each row of a 2-rank run (``tp``) against the same row of the one-process run."""
    w = one["prompt_width"]
    return [
        greedy_agreement(tp["tokens"][row, w:], tp["logits"][:, row], one["tokens"][row, w:], one["logits"][:, row])
        for row in range(one["tokens"].shape[0])
    ]


def agreement(tp: dict, one: dict) -> dict:
    """Tokens agreeing before the first difference, and logit drift while they agree."""
    rows = row_agreements(tp, one)
    return {
        "agreed": sum(r.agreed for r in rows),
        "of": sum(r.compared for r in rows),
        "max_logit_diff": max(r.max_logit_diff for r in rows),
        "max_diff_over_std": max(r.drift for r in rows),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random-llama")
    parser.add_argument("--policies", default="full,kivi,logquant")
    parser.add_argument("--executor", help="executor for the quantizing policies (e.g. fused)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args(argv)
    ex = example()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ex.prepare_checkpoint(args.model, 2, Path(tmp) / "checkpoint")
        for policy in args.policies.split(","):
            common = ["--checkpoint", str(checkpoint), "--policy", policy, "--dtype", "float32"]
            common += ["--max-new-tokens", str(args.max_new_tokens)]
            if args.executor and policy != "full":
                common += ["--executor", args.executor]
            ex.main([*common, "--nproc", "2", "--out", f"{tmp}/tp.pt"])
            ex.main([*common, "--single", "--out", f"{tmp}/one.pt"])
            rows.append({"policy": policy, **agreement(torch.load(f"{tmp}/tp.pt"), torch.load(f"{tmp}/one.pt"))})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "executor": args.executor, "rows": rows}, f, indent=2)
    print("| policy | tokens agreeing | max logit diff | max diff / logit std |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['agreed']}/{r['of']} | {r['max_logit_diff']:.2e} | {r['max_diff_over_std']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
