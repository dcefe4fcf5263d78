#!/bin/bash
# The device script: install the carried wheels, run every config of $1 (JSON lines) as its own process on
# the one GPU, print their result lines. From the repository root, with .gpu/ carried (pack.py's output):
#   bash bench/shape_sweep/run.sh bench/shape_sweep/configs-1.jsonl
set -u
pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>&1 | grep -v "root user" | tail -2
export PYTHONPATH=/tmp/site:$PWD SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-340} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p "$OUT/logs"
while read -r cfg; do
  [ -z "$cfg" ] && continue
  name=$(python -c "import json,sys; print(json.loads(sys.argv[1])['name'])" "$cfg")
  python .gpu/sweep.py "$cfg" cuda > "$OUT/logs/$name.log" 2>&1 &
done < "$1"
wait
grep -h '^{' "$OUT"/logs/*.log
