#!/usr/bin/env bash
# The GPU checks still open (issues #35 memory, #36 training speed and the decode batch-1 goal), prepared so that a
# lent device spends its minutes measuring. The budget: 15 minutes of device time in all (the machine's start
# included), at most 600 s a command. Each part runs under its own limit, stopped by SIGINT and killed 20 s later if
# it ignores that (so a part may end at its limit + 20 s); `run` also shortens a part's limit to what is left of
# $CALL_LIMIT (default 580 s, counted from the call's start, the install included) and skips a part that would get
# under 30 s, so a call always returns before the device tool's 600 s. Most valuable first:
#
#   bash bench/device_checks.sh wheels     # here (package index reachable): what the GPU image lacks, in .gpu_wheels
#   bash bench/device_checks.sh commit     # here: the commit into .device_commit (the device copy has no .git)
#   bash bench/device_checks.sh run decode train          # device call 1, carrying .gpu_wheels (limits 200 + 300 s)
#   bash bench/device_checks.sh run memory                # call 2, at once (the machine stays warm briefly; 180 s)
#   bash bench/device_checks.sh run tests serve prefill   # call 3 only if minutes are left (limits 200 + 170 + 120 s)
# Each call's limits with their 20 s overruns (call 1: 540 s, call 3: 550 s) and the install fit one command.
#
# Parts (what each leaves in $OUT, the device tool's folder, default ./device-out: NAME.log with the part's output;
# its JSON lines, `{"bench": ...}` one per measured row, also in NAME.jsonl, written even when the limit cut it):
#   decode  bench.generate --compile at 8 shots, batch 1 (the >= 10x goal): a `generate.partial` line with ours'
#           figures as soon as they are timed, then the `generate` row with the peer's and the bare LM's
#   train   bench.gpu --parts train --profile: eager and compiled training step beside OpenFlamingo, kernels per step;
#           a `gpu.train.partial` line (and gpu-train.json) after each variant but the last (peer, eager, compiled;
#           then tower-graphed), the `gpu.train` row when all ran; bf16 on CUDA whatever $DTYPE says
#   memory  bench.memory: the goal's rows (peak memory beside OpenFlamingo's: <= 0.4x with int8 weights and 8-bit
#           states; int4 inference weights <= 0.35x fp16; the fp32 row gives the others' logit-MAD quality column), a
#           `memory.row` line each as it ends; bf16 autocast on CUDA whatever $DTYPE says
#   tests   the CUDA-only tests, newest and least proven first (the server's CUDA-graphed decode steps, CUDA-graphed
#           decoding, FlexAttention, tower CUDA graphs, the compiled training step); a file that cannot be collected
#           does not stop the others; pytest's text only (-rA: every test's outcome, --durations=0: every time)
#   serve   bench.serve_steps --compile: the server's decode step eager and CUDA-graphed (`flamingo serve --compile`),
#           a `serve_steps.prefill` / `serve_steps.decode` line per row as it ends
#   prefill bench.serve_prefill: waiting prompts prefilled together vs one at a time (`flamingo serve`'s shared
#           prefill) at 4, 16, 64 prompts, a line per row as it ends
# versions.txt: date, GPU, commit (`git rev-parse HEAD`, or without .git the content of .device_commit: it must stay
# neither tracked nor git-ignored, so that it travels with the working tree), torch and transformers, and whether the
# server's compiled steps can run (transformers >= 5.25).
# Smoke run on a CPU: SHAPE=tiny DEVICE=cpu DTYPE=fp32 OUT=/tmp/dc PYTHON=.venv/bin/python bash bench/device_checks.sh run \
#   decode train serve (memory needs minutes per row on a CPU: run bench.memory with fewer rows instead)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=${WHEELS:-.gpu_wheels}  # git-ignored
SHAPE=${SHAPE:-gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
OUT=${OUT:-device-out}
PY=${PYTHON:-python3}
CALL_LIMIT=${CALL_LIMIT:-580}  # seconds one `run` may take in all (the device tool stops a command at 600 s)
KILL_AFTER=20  # seconds a part may ignore SIGINT before it is killed

# What the image may lack, each at the version the CPU figures and tests use: transformers (the server's compiled steps
# need >= 5.25) with its dependencies, and the serving stack that the `serve`/`prefill` parts and the server's tests
# import. `wheels` downloads them with their dependencies; `run` installs only those the image does not satisfy.
REQUIREMENTS=(transformers==5.25.0 fastapi==0.165.0 uvicorn==0.55.0 httpx==0.29.0)
PEERS=(open-flamingo==2.0.1 einops-exts==0.0.4 torchao==0.18.0)  # installed without dependencies (the image's)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)

wheels() {  # the peers (their own deps are the image's) and $REQUIREMENTS with every dependency (numpy: the image's)
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps "${PLATFORM[@]}" -d "$WHEELS" "${PEERS[@]}" \
        && "$PY" -m pip download "${PLATFORM[@]}" -d "$WHEELS" "${REQUIREMENTS[@]}" && rm -f "$WHEELS"/numpy-*.whl
    du -sh "$WHEELS"
}

install_wheels() {  # into /tmp/site: the peers, and of $REQUIREMENTS's wheels those the image's packages do not satisfy
    local need
    need=$("$PY" -m pip install -q --dry-run --no-index --find-links "$WHEELS" --report - "${REQUIREMENTS[@]}" \
        | "$PY" -c "import json, sys; print(' '.join(i['download_info']['url'].removeprefix('file://') for i in json.load(sys.stdin)['install']))") \
        || { echo "pip could not resolve ${REQUIREMENTS[*]} from $WHEELS: the image's packages stay"; need=""; }
    echo "installing into /tmp/site: the peers${need:+ and $(for w in $need; do basename "$w"; done | tr '\n' ' ')}"
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/open_flamingo-*.whl "$WHEELS"/einops_exts-*.whl \
        "$WHEELS"/torchao-*.whl $need
}

commit_id() {  # the commit the working tree is at: git's, or (a copy without .git) the one `commit` wrote here
    git rev-parse HEAD 2>/dev/null || cat .device_commit 2>/dev/null || echo "commit unknown (no .git, no .device_commit)"
}

commit() {  # here, before a device call: the commit (and whether tracked files differ from it) into .device_commit
    local head
    head=$(git rev-parse HEAD) || exit 1
    if git diff --quiet HEAD --; then echo "$head" >.device_commit
    else echo "$head + uncommitted changes to tracked files" >.device_commit; fi
    cat .device_commit
}

part() {  # part NAME LIMIT_S COMMAND...: run with a limit (cut to what $CALL_LIMIT leaves), log to $OUT/NAME.log,
          # its JSON lines to $OUT/NAME.jsonl, say how it ended
    local name=$1 limit=$2
    shift 2
    local left=$((CALL_LIMIT - SECONDS - KILL_AFTER))
    if [ "$left" -lt 30 ]; then
        echo "part $name: skipped, $((CALL_LIMIT - SECONDS)) s left of this call's $CALL_LIMIT s"
        return
    fi
    [ "$left" -lt "$limit" ] && { echo "part $name: limit $limit s cut to $left s (this call's $CALL_LIMIT s)"; limit=$left; }
    local start=$SECONDS
    timeout --signal=INT --kill-after=$KILL_AFTER "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "part $name: exit $rc after $((SECONDS - start)) s (limit $limit s); log $OUT/$name.log"
    if grep -q '^{"bench"' "$OUT/$name.log"; then
        grep '^{"bench"' "$OUT/$name.log" >"$OUT/$name.jsonl"
        echo "  $(wc -l <"$OUT/$name.jsonl") JSON lines in $OUT/$name.jsonl"
    fi
    tail -n 25 "$OUT/$name.log"
}

run() {
    SECONDS=0
    mkdir -p "$OUT"
    if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        install_wheels || exit 1
        export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    { date -u; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; echo "commit $(commit_id)"
      "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      "$PY" -c "from flamingo.runtime.compat import STATIC_CACHE_MASK_HOOK as ok; print('compiled server steps:', 'yes' if ok else 'no (transformers < 5.25: the serve part fails)')"
    } | tee "$OUT/versions.txt"
    for name in "$@"; do
        case $name in
            train) part train 300 "$PY" -m bench.gpu --shape "$SHAPE" --device "$DEVICE" --parts train --profile \
                --out "$OUT/gpu-train.json" ;;
            memory) part memory 180 "$PY" -m bench.memory --shape "$SHAPE" --device "$DEVICE" --in-process --demo-model '' \
                --train-rows openflamingo,int8+adamw8bit,int8+adamw8bit+ckpt,int8+adamw8bit+ckpt+inbwd \
                --infer-rows fp32,fp16,int8,int4 ;;
            tests) part tests 200 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors --durations=0 -rA \
                tests/test_serve_compile_cuda.py tests/test_generation_cuda.py tests/test_xattn_cuda.py \
                tests/test_tower_graphs.py tests/test_train_compile_cuda.py ;;
            decode) part decode 200 "$PY" -m bench.generate --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
                --shots 8 --batch 1 --compile --repeats 3 ;;
            serve) part serve 170 "$PY" -m bench.serve_steps --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
                --compile --shots 0 8 --rows 1 16 64 --repeats 5 ;;
            prefill) part prefill 120 "$PY" -m bench.serve_prefill --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
                --prompts 4 16 64 --kinds chat 0-shot 8-shot --repeats 3 ;;
            *) echo "unknown part $name (train, memory, tests, decode, serve, prefill)"; exit 2 ;;
        esac
    done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run as a script (tests source it for its functions)
    case ${1:-} in
        wheels) wheels ;;
        commit) commit ;;
        run) shift; run "$@" ;;
        *) sed -n 2,37p "$0"; exit 2 ;;
    esac
fi
