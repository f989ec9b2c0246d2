#!/usr/bin/env bash
# Every check that needs a GPU, in one run, on a machine that has Python with a CUDA build of torch
# and no network (the lent H200: Python 3.12, torch 2.11+cu130). Each step has its own time limit,
# so a slow one cannot starve the rest; logs, JSON and a summary land in OUT.
#
#   .venv/bin/python scripts/tools/gpu_bundle.py          # here: the wheels, into .gpu-bundle/
#   bash scripts/tools/gpu_checks.sh .gpu-bundle OUT [BUDGET_S]   # there, from the repository root
#
# Steps, most important first: environment; the bundle imports; `sdserve check` on CUDA; the GPU
# benchmark (SD 1.x architecture, 512x512, PNDM 50: plain pipeline vs the service, 8 clients);
# service/tests/test_cuda.py (fp16 + channels_last, seeds across batch sizes, a real OOM, compile);
# the gpu_runtime testinfra checks that apply to a machine whose driver the kit did not install;
# then, if time is left, the benchmark again with torch.compile.
# SDNODE_GPU_DRY_RUN=1 runs the same steps on a CPU with tiny sizes (to test this script).
set -uo pipefail

bundle=${1:?usage: gpu_checks.sh BUNDLE OUT [BUDGET_S]}
out=${2:?usage: gpu_checks.sh BUNDLE OUT [BUDGET_S]}
budget=${3:-540}
python=${PYTHON:-python3}
dry=${SDNODE_GPU_DRY_RUN:-0}
site=${SDNODE_GPU_SITE:-/tmp/sdnode-gpu-site}
work=${SDNODE_GPU_WORK:-/tmp/sdnode-gpu-work}
mkdir -p "$out" "$work"
summary=$out/summary.txt
: >"$summary"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SDSERVE_CACHE_DIR=$work/cache

left() { echo $((budget - SECONDS)); }

# step NAME LIMIT_S CMD...: runs CMD under the smaller of LIMIT_S and the time left, logs to
# OUT/NAME.log, and records the outcome in the summary.
step() {
    local name=$1 limit=$2 rc t0=$SECONDS
    shift 2
    if (($(left) < 20)); then
        echo "$name: not run (budget spent)" | tee -a "$summary"
        return
    fi
    ((limit > $(left) - 10)) && limit=$(($(left) - 10))
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    tail -n 25 "$out/$name.log"
    echo "$name: rc=$rc in $((SECONDS - t0))s" | tee -a "$summary"
}

if [[ $dry == 1 ]]; then
    device=cpu
    bench=(--device cpu --size 64x64 --steps 2 --plain-images 2 --clients 2 --concurrent-images 4)
else
    device=cuda
    bench=()
fi

# The bundle shadows the machine's own packages; torch stays the machine's.
rm -rf "$site"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$bundle"/wheels/*.whl || exit 1
export PYTHONPATH=$site

step environment 60 bash -c "nvidia-smi || true; $python - <<'EOF'
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
EOF"
step imports 120 "$python" -c "import diffusers, transformers, fastapi, sdserve.app, sdserve.engine
print('sdserve', sdserve.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
step sdserve-check 180 bash -c "$python -m sdserve make-tiny-model $work/tiny \
    && $python -m sdserve check --model $work/tiny --device $device --size 512x512 --steps 25 --json"
step bench 330 "$python" scripts/tools/bench_service.py --mode gpu --model "$work/sd15-random" \
    --out "$out/bench-gpu.json" "${bench[@]}"
if [[ $dry == 1 ]]; then
    echo "cuda-tests, testinfra-gpu-runtime: not run (dry run, no CUDA)" | tee -a "$summary"
else
    step cuda-tests 240 "$python" -m pytest -q -p no:cacheprovider -rA service/tests/test_cuda.py
    # The node's venv python, as the gpu_runtime checks expect it: here, the machine's own python.
    mkdir -p /opt/sdserve/current/venv/bin
    printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$python")" >/opt/sdserve/current/venv/bin/python
    chmod 0755 /opt/sdserve/current/venv/bin/python
    printf 'sdnode_accelerator: nvidia\nnvidia_driver_branch: "580"\n' >"$work/node-vars.yml"
    # The driver here is the machine's (not installed by the kit from packages), so only the checks
    # that do not ask the package database apply.
    step testinfra-gpu-runtime 90 "$python" -m pytest -q -p no:cacheprovider -rA tests/node/test_gpu.py \
        --hosts=local:// --node-vars "$work/node-vars.yml" -m gpu_runtime \
        -k "torch_sees_every_gpu or cuda_computes"
fi
step bench-compile 330 "$python" scripts/tools/bench_service.py --mode gpu --model "$work/sd15-random" \
    --compile --plain-images 4 --out "$out/bench-gpu-compile.json" "${bench[@]}"

echo "== summary (${SECONDS}s of ${budget}s)"
cat "$summary"
