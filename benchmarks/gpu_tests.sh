#!/usr/bin/env bash
# The GPU tests (CUDA kernels, executors, hybrid and value-head-size models) and the Triton
# kernels' float64 cases on the device, written with the device, image and command on top.
#   bash benchmarks/gpu_tests.sh benchmarks/results/gpu_tests_h200.txt
set -uo pipefail
out=${1:?usage: gpu_tests.sh OUTPUT_FILE}
tests=(tests/executors/test_fused.py tests/executors/test_multi_token.py tests/executors/test_executor.py tests/quantizers/test_rotation.py tests/graphs/test_cuda_graphs.py
       tests/cache/test_hybrid.py tests/cache/test_value_head_dim.py tests/store/test_pairing.py tests/tools/test_benchmarks.py
       tests/quantizers/test_three_bit.py tests/test_bounded_prefill.py)
workers=${GPU_TEST_WORKERS:-$(python3 -c "import os; print(min(8, os.cpu_count() or 1))")}
{
  echo "# GPU tests, $(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "# device: $(python3 -c 'import torch; print(torch.cuda.get_device_name())'), torch $(python3 -c 'import torch; print(torch.__version__)'), transformers $(python3 -c 'import transformers; print(transformers.__version__)'), triton $(python3 -c 'import triton; print(triton.__version__)')"
  echo "# command: bash benchmarks/gpu_tests.sh $out"
  echo "#   python3 -m pytest -q -p no:warnings -rf --tb=short -n $workers ${tests[*]}"
  # the tail keeps each failure's short traceback (a failure under many workers may not recur alone)
  python3 -m pytest -q -p no:warnings -rf --tb=short -n "$workers" "${tests[@]}" 2>&1 | tail -120
  echo
  echo "#   python3 -m tests.kernel_cases --device cuda   (the Triton kernels against float64, one line per case)"
  python3 -m tests.kernel_cases --device cuda 2>&1 | tail -40
} | tee "$out"
