#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one go (CI has none; run this wherever one is):
#   1. gsplat's CUDA extension built (JIT, first use) and its build time;
#   2. the gpu-marked tests (cpu backend against gsplat's CUDA kernels, resume on CUDA);
#   3. the README's skull command trained on CUDA (seconds per step, test PSNR);
#   4. bench/backends.py: that run's test views rendered by the cpu backend and by gsplat;
#   5. bench/raster.py: cpu backend against gsplat in the same run;
#   6. test files with every test allowed the GPU (SPLATFORGE_TEST_DEVICE=auto: device "auto"
#      means CUDA; $SUITE, default the training, MCMC, metrics, raster, depth, blocks and
#      distributed files; SUITE= skips it): per-test lines in suite.log, each failure's text in
#      suite_failures.log as it happens (SPLATFORGE_FAILURES_LOG), in parallel with pytest-xdist.
# Usage: scripts/gpu_check.sh OUT_DIR [DATASETS_DIR]
# DATASETS_DIR defaults to ../shared/datasets (needs skull/ and garden/). Each part has its own
# time limit, writes its log to OUT_DIR and the summary lines go to OUT_DIR/summary.txt.
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [DATASETS_DIR]}
data=${2:-$(cd "$(dirname "$0")/.." && pwd)/../shared/datasets}
mkdir -p "$out"
export SPLATFORGE_DATASETS=$data PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
py=${PYTHON:-python3}
summary=$out/summary.txt
note() { echo "$*" | tee -a "$summary"; }

note "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
note "torch $($py -c 'import torch; print(torch.__version__, torch.version.cuda)'), nvcc $(nvcc --version | tail -1)"

t0=$(date +%s)
timeout 360 $py -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat built nothing'" \
    > "$out/gsplat_build.log" 2>&1
note "gsplat build: rc=$? in $(($(date +%s) - t0)) s (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"

t0=$(date +%s)
timeout 180 $py -m pytest -m gpu -v -p no:cacheprovider tests > "$out/gpu_tests.log" 2>&1
note "gpu tests: rc=$? in $(($(date +%s) - t0)) s: $(tail -1 "$out/gpu_tests.log")"

t0=$(date +%s)
run=$(mktemp -d)/skull
timeout 150 $py -m splatforge.cli train "$data/skull" --data-factor 8 --steps 3000 --output "$run" \
    > "$out/train_skull.log" 2>&1
note "train skull (README command, cuda): rc=$? in $(($(date +%s) - t0)) s"
if [ -f "$run/metrics.json" ]; then
    cp "$run/metrics.json" "$out/train_skull_metrics.json"
    $py - "$run/metrics.json" <<'EOF' | tee -a "$summary"
import json, sys
m = json.load(open(sys.argv[1]))
t = m["test"]
print(f"  {m['step']} steps, {m['num_gaussians']} Gaussians, {m['train_seconds']:.1f} s of steps "
      f"({m['train_seconds'] / m['step']:.4f} s/step), test PSNR {t['psnr']:.2f} dB, SSIM {t['ssim']:.3f}")
EOF
    timeout 90 $py bench/backends.py "$run" --out "$out/backends.json" 2>&1 | tail -n 8 | tee -a "$summary"
fi

t0=$(date +%s)
timeout 150 $py bench/raster.py --no-reference --repeats 3 --data "$data/garden/test_garden.npz" \
    --out "$out/raster.json" > "$out/raster.log" 2>&1
note "bench/raster.py: rc=$? in $(($(date +%s) - t0)) s"
tail -n 25 "$out/raster.log"

suite=${SUITE-tests/test_train.py tests/test_mcmc.py tests/test_metrics.py tests/test_raster_cases.py tests/test_raster_parity.py tests/test_depth.py tests/test_blocks.py tests/test_distributed.py}
if [ -n "$suite" ]; then
    xdist=$($py -c "import xdist" 2>/dev/null && echo "-n $(( $(nproc) < 12 ? $(nproc) : 12 ))")
    t0=$(date +%s)
    # shellcheck disable=SC2086  # the file list and the xdist option are words on purpose
    SPLATFORGE_TEST_DEVICE=auto SPLATFORGE_FAILURES_LOG=$out/suite_failures.log timeout "${SUITE_TIMEOUT:-900}" $py -m pytest $xdist -v \
        --tb=short -p no:cacheprovider $suite > "$out/suite.log" 2>&1
    note "suite on the GPU machine: rc=$? in $(($(date +%s) - t0)) s: $(grep -c ' PASSED' "$out/suite.log") passed, $(grep -c ' FAILED' "$out/suite.log") failed"
fi
