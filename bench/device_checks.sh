#!/usr/bin/env bash
# The GPU checks still open (issues #35 memory, #36 training speed and the decode batch-1 goal), prepared so that a
# lent device spends its minutes measuring. The budget: 15 minutes of device time in all (the machine's start
# included), at most 10 a call; the calls below hold 500 + 180 s of part limits, most valuable first:
#
#   bash bench/device_checks.sh wheels                # here (package index reachable): what the GPU image lacks
#   bash bench/device_checks.sh run decode train      # on the device, carrying .gpu_wheels; call 1 (limits 200 + 300 s)
#   bash bench/device_checks.sh run memory            # call 2, at once (the machine stays warm briefly; limit 180 s)
#   bash bench/device_checks.sh run tests serve prefill   # call 3 only if minutes are left (limits 150 + 300 + 200 s)
#
# Parts (each under its own time limit, so one slow part cannot eat the call):
#   decode  bench.generate --compile at 8 shots, batch 1 (the >= 10x goal)
#   train   bench.gpu --parts train --profile: eager and compiled training step beside OpenFlamingo, kernels per step
#   memory  bench.memory: the goal's rows (peak memory beside OpenFlamingo's: <= 0.4x with int8 weights and 8-bit
#           states; int4 inference weights <= 0.35x fp16), each printed as it ends
#   tests   the CUDA-only tests (compiled training step, tower CUDA graphs, FlexAttention, CUDA-graphed decoding,
#           the server's CUDA-graphed decode steps)
#   serve   bench.serve_steps --compile: the server's decode step eager and CUDA-graphed (`flamingo serve --compile`)
#   prefill bench.serve_prefill: waiting prompts prefilled together vs one at a time (`flamingo serve`'s shared
#           prefill) at 4, 16, 64 prompts
# Results land in $OUT (the device tool's folder; default ./device-out): one log and one JSON per part.
# Smoke run on a CPU: SHAPE=tiny DEVICE=cpu DTYPE=fp32 OUT=/tmp/dc PYTHON=.venv/bin/python bash bench/device_checks.sh run \
#   decode train serve (memory needs minutes per row on a CPU: run bench.memory with fewer rows instead)
set -uo pipefail

cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels  # git-ignored
SHAPE=${SHAPE:-gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
OUT=${OUT:-device-out}
PY=${PYTHON:-python3}

TRANSFORMERS=transformers==5.25.0  # the version the CPU figures and tests use; the server's compiled steps need >= 5.25
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

wheels() {  # the peers (their own deps are the image's) and $TRANSFORMERS with every dependency (numpy: the image's)
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps "${PLATFORM[@]}" -d "$WHEELS" open-flamingo==2.0.1 einops-exts==0.0.4 torchao==0.18.0 \
        && "$PY" -m pip download "${PLATFORM[@]}" -d "$WHEELS" "$TRANSFORMERS" && rm -f "$WHEELS"/numpy-*.whl
    du -sh "$WHEELS"
}

install_wheels() {  # into /tmp/site: the peers, and of $TRANSFORMERS's wheels those the image's packages do not satisfy
    local need
    need=$("$PY" -m pip install -q --dry-run --no-index --find-links "$WHEELS" --report - "$TRANSFORMERS" \
        | "$PY" -c "import json, sys; print(' '.join(i['download_info']['url'].removeprefix('file://') for i in json.load(sys.stdin)['install']))") \
        || { echo "pip could not resolve $TRANSFORMERS from $WHEELS: the image's transformers stays"; need=""; }
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/open_flamingo-*.whl "$WHEELS"/einops_exts-*.whl \
        "$WHEELS"/torchao-*.whl $need
}

part() {  # part NAME LIMIT_S COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "part $name: exit $rc after $((SECONDS - start)) s (limit $limit s); log $OUT/$name.log"
    tail -n 25 "$OUT/$name.log"
}

run() {
    mkdir -p "$OUT"
    if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        install_wheels || exit 1
        export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    { date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; git rev-parse HEAD 2>/dev/null
      "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      "$PY" -c "from flamingo.runtime.compat import STATIC_CACHE_MASK_HOOK as ok; print('compiled server steps:', 'yes' if ok else 'no (transformers < 5.25: the serve part fails)')"
    } | tee "$OUT/versions.txt"
    for name in "$@"; do
        case $name in
            train) part train 300 "$PY" -m bench.gpu --shape "$SHAPE" --device "$DEVICE" --parts train --profile \
                --out "$OUT/gpu-train.json" ;;
            memory) part memory 180 "$PY" -m bench.memory --shape "$SHAPE" --device "$DEVICE" --in-process --demo-model '' \
                --train-rows openflamingo,int8+adamw8bit,int8+adamw8bit+ckpt,int8+adamw8bit+ckpt+inbwd \
                --infer-rows fp16,int8,int4 ;;
            tests) part tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_train_compile_cuda.py tests/test_tower_graphs.py \
                tests/test_xattn_cuda.py tests/test_generation_cuda.py tests/test_serve_compile_cuda.py ;;
            decode) part decode 200 "$PY" -m bench.generate --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
                --shots 8 --batch 1 --compile --repeats 3 ;;
            serve) part serve 300 "$PY" -m bench.serve_steps --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
                --compile --shots 0 8 --rows 1 16 64 --repeats 5 ;;
            prefill) part prefill 200 "$PY" -m bench.serve_prefill --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
                --prompts 4 16 64 --kinds chat 0-shot 8-shot --repeats 3 ;;
            *) echo "unknown part $name (train, memory, tests, decode, serve, prefill)"; exit 2 ;;
        esac
    done
}

case ${1:-} in
    wheels) wheels ;;
    run) shift; run "$@" ;;
    *) sed -n 2,24p "$0"; exit 2 ;;
esac
