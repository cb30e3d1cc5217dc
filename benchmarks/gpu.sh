#!/usr/bin/env bash
# GPU measurements of m2chat-lite in one run, for a lent CUDA machine; prints one markdown table at the end,
# ready for benchmarks/RESULTS.md.
#
#     bash benchmarks/gpu.sh [RESULTS_DIR]        # from the repository root (or anywhere: it cds there)
#
# 1. names the card (nvidia-smi) and the versions;
# 2. python benchmarks/speed.py --device cuda --system all: the tiny system's steps/s, latencies and peak
#    memory, then the hf-small preset's real architectures with random weights (benchmarks/hf_shapes.py):
#    stage 1 / stage 2 steps/s at batch $HF_BATCH, activations, peak GPU memory, 256 px pictures, a reply;
# 3. executes notebooks with device="cuda" via papermill, timing each (04, 07, 09, and 11 on its offline
#    stand-ins: the hf-small code path on the GPU); the executed copies go to a temporary folder (the committed
#    notebooks are never touched).
#
# Every step has a time limit (`timeout`), and all of them share one budget (BUDGET seconds, default 540, so
# the whole run fits a 10-minute call); a step that fails or runs out of time is marked in the table, the
# others still run, and the exit code is 1 if anything failed. RESULTS_DIR, if given, receives table.md,
# speed.log, notebooks.log and the executed notebooks.
#
# Settings (environment): PYTHON (python3), BUDGET (540), SPEED_TIMEOUT (300; 0 skips step 2), NOTEBOOK_TIMEOUT (150, each),
# HF_BATCH (4), SPEED_STEPS (5), NOTEBOOKS (names, each with optional ":name=value,..." parameters besides
# device; default "04_diffusion 07_m3ft_stage1_alignment 09_interleaved_chat 11_scaling_up:checkpoints=stand-ins"),
# SPEED_EXTRA (more arguments for speed.py), and, to rehearse the script on a CPU, DEVICE (cuda) and SYSTEM
# (all), e.g. DEVICE=cpu SYSTEM=hf-shapes HF_BATCH=1 SPEED_STEPS=1 SPEED_EXTRA="--hf-gen-steps 2".
# Needs: the package's dependencies (torch with CUDA, transformers, diffusers, peft, accelerate, ipywidgets,
# ...) and papermill with an ipykernel "python3" kernel. The package itself need not be installed: the
# repository is put on PYTHONPATH.

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
SPEED_TIMEOUT=${SPEED_TIMEOUT:-300}
NOTEBOOK_TIMEOUT=${NOTEBOOK_TIMEOUT:-150}
HF_BATCH=${HF_BATCH:-4}
SPEED_STEPS=${SPEED_STEPS:-5}
NOTEBOOKS=${NOTEBOOKS:-"04_diffusion 07_m3ft_stage1_alignment 09_interleaved_chat 11_scaling_up:checkpoints=stand-ins"}
SPEED_EXTRA=${SPEED_EXTRA:-}
DEVICE=${DEVICE:-cuda}
SYSTEM=${SYSTEM:-all}
RESULTS_DIR=${1:-}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

WORK=$(mktemp -d "${TMPDIR:-/tmp}/m2chat_gpu.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
FAILED=0
ROWS=()  # "| what | result |" lines of the final table

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# seconds a step may take: its own limit, or what is left of the budget (0: skip it)
allowance() {
    local left=$((BUDGET - ($(date +%s) - START) - 10))
    if ((left < 30)); then echo 0; elif ((left < $1)); then echo "$left"; else echo "$1"; fi
}
row() { ROWS+=("| $1 | $2 |"); }
fail() { FAILED=1; row "$1" "**FAILED**: $2"; }
why() {  # what a failed command's exit code means
    case $1 in
        124 | 137) echo "out of time (limit $2 s)" ;;
        *) echo "exit code $1" ;;
    esac
}

echo "== m2chat-lite GPU measurements in $ROOT ($(date -u +%Y-%m-%dT%H:%MZ))"

# 1. the card and the versions ------------------------------------------------------------------------------
CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
if [[ -z $CARD ]]; then
    CARD="no GPU seen by nvidia-smi"
    fail "nvidia-smi" "no GPU listed"
fi
echo "card: $CARD"
VERSIONS=$("$PYTHON" - <<'EOF' 2>&1
import importlib
import torch
parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}", f"cuda available: {torch.cuda.is_available()}"]
for name in ("transformers", "diffusers", "peft", "papermill", "ipykernel", "ipywidgets"):
    try:
        parts.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception:
        parts.append(f"{name} MISSING")
print(" · ".join(parts))
EOF
)
echo "versions: $VERSIONS"
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown")
[[ $(git -C "$ROOT" status --porcelain 2>/dev/null | head -c 1) ]] && COMMIT="$COMMIT (with local changes)"

# 2. speed.py: tiny and hf-shapes -------------------------------------------------------------------------
SPEED="speed.py --device $DEVICE --system $SYSTEM --steps $SPEED_STEPS --hf-batch $HF_BATCH${SPEED_EXTRA:+ $SPEED_EXTRA}"
limit=$(allowance "$SPEED_TIMEOUT")
if ((SPEED_TIMEOUT == 0)); then
    row "$SPEED" "not run (SPEED_TIMEOUT=0)"
elif ((limit == 0)); then
    fail "$SPEED" "skipped: no time left in the budget"
else
    echo "== $SPEED (limit $limit s)"
    t=$(now)
    # shellcheck disable=SC2086  # SPEED_EXTRA is a list of arguments
    timeout --kill-after=10 "$limit" "$PYTHON" benchmarks/speed.py --device "$DEVICE" --system "$SYSTEM" \
        --steps "$SPEED_STEPS" --hf-batch "$HF_BATCH" --hf-dir "$WORK/hf_shapes" $SPEED_EXTRA \
        >"$WORK/speed.out" 2>"$WORK/speed.err"
    rc=$?
    seconds=$(elapsed "$t")
    cat "$WORK/speed.out"
    grep -v "requires torchvision\|should be kept in float32" "$WORK/speed.err" | tail -n 20 >&2
    # the table rows speed.py printed (it prints its table only at the end: none if it was stopped early)
    while IFS= read -r line; do
        [[ $line == "| what | time |" || $line == "|---|---|" ]] && continue
        ROWS+=("$line")
    done < <(grep '^| ' "$WORK/speed.out")
    if ((rc == 0)); then
        row "\`$SPEED\`, the whole run" "$seconds s"
    else
        fail "\`$SPEED\`, the whole run ($seconds s)" "$(why "$rc" "$limit") (see speed.log)"
    fi
fi

# 3. notebooks with device="cuda" ---------------------------------------------------------------------------
mkdir -p "$WORK/notebooks"
for entry in $NOTEBOOKS; do
    name=${entry%%:*}
    params=(-p device "$DEVICE")
    shown="device=\"$DEVICE\""
    if [[ $entry == *:* ]]; then
        IFS=, read -r -a pairs <<<"${entry#*:}"
        for pair in "${pairs[@]}"; do
            params+=(-p "${pair%%=*}" "${pair#*=}")
            shown="$shown, ${pair%%=*}=${pair#*=}"
        done
    fi
    source="notebooks/$name.ipynb"
    what="notebook \`$name\` (papermill, $shown, default parameters otherwise)"
    if [[ ! -f $source ]]; then
        fail "$what" "no $source"
        continue
    fi
    limit=$(allowance "$NOTEBOOK_TIMEOUT")
    if ((limit == 0)); then
        fail "$what" "skipped: no time left in the budget"
        continue
    fi
    echo "== $source with $shown (limit $limit s)"
    t=$(now)
    timeout --kill-after=10 "$limit" "$PYTHON" -m papermill "$source" "$WORK/notebooks/$name.ipynb" \
        "${params[@]}" -k python3 --cwd notebooks --no-progress-bar --execution-timeout "$limit" \
        >>"$WORK/notebooks.log" 2>&1
    rc=$?
    seconds=$(elapsed "$t")
    if ((rc == 0)); then
        echo "ok $name: $seconds s"
        row "$what" "$seconds s (kernel start included)"
    else
        echo "FAILED $name after $seconds s: $(why "$rc" "$limit")"
        tail -n 15 "$WORK/notebooks.log" >&2
        fail "$what" "$(why "$rc" "$limit") after $seconds s (see notebooks.log)"
    fi
done

# the table -----------------------------------------------------------------------------------------------
TOTAL=$(($(date +%s) - START))
{
    echo
    echo "### GPU run: $CARD"
    echo
    echo "\`bash benchmarks/gpu.sh\`, $(date -u +%Y-%m-%d), commit $COMMIT; $VERSIONS; $TOTAL s in all."
    echo "hf-shapes rows: the hf-small preset's architectures with random weights (only speed and memory mean"
    if [[ $DEVICE == cuda* ]]; then
        echo "anything); peaks are torch.cuda.max_memory_allocated since each measurement began."
    else
        echo "anything). A REHEARSAL with device=$DEVICE: peaks are the process's resident set so far."
    fi
    echo
    echo "| what | result |"
    echo "|---|---|"
    printf '%s\n' "${ROWS[@]}"
    echo
    if ((FAILED)); then echo "Some steps FAILED (marked above)."; fi
} | tee "$WORK/table.md"

if [[ -n $RESULTS_DIR ]]; then
    mkdir -p "$RESULTS_DIR"
    cp "$WORK/table.md" "$RESULTS_DIR/table.md"
    cat "$WORK/speed.out" "$WORK/speed.err" >"$RESULTS_DIR/speed.log" 2>/dev/null
    [[ -f $WORK/notebooks.log ]] && cp "$WORK/notebooks.log" "$RESULTS_DIR/notebooks.log"
    cp "$WORK"/notebooks/*.ipynb "$RESULTS_DIR"/ 2>/dev/null
fi
exit "$FAILED"
