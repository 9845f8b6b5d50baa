#!/usr/bin/env bash
# The GPU check (issue 18), ready for a GPU machine; `make gpu-check` runs it, under 10 minutes:
#   1. tests/cuda for both backends, in float16 and in bfloat16, with torch.cuda.set_sync_debug_mode("warn")
#      inside the tests (a hidden host sync in a decode step fails them) and the SDPA backend asserted;
#   2. the GPU benchmark: both backends on workloads (b)-(d) at 64 streams (benchmarks/inference.py --gpu);
#   3. RRHF training on the GPU (issue 19): FSDP2 bf16 with checkpointing, a DCP checkpoint and a resume,
#      peak memory against the plan (benchmarks/gpu_check_rrhf.py).
# It runs with whatever python3 holds a CUDA torch (the lent machine's image), from this source tree: the
# suite's own small dependencies missing there travel as wheels in .whl/ (`benchmarks/gpu_check.sh --wheels`
# downloads them on a machine with PyPI). vLLM itself is too large to carry; where it is absent the vllm
# cases say so (skipped, with the reason) and only the in-house engine is measured.
set -uo pipefail
cd "$(dirname "$0")/.."
# grpcio and protobuf travel too: the generated stubs refuse a runtime older than their generator.
WHEELS=(grpcio==1.85.1 protobuf==7.35.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.1
        googleapis-common-protos==1.76.0 gguf==0.17.1 fastapi==0.136.3 starlette==1.10.0 uvicorn==0.55.0
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-doc==0.0.7 typing-inspection==0.4.5)
if [[ "${1:-}" == "--wheels" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
  exit
fi
PY=${PYTHON:-python3}
if [[ -d .whl ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/protos${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
$PY -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null || echo "vllm: not installed here (its cases are skipped)"
status=0
PARTS=${GPU_CHECK_PARTS:-tests,bench,rrhf}  # a rerun can skip what already passed, e.g. GPU_CHECK_PARTS=bench,rrhf
[[ $PARTS == *tests* ]] && for dtype in float16 bfloat16; do
  echo "== tests/cuda, $dtype"
  WOMBAT_CUDA_DTYPE=$dtype timeout 200 $PY -m pytest tests/cuda -m cuda -p no:cacheprovider -q -rs \
    -o addopts="" 2>&1 | tee "$OUT/tests-$dtype.txt" || status=1
done
[[ $PARTS == *bench* ]] && {
echo "== benchmark (GPU: workloads b-d at 64 streams, both backends where present)"
# No model hub and no room to carry one: a random LLaMA with a 1B-class body (16 layers, hidden 2048, GQA
# 32/8 heads, context 2048) and the tests' SentencePiece tokenizer, made on the machine. Throughput does
# not depend on the weights' values (EOS is ignored, every system makes the same number of tokens).
MODEL=/tmp/gpu-bench-model
[[ -f $MODEL/config.json ]] || $PY -c "
from pathlib import Path; from tests.engine_fixtures import save_servable_tiny_model
save_servable_tiny_model(Path('$MODEL'), context=2048, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)" || status=1
ENGINES=wombat; $PY -c "import vllm" 2>/dev/null && ENGINES=wombat,vllm
timeout 300 $PY benchmarks/inference.py --gpu --model $MODEL --workloads bcd --engines $ENGINES 2>&1 \
  | tee "$OUT/benchmark.txt" || status=1
}
[[ $PARTS == *rrhf* ]] && {
echo "== RRHF training on the GPU: FSDP2 bf16, checkpoint, resume, peak memory vs the plan"
timeout 240 $PY benchmarks/gpu_check_rrhf.py 2>&1 | tee "$OUT/rrhf.txt" || status=1
}
exit $status
