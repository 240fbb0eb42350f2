#!/usr/bin/env bash
# One GPU check (issue 16, point 3): what the project measures on one H100 / H200, in one command, in under 8
# minutes of wall time, into ONE output folder of at most 8 files.
#
#   bash benchmarks/gpu_check.sh --wheels .whl [--out DIR]   # a bare CUDA machine with torch, no network
#   bash benchmarks/gpu_check.sh --tiny [--out DIR]          # the same commands with small settings, on a CPU
#
#   --out DIR  the output folder (default: $OUT if set, else gpu-check-out); --wheels DIR  wheels to install first
#
# Steps (a failed step does not stop the later ones; the exit status is 1 if any step did not pass):
#   install        the wheels of --wheels DIR into /tmp/site (pip --no-index --no-deps --target); the repository
#                  itself runs from its source tree, not pip-installed (see "Source tree" below)
#   environment    (background) versions, device name, and that every package imports; outside --tiny, no CUDA
#                  fails it
#   bench_scale    (background, CPU, CUDA_VISIBLE_DEVICES="") benchmarks/bench_scale.py: the simulated peak memory
#                  and FLOPs of the same update, in fake tensor mode; skipped (and recorded) if the file is missing
#   1 kernel_tests pytest tests/test_kernels.py, TRITON_INTERPRET unset: on a GPU the kernel checks run compiled
#                  (the `gpu` tests) with the dispatch tests; the interpreter test (`slow`) is left out. --tiny
#                  selects the `gpu` tests only, which a CPU collects and skips (the interpreter run of the same
#                  checks is the normal suite's test_kernels_under_the_triton_interpreter)
#   2 bench_kernels benchmarks/bench_kernels.py: Triton vs eager vs torch.compile, % of the measured copy bandwidth
#   2 gpu_update_24gb  benchmarks/gpu_update.py --quantize nf4 --use-8bit-adam: the same update on the one-24-GB-GPU
#                  recipe (issue 21): the transformer built in bf16, then quantized NF4 in place on the GPU, a LoRA on
#                  top, bitsandbytes' 8-bit AdamW: seconds and the measured peak (max_memory_allocated)
#   3 gpu_update   benchmarks/gpu_update.py: a full-depth FLUX.1-dev-shaped random-weight SRPO LoRA update at
#                  720x720 in bf16, 1 warm-up + 2 measured, through the project's trainer: seconds, max_memory_
#                  allocated, TFLOP/s and MFU against bench_scale's simulated FLOPs, measured vs simulated peak
#   4 bench_kernels (moved last: the update numbers come first if time runs short)
#   5 summary      status.json and summary.md: device, date, versions, each step's status, the updates' numbers
#
# The output folder gets seven files: gpu_check.log (every step's output), status.json, bench_kernels.json,
# bench_scale.json, gpu_update.json and gpu_update_24gb.json (rewritten after every update, so a step stopped by
# its time limit keeps what it measured) and summary.md; a .partial file only if a step was killed while writing.
# Both modes run the same command lines: only the variables of "Settings" differ (sizes, repetitions, the pytest
# selection, time limits). Each step runs under `timeout`, capped so that the whole run ends by BUDGET_S.
#
# Wheels. The GPU image ('cuda', Python 3.12) has torch 2.11, triton 3.6, transformers, peft, accelerate,
# tensorboard, huggingface_hub 1.33, safetensors 0.8, regex, timm, requests, Pillow, filelock, numpy and tqdm, but
# not diffusers, open_clip or ftfy. Their Requires-Dist (`unzip -p W '*/METADATA' | grep ^Requires-Dist`, extras
# left out):
#   diffusers 0.42.1        importlib_metadata (imported below Python 3.8 only), filelock, huggingface-hub>=1.32.0,<3.0,
#                           numpy, regex!=2019.12.17, requests, safetensors>=0.8.0, Pillow
#   open_clip_torch 3.3.0   torch>=2.0, torchvision, regex, ftfy, tqdm, huggingface-hub, safetensors, timm>=1.0.17
#   ftfy 6.3.1              wcwidth
#   wcwidth 0.7.0           (none)
# so four pure-Python wheels (7.7 MB), and for step 2 bitsandbytes 0.50.2 (needs torch, numpy, packaging: there)
# and torchao 0.18.0 (no requirements). bitsandbytes' wheel (43 MB) holds a library per CUDA version; the GPU's
# torch is built for CUDA 13.0, so a copy of the wheel with only libbitsandbytes_cuda130.so and _cpu.so (3.6 MB;
# its RECORD lines of the removed files dropped) keeps the carried tree under 64 MiB.
# Fetch them where pip reaches a registry, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 torchao==0.18.0 bitsandbytes==0.50.2
# then, with the device tool: run(command="bash benchmarks/gpu_check.sh --wheels .whl", carry=[".whl"],
# timeout_s=560); the files come back from $OUT.
#
# Source tree. setup.py installs the top-level kernels/ folder as diffusers_srpo.kernels, so the repository root
# alone on PYTHONPATH does not import (diffusers_srpo.ops imports diffusers_srpo.kernels). The script lays that
# package out in a temporary folder of symbolic links to the repository's own files (diffusers_srpo/* and
# kernels/ as diffusers_srpo/kernels) and puts that folder on PYTHONPATH (after /tmp/site); PYTHONSAFEPATH=1
# keeps the current folder (the repository root, whose diffusers_srpo has no kernels) off sys.path.

set -uo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=gpu
WHEELS=""
OUT_DIR="${OUT:-gpu-check-out}"
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) MODE=tiny ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
        --wheels=*) WHEELS="${1#--wheels=}" ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
        --out=*) OUT_DIR="${1#--out=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")" || exit 2
SITE="${GPU_CHECK_SITE:-/tmp/site}"
LOG="$OUT_DIR/gpu_check.log"
STEPS_TSV="$WORK/steps.tsv"
rm -f "$OUT_DIR"/{gpu_check.log,status.json,summary.md,bench_kernels.json,bench_scale.json,gpu_update.json,gpu_update.json.partial,gpu_update_24gb.json,gpu_update_24gb.json.partial}
: >"$LOG"
: >"$STEPS_TSV"
START=$(date +%s)
declare -A BG_PIDS=() BG_T0=()
# shellcheck disable=SC2329  # run by the EXIT trap
cleanup() {
    local pid
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# ----------------------------------------------------------------------------------------------- Settings
# The only differences between the modes. BUDGET_S: the whole run's deadline; each step is also capped (CAP_*).
METHOD=srpo
BATCH_SIZE=1
LORA_RANK=32
CHECKPOINTING=1
WARMUP=1
if [ "$MODE" = tiny ]; then
    MODEL=tiny
    RESOLUTION=32
    ROLLOUT_STEPS=2
    STEPS=1
    KERNEL_TESTS_MARKS="gpu"                        # the compiled kernel checks: collected, skipped without CUDA
    BENCH_KERNELS_FLAGS=(--reps 1 --no-compile)     # torch.compile's first compiles on a CPU take minutes
    BUDGET_S=360
    RESERVE_S=60
    CAP_INSTALL=60 CAP_ENVIRONMENT=90 CAP_KERNEL_TESTS=120 CAP_BENCH_KERNELS=180 CAP_BENCH_SCALE=240 CAP_UPDATE=120
else
    MODEL=flux.1-dev
    RESOLUTION=720
    ROLLOUT_STEPS=25
    STEPS=2
    KERNEL_TESTS_MARKS="not slow"                   # compiled checks + dispatch tests; not the interpreter test
    BENCH_KERNELS_FLAGS=(--reps 20)
    BUDGET_S=480                                    # 8 minutes: the folder is complete within 8.5
    RESERVE_S=300                                   # the two updates' share (about 1-2 min each expected)
    CAP_INSTALL=60 CAP_ENVIRONMENT=90 CAP_KERNEL_TESTS=100 CAP_BENCH_KERNELS=120 CAP_BENCH_SCALE=300 CAP_UPDATE=170
fi
DEADLINE=$((START + BUDGET_S))
POINT=(--model "$MODEL" --method "$METHOD" --resolution "$RESOLUTION" --batch-size "$BATCH_SIZE"
       --rollout-steps "$ROLLOUT_STEPS" --lora-rank "$LORA_RANK" --checkpointing "$CHECKPOINTING")

# ----------------------------------------------------------------------------------------------- Helpers
log() { echo "$*" | tee -a "$LOG"; }

# Seconds a step may take: its cap, or what is left before the deadline less RESERVE_S (kept for the update,
# except by the update itself), at least 5.
limit_for() {
    local cap=$1 reserve=${2:-$RESERVE_S} left
    left=$((DEADLINE - reserve - $(date +%s)))
    if [ "$left" -lt "$cap" ]; then cap=$left; fi
    if [ "$cap" -lt 5 ]; then cap=5; fi
    echo "$cap"
}

status_of() { case $1 in 0) echo ok ;; 124|137) echo timeout ;; *) echo failed ;; esac; }

record() {  # NAME STATUS EXIT SECONDS LAST-LINE
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(printf '%s' "$5" | tr '\t\n' '  ' | cut -c1-300)" >>"$STEPS_TSV"
    log "=== [$1] $2 (exit $3, $4 s)"
}

last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1; }

# run_step NAME CAP RESERVE COMMAND...: the command under `timeout`, its output into the log, its status recorded.
run_step() {
    local name=$1 limit t0 rc output="$WORK/$1.out"
    limit=$(limit_for "$2" "$3"); shift 3
    t0=$(date +%s)
    log "=== [$name] $(date -u +%FT%TZ), limit ${limit} s: $*"
    timeout -k 15 "$limit" "$@" >"$output" 2>&1
    rc=$?
    cat "$output" >>"$LOG"
    record "$name" "$(status_of "$rc")" "$rc" "$(($(date +%s) - t0))" "$(last_line "$output")"
    return "$rc"
}

# start_background NAME CAP COMMAND...: the same in the background; finish_background NAME waits and records it.
start_background() {
    local name=$1 limit; limit=$(limit_for "$2"); shift 2
    log "=== [$name] $(date -u +%FT%TZ), in the background, limit ${limit} s: $*"
    BG_T0[$name]=$(date +%s)
    { timeout -k 15 "$limit" "$@"; local rc=$?; date +%s >"$WORK/$name.end"; exit "$rc"; } >"$WORK/$name.out" 2>&1 </dev/null &
    BG_PIDS[$name]=$!
}
finish_background() {
    local name=$1 rc end
    [ -n "${BG_PIDS[$name]:-}" ] || return 0
    log "=== [$name] waiting for the background step"
    wait "${BG_PIDS[$name]}"
    rc=$?
    unset "BG_PIDS[$name]"
    cat "$WORK/$name.out" >>"$LOG"
    end=$(cat "$WORK/$name.end" 2>/dev/null || date +%s)
    record "$name" "$(status_of "$rc")" "$rc" "$((end - BG_T0[$name]))" "$(last_line "$WORK/$name.out")"
}

# ----------------------------------------------------------------------------------------------- 0. install
log "gpu_check.sh ($MODE mode): repository $REPO, output $OUT_DIR, started $(date -u +%FT%TZ)"
unset TRITON_INTERPRET DIFFUSERS_SRPO_KERNELS_ON_CPU DIFFUSERS_SRPO_DISABLE_KERNELS
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if [ -n "$WHEELS" ]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -eq 0 ]; then
        record install failed 1 0 "no .whl file in $WHEELS"
    else
        run_step install "$CAP_INSTALL" "$RESERVE_S" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "${wheels[@]}"
    fi
fi

# The package as setup.py lays it out, from the repository's own files (see "Source tree" above).
SRC="$WORK/src"
mkdir -p "$SRC/diffusers_srpo"
for entry in "$REPO"/diffusers_srpo/*; do ln -s "$entry" "$SRC/diffusers_srpo/"; done
ln -s "$REPO/kernels" "$SRC/diffusers_srpo/kernels"
PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$WHEELS" ]; then PYTHONPATH="$SITE:$PYTHONPATH"; fi
export PYTHONPATH
log "PYTHONPATH=$PYTHONPATH"
cd "$REPO" || exit 2

# ----------------------------------------------------------------------------------------------- background: environment, bench_scale
# The versions, the device and the imports (a missing package, or no CUDA outside --tiny, fails this step).
cat >"$WORK/environment.py" <<'EOF'
import datetime, importlib, json, platform, sys

import torch

path, mode = sys.argv[1:3]
cuda = torch.cuda.is_available()
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "cuda_available": cuda, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"}
missing = [] if cuda or mode == "tiny" else ["CUDA: torch.cuda.is_available() is False (--tiny runs on a CPU)"]
for name in ("triton", "diffusers", "open_clip", "ftfy", "torchao", "bitsandbytes", "transformers", "peft", "accelerate", "diffusers_srpo",
             "diffusers_srpo.kernels"):
    try:
        module = importlib.import_module(name)
    except Exception as error:  # every missing package is reported, then the step fails
        info[name] = None
        missing.append(f"{name}: {type(error).__name__}: {error}")
        continue
    info[name] = getattr(module, "__version__", None)
    info[f"{name} file"] = getattr(module, "__file__", None)
info["missing"] = missing
with open(path, "w", encoding="utf-8") as file:
    json.dump(info, file, indent=2)
print(json.dumps(info, indent=2))
if missing:
    raise SystemExit("missing: " + "; ".join(missing))
print(f"{info['device']}, torch {info['torch']}, triton {info['triton']}, diffusers {info['diffusers']}")
EOF
start_background environment "$CAP_ENVIRONMENT" "$PY" "$WORK/environment.py" "$WORK/environment.json" "$MODE"

# The simulated numbers of the same point, on the CPU (fake tensors), while the GPU steps run.
SIM_JSON="$OUT_DIR/bench_scale.json"
if [ -f benchmarks/bench_scale.py ]; then
    CUDA_VISIBLE_DEVICES="" start_background bench_scale "$CAP_BENCH_SCALE" \
        "$PY" benchmarks/bench_scale.py "${POINT[@]}" --json "$SIM_JSON"
else
    record bench_scale missing 1 0 "benchmarks/bench_scale.py does not exist: no simulated numbers"
fi

# ----------------------------------------------------------------------------------------------- 1. kernel tests
run_step kernel_tests "$CAP_KERNEL_TESTS" "$RESERVE_S" "$PY" -m pytest tests/test_kernels.py -m "$KERNEL_TESTS_MARKS" \
    -q -ra -p no:cacheprovider

# ----------------------------------------------------------------------------------------------- 2. the 24 GB recipe
# Its simulated counterpart is bench_scale.py with the same two flags, run on a CPU afterwards (benchmarks/RESULTS.md).
run_step gpu_update_24gb "$CAP_UPDATE" $((RESERVE_S / 2)) "$PY" benchmarks/gpu_update.py "${POINT[@]}" \
    --quantize nf4 --use-8bit-adam --warmup "$WARMUP" --steps "$STEPS" --json "$OUT_DIR/gpu_update_24gb.json"

# ----------------------------------------------------------------------------------------------- 3. the update
finish_background bench_scale
SIMULATED=()
if [ -s "$SIM_JSON" ] && grep -q "^bench_scale	ok	" "$STEPS_TSV"; then SIMULATED=(--simulated "$SIM_JSON"); fi
run_step gpu_update "$CAP_UPDATE" 0 "$PY" benchmarks/gpu_update.py "${POINT[@]}" --warmup "$WARMUP" --steps "$STEPS" \
    "${SIMULATED[@]}" --json "$OUT_DIR/gpu_update.json"

# ----------------------------------------------------------------------------------------------- 4. bench_kernels
run_step bench_kernels "$CAP_BENCH_KERNELS" 0 "$PY" benchmarks/bench_kernels.py "${BENCH_KERNELS_FLAGS[@]}" \
    --json "$OUT_DIR/bench_kernels.json"

# ----------------------------------------------------------------------------------------------- 4. status and summary
finish_background environment
cat >"$WORK/summary.py" <<'EOF'
import json, os, sys

mode, out, steps_tsv, environment_path, wall = sys.argv[1:6]
steps = []
with open(steps_tsv, encoding="utf-8") as file:
    for line in file:
        name, status, rc, seconds, last = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
        steps.append({"step": name, "status": status, "exit": int(rc), "seconds": int(seconds), "last_line": last})


def load(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


environment = load(environment_path) or {}
updates = {name: load(os.path.join(out, f"{name}.json")) for name in ("gpu_update_24gb", "gpu_update")}
kernels = load(os.path.join(out, "bench_kernels.json"))
ok = all(step["status"] == "ok" for step in steps)
files = sorted(set(os.listdir(out)) | {"status.json", "summary.md"})
status = {"mode": mode, "ok": ok, "wall_s": int(wall), "environment": environment, "steps": steps, "files": files}
with open(os.path.join(out, "status.json"), "w", encoding="utf-8") as file:
    json.dump(status, file, indent=2)


def fmt(value, digits=3, scale=1.0, suffix=""):
    return "absent" if value is None else f"{value * scale:.{digits}g}{suffix}"


lines = [
    f"# GPU check ({mode} mode): {'all steps passed' if ok else 'SOME STEPS FAILED'}",
    "",
    f"- device: {environment.get('device', 'unknown')}",
    f"- date: {environment.get('date', 'unknown')}",
    f"- torch {environment.get('torch')}, triton {environment.get('triton')}, diffusers {environment.get('diffusers')}, "
    f"open_clip {environment.get('open_clip')}, torchao {environment.get('torchao')}, bitsandbytes "
    f"{environment.get('bitsandbytes')}, Python {environment.get('python')}",
    f"- wall time: {wall} s",
    "",
    "| step | status | exit | seconds | last line |",
    "|---|---|---:|---:|---|",
]
for step in steps:
    last = step["last_line"].replace("|", "/")
    lines.append(f"| {step['step']} | {step['status']} | {step['exit']} | {step['seconds']} | {last} |")
for name, update in updates.items():
    lines.append("")
    if not update:
        lines.append(f"## One update ({name}): no {name}.json (see gpu_check.log)")
        continue
    sim = update.get("simulated") or {}
    mfu = update.get("mfu") or {}
    warmup = ", ".join(f"{s:.3g}" for s in update["warmup_s"])
    lines += [
        f"## One update ({name}): {update['model']} {update['method']}, {update['resolution']}x{update['resolution']}, "
        f"batch {update['batch_size']}, {update['rollout_steps']} rollout steps, LoRA rank {update['lora_rank']}, "
        f"checkpointing {'on' if update['checkpointing'] else 'off'}, transformer weights {update['weight_dtype']}, "
        f"8-bit AdamW {'on' if update.get('use_8bit_adam') else 'off'}, on {update['device']}",
        "",
        f"- transformer parameters: {update.get('params', 0):,} (trainable {update.get('trainable_params', 0):,}); "
        f"models built in {fmt(update.get('build_s'), suffix=' s')}; allocated after the build "
        f"{fmt(update.get('memory_after_build_gib'), 4, suffix=' GiB')}",
        f"- measured updates: {update['measured_updates']} of {update['steps']} (complete: {update['complete']}), "
        f"after {len(update['warmup_s'])} warm-up ({warmup} s)",
        f"- seconds per update: median {fmt(update['update_s_median'], 4)}; each: "
        + ", ".join(f"{s:.4g}" for s in update["update_s"]),
        f"- peak memory over the measured updates: max_memory_allocated {fmt(update['max_memory_allocated_gib'], 4, suffix=' GiB')} "
        f"(reserved {fmt(update['max_memory_reserved_gib'], 4, suffix=' GiB')}); simulated {fmt(sim.get('peak_gib'), 4, suffix=' GiB')}; "
        f"measured / simulated {fmt(update['peak_measured_over_simulated'])}",
        f"- simulated FLOPs of one update: {fmt(sim.get('flops'), 4, 1e-12, ' TFLOP')} (rollout "
        f"{fmt(sim.get('flops_rollout'), 4, 1e-12)}, gradient {fmt(sim.get('flops_gradient'), 4, 1e-12)}); achieved "
        f"{fmt(update['achieved_tflops'], 4, suffix=' TFLOP/s')}",
        f"- MFU: {fmt(mfu.get('spec_989e12'), 3, 100, ' %')} of 989 TFLOP/s (H100/H200 dense bf16 spec), "
        f"{fmt(mfu.get('measured_790e12'), 3, 100, ' %')} of 790 TFLOP/s (the bf16 matmul rate measured on an H200 here)",
    ]
    if sim and not sim.get("same_point", True):
        lines.append(f"- WARNING: the simulated point differs: {'; '.join(sim['mismatches'])}")
    for key in ("note", "memory_note"):
        if update.get(key):
            lines.append(f"- {key.replace('_', ' ')}: {update[key]}")
if kernels:
    lines += ["", f"## Kernels: {kernels['note']}; copy bandwidth {kernels['copy_bandwidth_gb_per_s']:.0f} GB/s"]
    rows = {(r["op"], tuple(r["shape"]), r["variant"]): r for r in kernels["rows"]}
    triton = [r for r in kernels["rows"] if r["variant"] == "triton"]
    if triton:
        lines += ["", "| op | shape | Triton us | % of copy | x eager | x compile |", "|---|---|---:|---:|---:|---:|"]
        for r in triton:
            compiled = rows.get((r["op"], tuple(r["shape"]), "compile"))
            vs_compile = f"{compiled['median_s'] / r['median_s']:.2f}" if compiled else "-"
            lines.append(
                f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['median_s'] * 1e6:.1f} | {r['percent_of_copy']:.1f} | "
                f"{r['speedup_vs_eager']:.2f} | {vs_compile} |"
            )
lines += ["", f"Files: {', '.join(files)}", ""]
with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as file:
    file.write("\n".join(lines))
print("\n".join(lines))
EOF
"$PY" "$WORK/summary.py" "$MODE" "$OUT_DIR" "$STEPS_TSV" "$WORK/environment.json" "$(($(date +%s) - START))" >>"$LOG" 2>&1
summary_rc=$?
if [ "$summary_rc" -ne 0 ]; then
    log "=== [summary] failed (exit $summary_rc): a bare summary.md instead"
    { echo "# GPU check ($MODE mode): the summary failed (see gpu_check.log)"; echo; cat "$STEPS_TSV"; } >"$OUT_DIR/summary.md"
fi

log "gpu_check.sh: done in $(($(date +%s) - START)) s; files in $OUT_DIR: $(cd "$OUT_DIR" && echo *)"
if [ "$summary_rc" -ne 0 ] || cut -f2 "$STEPS_TSV" | grep -qv '^ok$'; then
    log "gpu_check.sh: some steps did not pass:"
    awk -F'\t' '$2 != "ok" {print "  " $1 ": " $2 " (exit " $3 ")"}' "$STEPS_TSV" | tee -a "$LOG"
    exit 1
fi
exit 0
