#!/usr/bin/env bash
# A short GPU check (run on a CUDA machine from the repo root). Wheels for packages the GPU image lacks
# may be carried in .whl/. Prints timings for training, ground truth and attribution on CUDA.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:.
fi
export TDA_STORE=${TDA_STORE:-/tmp/tda-gpu-store} PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "== train == train_many on CUDA (digits, tolerance test)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_training.py -k "equals_separate or deterministic" 2>&1 | tail -4
echo "== bench_training (16 half-set MNIST models, loop vs batched)"
timeout 150 python3 -m benchmarks.bench_training --task mnist-mlp --models 16 --device cuda
echo "== ground truth, embedded MNIST, M=50"
/usr/bin/time -f "ground truth wall %e s" timeout 150 python3 -m tda_core ground-truth --task mnist-mlp --M 50 --device cuda --json | tail -12
for args in "--method trak --proj dense --ensemble naive --I 1" "--method trak --proj dense --ensemble naive --I 5" \
            "--method trak --proj dense --ensemble dropout --I 2 --D 5" "--method trak --proj kron --ensemble naive --I 10"; do
  echo "== run $args"
  timeout 120 python3 -m tda_core run --task mnist-mlp $args --M 50 --device cuda --json | tail -40
done
} 2>&1 | tee "$log"
