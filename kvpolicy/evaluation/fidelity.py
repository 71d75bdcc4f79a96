"""Fidelity to the 16-bit cache, teacher-forced over long real documents.

For each document of ``length`` tokens, one full-precision forward gives the reference
next-token distributions. Each contender then takes the first ``length - decode_tokens``
tokens as a prefill and reads the rest one token at a time (teacher forcing), so the last
``decode_tokens - 1`` predictions are made from its compressed cache. Reported per
contender: mean KL(reference || contender), top-1 agreement with the reference,
perplexity on the document, per-layer attention-output error (kvpolicy contenders) and
the KV bytes a 16-bit deployment would hold after the same updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import attrs
import torch

from kvpolicy.evaluation.contenders import Contender, replay_nbytes
from kvpolicy.evaluation.decoding import ingest, prefill, step
from kvpolicy.evaluation.probe import attach_probes
from kvpolicy.evaluation.task import Metric, Task, TaskResult, progress_bar
from kvpolicy.evaluation.texts import code_documents, prose_documents

METRICS = [
    Metric("kl", "KL vs 16-bit", False, ".4f"),
    Metric("top1", "top-1 agreement", True, ".3f"),
    Metric("ppl", "perplexity", False, ".2f"),
    Metric("attn_err", "attention L1 error", False, ".4f"),
    Metric("kv_ratio", "KV bytes vs 16-bit", False, ".3f"),
]


@attrs.define
class Fidelity(Task):
    name: ClassVar[str] = "fidelity"
    length: int = 4096
    decode_tokens: int = 128
    prose_documents: int = 1
    code_documents: int = 1

    def documents(self, tokenizer) -> list[tuple[str, list[int]]]:
        docs = prose_documents(tokenizer, self.length, self.prose_documents)
        docs += code_documents(tokenizer, self.length, self.code_documents)
        if not docs:
            raise ValueError(f"no document of {self.length} tokens found")
        return docs

    @torch.no_grad()
    def run(self, model, tokenizer, contenders: Sequence[Contender], progress: bool = True) -> TaskResult:
        docs = self.documents(tokenizer)
        prefix = self.length - self.decode_tokens
        result = TaskResult(self.name, METRICS, settings=self.settings())
        sums = {c.name: {"kl": 0.0, "top1": 0.0, "nll": 0.0, "n": 0, "layers": None} for c in contenders}
        bar = progress_bar(len(docs) * len(contenders), "fidelity", progress)
        for doc_name, ids in docs:
            cache_src, ref_logits = prefill(model, ids, logits_to_keep=self.decode_tokens)
            ref = torch.log_softmax(ref_logits[:-1], dim=-1)  # predictions for ids[prefix+1:]
            targets = torch.tensor(ids[prefix + 1 :])
            for contender in contenders:
                bar.set_postfix_str(f"{doc_name} · {contender.name}")
                cache = ingest(contender.make_cache(model), cache_src, prefix)
                probes = attach_probes(cache, cache_src, prefix) if contender.policy is not None else []
                logps = torch.stack([torch.log_softmax(step(model, cache, t), -1) for t in ids[prefix:-1]])
                kl = (ref.exp() * (ref - logps)).sum(-1)
                top1 = (ref.argmax(-1) == logps.argmax(-1)).float()
                nll = -logps.gather(-1, targets[:, None]).squeeze(-1)
                layer_err = [sum(p.errors) / len(p.errors) for p in probes] if probes else None
                s = sums[contender.name]
                s["kl"] += float(kl.sum())
                s["top1"] += float(top1.sum())
                s["nll"] += float(nll.sum())
                s["n"] += len(targets)
                if layer_err is not None:
                    s["layers"] = layer_err if s["layers"] is None else [a + b for a, b in zip(s["layers"], layer_err)]
                result.details.append(
                    {
                        "document": doc_name,
                        "contender": contender.name,
                        "kl": float(kl.mean()),
                        "top1": float(top1.mean()),
                        "ppl": math.exp(float(nll.mean())),
                        "attn_err_by_layer": layer_err,
                    }
                )
                bar.update()
        bar.close()
        for contender in contenders:
            s = sums[contender.name]
            layers = [e / len(docs) for e in s["layers"]] if s["layers"] is not None else None
            result.rows[contender.name] = {
                "kl": s["kl"] / s["n"],
                "top1": s["top1"] / s["n"],
                "ppl": math.exp(s["nll"] / s["n"]),
                "attn_err": sum(layers) / len(layers) if layers else None,
                "attn_err_by_layer": layers,
                **replay_nbytes(contender, model, prefix, self.decode_tokens - 1),
            }
        return result
