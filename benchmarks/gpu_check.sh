#!/usr/bin/env bash
# The GPU checks of this round, run in one go on a lent CUDA machine (the device
# tool): the gpu-marked tests, then the GPU benchmarks. Writes to $OUT (or
# ./gpu_out). array_api_compat travels as a wheel in .whl/ (not on that image).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/env.txt"
python3 -c "import torch, jax; print('torch', torch.__version__, torch.cuda.is_available(), 'jax', jax.__version__, jax.devices())" | tee -a "$out/env.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/test_gpu.py tests/test_torch_layer.py tests/test_profiling.py \
  tests/backends/test_jax_solve.py tests/backends/test_torch_sensealg.py \
  2>&1 | tee "$out/pytest.log"
timeout 120 python3 benchmarks/ensemble_torch_gpu.py --sizes 1000 10000 100000 \
  --out "$out/ensemble_torch_gpu.md" 2>&1 | tail -30
timeout 100 python3 benchmarks/ensemble.py --sizes 1000 10000 100000 --scipy-sizes \
  --repeat 5 --out "$out/ensemble_jax_gpu.md" 2>&1 | tail -30
timeout 300 python3 benchmarks/torch_engine_gpu.py 2>&1 | tee "$out/torch_engine_gpu.md"
