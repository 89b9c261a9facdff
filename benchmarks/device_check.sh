#!/usr/bin/env bash
# The prepared GPU check, for a session that is lent a device machine (one CUDA GPU):
#   bash benchmarks/device_check.sh          # ~6 min on one H200; writes logs and tables to $OUT
# It exercises the CUDA paths CI cannot: the CUDA tests, `dtprobe train` and `dtprobe analyze`
# on cuda (with downstream datasets), an ImageFolder analysed through the uint8 image store on
# cuda against the same analysis on the CPU, and the GPU benchmark rows (BENCHMARKS.md,
# "GPU rows"). DEVICE=cpu runs the same steps on the CPU (a dry run of the script itself: the
# CUDA tests only collected, the GPU rows' code on tiny CPU sizes by `gpu_rows --quick`, no
# GPU number; on a shared CPU, TIMEOUT_SCALE=4 lengthens every step's limit). Uses the machine's
# own python3 (torch, pandas, scikit-learn, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-/tmp/dtprobe-device}"
WORK="$(mktemp -d /tmp/dtprobe-check-XXXXXX)"
export DTPROBE_IMAGE_STORE="$WORK/stores"
mkdir -p "$OUT"
status=0
SCALE="${TIMEOUT_SCALE:-1}"  # a busy or slow machine (e.g. a shared CPU dry run): longer limits
step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.log, remember failures
    local name=$1 limit=$(($2 * SCALE)) rc=0
    shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    if [ "$rc" = 124 ]; then
        echo "FAILED: $name (timed out after ${limit}s; TIMEOUT_SCALE=N gives N times longer)"
        status=1
    elif [ "$rc" != 0 ]; then
        echo "FAILED: $name (exit $rc; see $OUT/$name.log)"
        status=1
    fi
    tail -n 4 "$OUT/$name.log"
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$OUT/env.log"

if [ "$DEVICE" = cuda ]; then
    step cuda_tests 240 python3 -m pytest -q -p no:cacheprovider -k cuda \
        tests/test_extract.py tests/test_probes.py
else  # the dry run: the CUDA tests still import and are collected (a stale import fails here)
    step cuda_tests_collect 120 python3 -m pytest -q -p no:cacheprovider --collect-only -k cuda \
        tests/test_extract.py tests/test_probes.py
fi
SIZES=()  # the CPU dry run trains on a small shapes set
PROBE=()  # ... and fits the 9-value probe (the 45-value sweep per layer is minutes on a CPU)
[ "$DEVICE" = cpu ] && SIZES=(--dataset-param n_train=600 --dataset-param n_test=300) \
    && PROBE=(--probe-protocol short)
step train 180 python3 -m dtprobe train --device "$DEVICE" --epochs 4 --save-every 2 \
    --out "$WORK/run" --no-progress "${SIZES[@]}"
step analyze 240 python3 -m dtprobe analyze "$WORK/run" --device "$DEVICE" --no-progress \
    --downstream digits textures --layers auto "${PROBE[@]}"
cp "$WORK/run/analysis/metrics.csv" "$OUT/metrics.csv" 2>/dev/null

# The image-store path on the device: the same ImageFolder run analysed on $DEVICE and on the CPU.
step image_store 300 python3 - "$WORK" "$DEVICE" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

from dtprobe import analysis
from dtprobe.training.trainer import TrainConfig, train
from tests.helpers import make_folder

work, device = Path(sys.argv[1]), sys.argv[2]
data = make_folder(work / "folder", per_class=500 if device != "cpu" else 60, size=72)
run = work / "frun"
train(TrainConfig(out=str(run), dataset="imagefolder",
                  dataset_params={"root": str(data), "image_size": 64}, arch="small_cnn",
                  epochs=2, batch_size=128, save_every=1, seed=0, device=device,
                  progress=False))
metrics = ["source_accuracy", "class_separation", "probe_accuracy", "linear_cka", "rankme"]
tables = {}
for dev in (device, "cpu"):
    res = analysis.analyze(run, metrics=metrics, device=dev, progress=False, plot=False,
                           use_cache=False, memory_budget="2G")
    tables[dev] = res.table.drop(columns="run").reset_index(drop=True)
diff = (tables[device]["value"] - tables["cpu"]["value"]).abs()
print(f"rows {len(diff)}; max |{device} - cpu| = {diff.max():.3g}")
print(pd.concat([tables["cpu"][["epoch", "metric", "task"]], diff.rename("absdiff")],
                axis=1).sort_values("absdiff").tail(5).to_string())
assert diff.max() < 0.05, "device and CPU analyses disagree"
EOF

if [ "$DEVICE" = cuda ]; then
    step gpu_rows 330 python3 -m benchmarks.gpu_rows --json "$OUT/gpu_rows.json"
else  # the dry run: the GPU rows' code on tiny CPU sizes (a smoke test, no measurement)
    step gpu_rows_quick 180 python3 -m benchmarks.gpu_rows --quick
fi
rm -rf "$WORK"
echo "device check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
