#!/usr/bin/env bash
# A short GPU check (run on a CUDA machine from the repo root). Wheels for packages the GPU image lacks
# may be carried in .whl/. Prints timings for training, ground truth and attribution on CUDA.
#   bash scripts/gpu_check.sh [all|mnist|maestro|resnet]     (default all; maestro alone fits about 5 minutes)
# The maestro part writes a synthetic MAESTRO-shaped folder (scripts/make_maestro_like.py), lists it through the
# real loader, trains the paper-size maestro-mt (13.1M parameters) for MAESTRO_EPOCHS epochs (default 4 through
# $TDA_EPOCHS; MAESTRO_EPOCHS= empty runs the recipe's 20) and runs one Kronecker TRAK attribution.
# DEVICE=cpu MAESTRO_EPOCHS=1 MAESTRO_FILES="--train 3 --test 2 --notes 500" tries its commands on a CPU.
# The resnet part trains mnist-resnet9 (paper width, 6.6M parameters) with its recipe (test accuracy, seconds), a
# ground truth of RESNET_M subset models (default 10) and one Kronecker TRAK run with the Dropout Ensemble
# I = 1, D = 5 (LDS, costs). DEVICE=cpu TDA_EPOCHS=1 RESNET_M=2 tries its commands on a CPU.
set -u
part=${1:-all}
device=${DEVICE:-cuda}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:.
fi
export TDA_STORE=${TDA_STORE:-/tmp/tda-gpu-store} PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_check.log
{
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "$part" = all ] || [ "$part" = mnist ]; then
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
fi
if [ "$part" = all ] || [ "$part" = maestro ]; then
data=$(mktemp -d /tmp/maestro-like.XXXX)
epochs=${MAESTRO_EPOCHS-4}
echo "== maestro: synthetic MAESTRO-shaped folder in $data"
/usr/bin/time -f "write wall %e s" timeout 30 python3 scripts/make_maestro_like.py "$data" ${MAESTRO_FILES:-}
echo "== maestro: datasets (real loader, converts the MIDI once into the store)"
/usr/bin/time -f "datasets wall %e s" timeout 60 env TDA_DATA_DIR="$data" python3 -m tda_core datasets --json \
  | python3 -c "import json, sys; print([r for r in json.load(sys.stdin) if r['name'] == 'maestro'])"
echo "== maestro: train maestro-mt (paper size) for ${epochs:-all recipe} epochs on $device"
/usr/bin/time -f "train wall %e s" timeout 120 env TDA_DATA_DIR="$data" TDA_EPOCHS="$epochs" \
  python3 -m tda_core train --task maestro-mt --device "$device" --json
echo "== maestro: attribute, TRAK with the Kronecker projection, 16 test windows"
/usr/bin/time -f "attribute wall %e s" timeout 90 env TDA_DATA_DIR="$data" TDA_EPOCHS="$epochs" \
  python3 -m tda_core attribute --task maestro-mt --method trak --proj kron --n-test 16 --show 2 \
  --device "$device" --json | python3 -c "import json, sys; t = sys.stdin.read().strip(); print(t and {k: v for k, v in json.loads(t).items() if k != 'top'})"
rm -rf "$data"
fi
if [ "$part" = all ] || [ "$part" = resnet ]; then
resnet_m=${RESNET_M:-10}
echo "== resnet: train mnist-resnet9 (paper width) with its recipe on $device"
/usr/bin/time -f "train wall %e s" timeout 240 python3 -m tda_core train --task mnist-resnet9 --seeds 0 \
  --device "$device" --json
echo "== resnet: ground truth, M=$resnet_m"
/usr/bin/time -f "ground truth wall %e s" timeout 240 python3 -m tda_core ground-truth --task mnist-resnet9 \
  --M "$resnet_m" --device "$device" --json | tail -12
echo "== resnet: run, TRAK with the Kronecker projection, Dropout Ensemble I = 1, D = 5"
/usr/bin/time -f "run wall %e s" timeout 240 python3 -m tda_core run --task mnist-resnet9 --method trak --proj kron \
  --ensemble dropout --I 1 --D 5 --M "$resnet_m" --device "$device" --json | tail -40
fi
} 2>&1 | tee "$log"
