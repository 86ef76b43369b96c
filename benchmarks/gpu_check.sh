#!/usr/bin/env bash
# One prepared GPU check: `bash benchmarks/gpu_check.sh` on a machine with one GPU, about 6-8 minutes.
#
#   1. the CUDA test subset (pytest -m cuda tests/test_cuda.py, Triton compiled: TRITON_INTERPRET=0):
#      Triton attention and InfoNCE against their references in bf16 and fp16, one bf16 step per method,
#      FSDP2 over NCCL and DeepSpeed bf16 at world size 1, DALI's nvJPEG decode;
#   2. pretrain bench for MAE ViT-L/16 and DiT-XL/2, synthetic data and shard data (does the data path
#      keep up?), on shards this script writes (photo-like JPEGs; latents from a random-init VAE);
#   3. the attention and InfoNCE benchmarks; 4. the data-path benchmark (DALI on the GPU included).
#
# Every step has its own time limit inside an overall budget (GPU_CHECK_BUDGET seconds, default 470), a
# failing step does not stop the others, and a table at the end says what passed, failed, timed out or
# was skipped and why. JSONs go to benchmarks/results/ (gpu_check/ for this script's bench runs), logs to
# benchmarks/results/gpu_check/logs/. Without a GPU the CUDA tests run and skip (naming why), and every
# other CUDA step is listed as skipped.
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BUDGET=${GPU_CHECK_BUDGET:-470}
OUT=benchmarks/results/gpu_check
LOGS=$OUT/logs
DATA=${GPU_CHECK_DATA:-$(mktemp -d -t gpu_check_data.XXXXXX)}
mkdir -p "$LOGS"
START=$(date +%s)
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo "none")
ROWS=()
FAILED=0

# step NAME LIMIT_S NEEDS_GPU(0|1) COMMAND...: run COMMAND under a timeout, log it, record a table row
step() {
    local name=$1 limit=$2 needs_gpu=$3
    shift 3
    local log="$LOGS/$name.log" left=$((BUDGET - ($(date +%s) - START)))
    if [ "$needs_gpu" = 1 ] && [ "$HAS_GPU" != 1 ]; then
        ROWS+=("$name|skipped|0|no CUDA device")
        return
    fi
    if [ "$left" -lt 15 ]; then
        ROWS+=("$name|skipped|0|time budget spent (${BUDGET}s)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local began=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local took=$(($(date +%s) - began)) status note
    note=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-150 | tr '|' '/')
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT"; FAILED=1; note="after ${limit}s; see $log" ;;
        *) status="FAILED (rc $rc)"; FAILED=1 ;;
    esac
    [ "$rc" != 0 ] && tail -n 20 "$log" | sed 's/^/    /'
    ROWS+=("$name|$status|$took|$note")
}

echo "gpu_check: GPU: $GPU_NAME; budget ${BUDGET}s; data in $DATA"

# 1. the CUDA tests (they also run on CPU, where each one skips and says why)
step cuda_tests 200 0 env TRITON_INTERPRET=0 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py

# 2. shards, then pretrain bench with synthetic and with shard data
step write_shards 90 1 "$PY" benchmarks/gpu_check_data.py "$DATA" --num 512 --device cuda
BENCH=(-m pretrain.cli bench --steps 10 --warmup 3)
step bench_mae_vit_l16_synthetic 75 1 "$PY" "${BENCH[@]}" configs/mae_vit_b16.toml --synthetic-data \
    --set model.size=large --out "$OUT/mae_vit_l16"
step bench_mae_vit_l16_shards 90 1 "$PY" "${BENCH[@]}" configs/mae_vit_b16.toml --set model.size=large \
    --set "data.shards=$DATA/images" --set data.num_workers=12 --out "$OUT/mae_vit_l16"
step bench_dit_xl2_synthetic 75 1 "$PY" "${BENCH[@]}" configs/dit_xl2.toml --synthetic-data \
    --set method.dit.latent_scale=0.18215 --out "$OUT/dit_xl2"
step bench_dit_xl2_shards 90 1 "$PY" "${BENCH[@]}" configs/dit_xl2.toml --set "data.shards=$DATA/latents" \
    --out "$OUT/dit_xl2"

# 3. kernels; 4. the data path (per-core rates, DALI on the GPU)
step attention_benchmark 60 1 "$PY" benchmarks/attention.py --device cuda --repeats 5
step infonce_benchmark 60 1 "$PY" benchmarks/infonce.py --device cuda --sizes 4096,16384,65536 --repeats 5
step data_throughput 90 1 "$PY" benchmarks/data_throughput.py --num 128 --repeats 1 --skip-storage

[ -z "${GPU_CHECK_DATA:-}" ] && rm -rf "$DATA"
echo
echo "gpu_check summary (GPU: $GPU_NAME, $(($(date +%s) - START))s in all; logs in $LOGS)"
printf '%-30s %-16s %6s  %s\n' step status seconds "last line of output / reason"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name status took note <<<"$row"
    printf '%-30s %-16s %6s  %s\n' "$name" "$status" "$took" "$note"
done
if [ -f "$LOGS/cuda_tests.log" ] && grep -q '^SKIPPED' "$LOGS/cuda_tests.log"; then
    echo "CUDA tests skipped, and why:"
    grep '^SKIPPED' "$LOGS/cuda_tests.log" | sed 's/^/    /'
fi
ls "$OUT"/*/*.json benchmarks/results/attention_cuda.json benchmarks/results/infonce_cuda.json \
    benchmarks/results/data_throughput_cuda.json 2>/dev/null | sed 's/^/result: /'
exit $FAILED
