#!/usr/bin/env bash
# How each default was chosen: on the VALIDATION split of embedded MNIST (100 test examples), never on the 400
# examples the README reports. Each line of docs/defaults_validation.jsonl is one paired comparison
# (default = setting A); the README's "Defaults" paragraph quotes them.
# Run from the repository root: bash scripts/defaults_on_validation.sh   (about 10 minutes on 2 CPU cores)
set -euo pipefail
out=docs/defaults_validation.jsonl
common=(--task mnist-mlp --M 50 --runs 2 --split validation --device cpu --json)
: > "$out"
python -m tda_core compare "${common[@]}" "kind=dropout,I=1,D=5" "kind=dropout,I=1,D=5,masks=fresh" >> "$out"
python -m tda_core compare "${common[@]}" "kind=dropout-forward,I=2,D=5" \
  "kind=dropout-forward,I=2,D=5,forward_grad=mask-mean" >> "$out"
python -m tda_core compare "${common[@]}" "kind=lora,I=1,L=5" "kind=lora,I=1,L=5,lora_grad=adapter" >> "$out"
python -m tda_core compare "${common[@]}" "kind=naive,I=2" "kind=naive,I=2,proj=dense" >> "$out"
python -m tda_core compare "${common[@]}" "kind=naive,I=1,proj=dense" "kind=naive,I=1,proj=dense,proj_dtype=float32" \
  >> "$out"
echo "wrote $out"
