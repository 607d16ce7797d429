#!/usr/bin/env bash
# The one prepared check for a lent H100/H200 (issue 14): install, the environment, the GPU tests, the quick
# benchmarks of the kernel suites against their peers, a short autotune sweep, the full runs the time left allows
# (recorded), and one screen of results last. Every step is time-boxed, a failing step does not stop the others, and
# the whole run ends within BUDGET_S. `bash benchmarks/gpu_check.sh --help` says how to run it.
set -uo pipefail

BUDGET_S=540   # 9 minutes: the device lease is 15, starting the machine and the transfers take the rest
SAFETY_S=10    # kept back from the budget: the kill-after of a step that ignores SIGTERM, bash's own work
# step  cap_s  max_s  min_s: a step gets at most max_s and never more than the deadline allows once every later step
# has its cap; time an earlier step leaves unused flows on. A step offered less than min_s is skipped. The caps sum to
# at most BUDGET_S - SAFETY_S (tests/test_gpu_check.py checks it). The record_* steps have no cap: they run on what
# is left, the full suite of each recorded in benchmarks/results/<gpu>/.
STEP_TABLE="
install                 25   25    5
env                     10   15    5
tests_gpu               60   90   10
tests_kernels           90  120   10
bench_int8_matmul       35   50   15
bench_streaming         40   60   15
bench_sliding_window    50   80   15
bench_hybrid           125  240   30
autotune                80   90   30
record_int8_matmul       0  100   60
record_streaming         0  100   60
summary                 15   15    5
"
# the tests that touch CUDA: kernel and layer tests run on DEVICE = "cuda" there (tests/conftest.py)
CUDA_TEST_PATTERN='from conftest import DEVICE|cuda\.is_available\(\)|pytest\.mark\.gpu'
CUDA_TEST_EXCLUDE='_gpu\.py$|/test_readme\.py$|/test_gpu_check\.py$'  # run apart; README blocks; this check
# the dry run's stand-ins: a few interpreter tests, one compile-report case, one suite's quick run on the CPU
DRY_TESTS="tests/test_targets.py tests/test_sliding_window_kernel.py tests/test_int8_kernel.py"
DRY_TESTS_K="test_targets or (q15k15 and triton-float16) or (test_w8a16_forward and M17N72K100gNone and float16)"
DRY_COMPILE_CASE="int8 W8A16 bf16 per-channel M64"
DRY_BENCH_SUITE="int8_matmul"

usage() {
    cat <<'EOF'
usage: bash benchmarks/gpu_check.sh [--dry-run] [--steps NAME,...] [--print-budget] [--help]

The prepared GPU check (issue 14), run from anywhere in the repository on a machine with a CUDA GPU:
  install        pip install --no-deps --no-build-isolation --no-index -e . (no network there); wheels in .whl/
                 go to /tmp/site (PYTHONPATH), for peers such as flash-attn, torchao, bitsandbytes; which peers
                 are present is printed (an absent one's rows read "unavailable")
  env            nvidia-smi, torch / triton / CUDA versions, device properties, commit -> $OUT/env.txt
  tests_gpu      pytest tests/test_*_gpu.py (long sequences, determinism), junit XML
  tests_kernels  pytest over every test file that runs on CUDA (kernels, layers, ops), in parallel (xdist) when
                 installed; every failure listed (no -x), junit XML
  bench_<suite>  python -m benchmarks.report --suite <suite> (quick) for int8_matmul, streaming, sliding_window,
                 hybrid: ours against SDPA, FlexAttention, cuBLAS, torch._int_mm, flash-attn where installed
  autotune       python -m benchmarks.autotune_sweep: block configs of the main kernels, best against the table
  record_<suite> python -m benchmarks.report --full --record --suite <suite> for int8_matmul, streaming, on the time
                 left only: writes benchmarks/results/<gpu>/ (returned in $OUT/results.tar.gz)
  summary        one screen: ours against each peer, rates against the measured ceilings, targets met / missed,
                 tests, the sweep's suggestions; then the table of steps

Time: each step is time-boxed (--print-budget shows the table) and the whole run ends within 9 minutes.
Files in $OUT (at most 8, as the device tool returns): gpu_check.log, env.txt, summary.txt, logs.tar.gz (every
step's log and junit XML), bench.tar.gz (the report's JSON/PNG), autotune_sweep.json, results.tar.gz (the recorded
runs). Without $OUT: benchmarks/runs/gpu_check/ (dry run: benchmarks/runs/gpu_check-dry/).

With the device tool (a lease is 15 minutes, all tries together; the commit travels only as a variable, since the
device copy may hold no .git):
  run(command="HYBRIDRAG_COMMIT=<sha> bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
The kernel suites need nothing beyond what that machine holds. Optional peers, or bm25s and faiss-cpu for the
retrieval suites, travel as wheels, made here once (in the repository root; .whl/ is ignored by git):
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl bm25s==0.3.16 faiss-cpu==1.15.1

Options:
  --dry-run       no GPU needed: runs what a CPU can (the import check, the environment, pytest's collection of the
                  GPU tests, a few interpreter tests and one compile-report case, the quick int8_matmul suite on
                  the CPU, the sweep's --dry-run, the summary) and says what it would run for the rest
  --steps LIST    comma-separated steps or groups (tests, bench, record), e.g. --steps env,autotune,summary
  --print-budget  print the step table (cap, max, min seconds) and the total, then exit
  --help          this text
Exit status: 0 when every step run passed, 1 otherwise, 2 for bad arguments.
EOF
}

# ------------------------------------------------------------------------------------------------- step table

steps() { awk 'NF == 4 { print $1 }' <<<"$STEP_TABLE"; }
field() { awk -v s="$1" -v i="$2" '$1 == s { print $i }' <<<"$STEP_TABLE"; }  # step, column (2 cap, 3 max, 4 min)

selected() {  # a step runs when --steps is empty or names it, or names its group (tests, bench, record)
    [ -z "$ONLY" ] && return 0
    local token
    for token in ${ONLY//,/ }; do
        [ "$token" = "$1" ] || [ "${1#"$token"_}" != "$1" ] && return 0
    done
    return 1
}

reserve_after() {  # the caps of the selected steps after $1
    local after=0 name found=0
    for name in $(steps); do
        if [ "$found" = 1 ] && selected "$name"; then after=$((after + $(field "$name" 2))); fi
        [ "$name" = "$1" ] && found=1
    done
    echo "$after"
}

step_timeout() {  # min(max_s, what the deadline leaves once the later steps have their caps)
    local left=$((DEADLINE - SECONDS - $(reserve_after "$1"))) max
    max=$(field "$1" 3)
    echo $((left < max ? left : max))
}

print_budget() {
    printf '%-22s %6s %6s %6s\n' step cap_s max_s min_s
    local total=0 name
    for name in $(steps); do
        printf '%-22s %6s %6s %6s\n' "$name" "$(field "$name" 2)" "$(field "$name" 3)" "$(field "$name" 4)"
        total=$((total + $(field "$name" 2)))
    done
    echo "total of caps: $total s; budget: $BUDGET_S s ($SAFETY_S s kept back)"
}

# ------------------------------------------------------------------------------------------------- helpers

say() { printf '%s\n' "$*" | tee -a "$MAINLOG"; }

commit() {
    local sha
    if sha=$(git -C "$REPO" rev-parse HEAD 2>/dev/null); then
        [ -n "$(git -C "$REPO" status --porcelain -- . ':(exclude)benchmarks/results' 2>/dev/null)" ] && sha+="-dirty"
        echo "$sha"
    else
        echo "${HYBRIDRAG_COMMIT:-unknown (no git checkout here; pass HYBRIDRAG_COMMIT=<sha>)}"
    fi
}

has_module() { "$PY" -c "import $1" 2>/dev/null; }

pytest_flags() {  # $1: per-test timeout, $2: most workers; each when its plugin is installed (Triton's compiles
    local flags=() n    # are the long part, so workers help; the GPU's memory bounds them for the long tests)
    has_module pytest_timeout && flags+=(--timeout="$1")
    if [ "${2:-1}" -gt 1 ] && has_module xdist; then
        n=$(( $(nproc) - 2 ))
        flags+=(-n "$(( n > $2 ? $2 : (n < 1 ? 1 : n) ))")
    fi
    echo "${flags[@]}"
}

pack() {  # keep $OUT at a few files: the step logs and the report's files as tarballs, refreshed after each step
    tar czf "$OUT/logs.tar.gz" -C "$W" logs 2>/dev/null
    [ -n "$(ls -A "$W/bench" 2>/dev/null)" ] && tar czf "$OUT/bench.tar.gz" -C "$W" bench bench-full 2>/dev/null
    [ "$DRY" = 0 ] && [ -d "benchmarks/results/$SLUG" ] && tar czf "$OUT/results.tar.gz" "benchmarks/results/$SLUG"
    return 0
}

# ------------------------------------------------------------------------------------------------- the steps
# Each runs as `bash gpu_check.sh __step NAME` under timeout, its output in $LOGS/NAME.log.

step_install() {
    local wheels=(.whl/*.whl)
    if [ "$DRY" = 1 ]; then
        echo "would run: $PY -m pip install --no-deps --no-build-isolation --no-index -e ."
        [ -e "${wheels[0]}" ] && echo "would install into /tmp/site: ${wheels[*]}"
    else
        "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || return 1
        if [ -e "${wheels[0]}" ]; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                "${wheels[@]}" || return 1
            echo "installed into /tmp/site: ${wheels[*]}"
        else
            echo "no .whl/ folder travelled: only the peers already installed here run"
        fi
    fi
    "$PY" - <<'EOF' || return 1
import importlib.util
import hybridrag, hybridrag.kernels  # noqa: F401
print(f"hybridrag imports from {hybridrag.__file__}")
for module, dist in (("flash_attn", "flash-attn"), ("torchao", "torchao"), ("bitsandbytes", "bitsandbytes"),
                     ("bm25s", "bm25s"), ("faiss", "faiss-cpu")):
    print(f"  {dist:13s} {'present' if importlib.util.find_spec(module) else 'absent'}")
EOF
    if ! "$PY" -c "import benchmarks.report" 2>"$W/report_import.err"; then
        echo "WARNING: benchmarks.report does not import here ($(tail -n 1 "$W/report_import.err")):"
        echo "  the bench and record steps will fail"
    fi
}

step_env() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $(commit)"
        echo "host: $(hostname) $(uname -srm), $(nproc) CPUs"
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
                --format=csv
        else
            echo "nvidia-smi: not on this machine"
        fi
        "$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()} ({platform.python_implementation()}), torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as error:
    print(f"triton: {error}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
          f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
EOF
        "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|numpy|pytest|pytest-xdist|pytest-timeout|flash|torchao|bitsandbytes|faiss|bm25s|matplotlib) '
        free -g 2>/dev/null | head -2
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

step_tests_gpu() {
    local files=(tests/test_*_gpu.py)
    if [ "$DRY" = 1 ]; then
        echo "would run: $PY -m pytest -v -rfEs $(pytest_flags 120 3) --junitxml=tests_gpu.xml ${files[*]}"
        "$PY" -m pytest --collect-only -q -p no:cacheprovider "${files[@]}"
        return
    fi
    # shellcheck disable=SC2046  # the flags are words
    # three workers: the 16k-token references take about 25 GB each
    "$PY" -m pytest -v -rfEs -p no:cacheprovider $(pytest_flags 120 3) --junitxml="$LOGS/tests_gpu.xml" "${files[@]}"
}

cuda_test_files() {  # the kernel tests first: a step stopped at its time box has run the most telling ones
    local all
    all=$(grep -lE "$CUDA_TEST_PATTERN" tests/test_*.py | grep -vE "$CUDA_TEST_EXCLUDE")
    grep -E '_kernel\.py$' <<<"$all"
    grep -vE '_kernel\.py$' <<<"$all"
}

step_tests_kernels() {
    local files
    mapfile -t files < <(cuda_test_files)
    if [ "$DRY" = 1 ]; then
        echo "would run: $PY -m pytest -v -rfE $(pytest_flags 60 14) --junitxml=tests_kernels.xml ${files[*]}"
        echo "here: a few interpreter tests, and the sm_90 compile of one case"
        "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$LOGS/tests_kernels.xml" $DRY_TESTS \
            -k "$DRY_TESTS_K" || return 1
        "$PY" -m benchmarks.compile_report --arch 90 --only "$DRY_COMPILE_CASE" --out "$W/compile_report.json"
        return
    fi
    # shellcheck disable=SC2046
    "$PY" -m pytest -v -rfE -p no:cacheprovider $(pytest_flags 60 14) --junitxml="$LOGS/tests_kernels.xml" \
        "${files[@]}"
}

step_bench() {  # $1: suite
    if [ "$DRY" = 1 ] && [ "$1" != "$DRY_BENCH_SUITE" ]; then
        echo "would run: $PY -m benchmarks.report --suite $1 --out $W/bench"
        return
    fi
    "$PY" -m benchmarks.report --suite "$1" --out "$W/bench"
}

step_autotune() {
    if [ "$DRY" = 1 ]; then
        "$PY" -m benchmarks.autotune_sweep --dry-run --out "$W/autotune_sweep.json" || return 1
    else
        "$PY" -m benchmarks.autotune_sweep --budget-s "$((STEP_TIMEOUT - 12))" --out "$W/autotune_sweep.json" \
            || return 1
        mkdir -p "benchmarks/results/$SLUG" && cp "$W/autotune_sweep.json" "benchmarks/results/$SLUG/"
    fi
    cp "$W/autotune_sweep.json" "$OUT/"
}

step_record() {  # $1: suite
    if [ "$DRY" = 1 ]; then
        echo "would run: $PY -m benchmarks.report --full --record --suite $1 --out $W/bench-full"
        return
    fi
    "$PY" -m benchmarks.report --full --record --suite "$1" --out "$W/bench-full"
}

step_summary() {  # (the dry run's tests_gpu only collects: no XML of it)
    local xml=("$LOGS/tests_gpu.xml" "$LOGS/tests_kernels.xml")
    [ "$DRY" = 1 ] && xml=("$LOGS/tests_kernels.xml")
    "$PY" -m benchmarks.gpu_check_summary --bench "$W/bench" --bench "$W/bench-full" --tests "${xml[@]}" \
        --autotune "$W/autotune_sweep.json" --out "$OUT/summary.txt"
}

run_body() {  # the body of one step, in its own process (timeout needs one)
    case "$1" in
        bench_*) step_bench "${1#bench_}" ;;
        record_*) step_record "${1#record_}" ;;
        *) "step_$1" ;;
    esac
}

run_step() {
    local name=$1 t min start rc status note=""
    selected "$name" || return 0
    t=$(step_timeout "$name")
    min=$(field "$name" 4)
    if [ "$t" -lt "$min" ]; then
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" skipped 0 "$t" "needs ${min} s, ${t} s left" >>"$STEPS_TSV"
        say "[$name] skipped: needs ${min} s, ${t} s left"
        return 0
    fi
    say "[$name] up to ${t} s ($(date -u +%H:%M:%S))"
    start=$SECONDS
    STEP_TIMEOUT=$t timeout -k 5 "$t" bash "$SCRIPT" __step "$name" >"$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=pass ;;
        124|137) status=timeout; note="stopped at ${t} s" ;;
        *) status=FAIL; note="exit $rc" ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$t" "$note" >>"$STEPS_TSV"
    say "[$name] $status in $((SECONDS - start)) s${note:+ ($note)}"
    if [ "$status" != pass ] || { [ "$DRY" = 1 ] && [ "$name" != summary ]; }; then
        tail -n "$([ "$status" = pass ] && echo 6 || echo 15)" "$LOGS/$name.log" | sed 's/^/    /' | tee -a "$MAINLOG"
    fi
    pack
}

print_steps() {
    local passed total
    total=$(wc -l <"$STEPS_TSV")
    passed=$(awk -F'\t' '$2 == "pass"' "$STEPS_TSV" | wc -l)
    say ""
    say "steps: $passed of $total passed in $((SECONDS - START)) s of a ${BUDGET_S} s budget$([ "$DRY" = 1 ] && echo ' (dry run)')"
    awk -F'\t' '{ printf "  %-22s %-8s %5s s  (timeout %4s s)  %s\n", $1, $2, $3, $4, $5 }' "$STEPS_TSV" \
        | tee -a "$MAINLOG"
    say "files: $OUT/"
    [ "$passed" = "$total" ]
}

# ------------------------------------------------------------------------------------------------- main

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SCRIPT")")
cd "$REPO" || exit 2
PY=${PYTHON:-python3}

if [ "${1:-}" = __step ]; then  # one step's body, started by run_step
    run_body "$2"
    exit $?
fi

DRY=0 ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --steps) ONLY=${2:-}; shift ;;
        --steps=*) ONLY=${1#--steps=} ;;
        --print-budget) print_budget; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for token in ${ONLY//,/ }; do
    if ! steps | grep -qE "^${token}(_|\$)"; then
        echo "gpu_check.sh: --steps names '$token', which is no step nor group; steps: $(steps | tr '\n' ' ')" >&2
        exit 2
    fi
done

START=$SECONDS
DEADLINE=$((START + BUDGET_S - SAFETY_S))
OUT=${OUT:-$REPO/benchmarks/runs/gpu_check$([ "$DRY" = 1 ] && echo -dry)}
W=${TMPDIR:-/tmp}/hybridrag_gpu_check
LOGS=$W/logs
STEPS_TSV=$W/steps.tsv
MAINLOG=$OUT/gpu_check.log
rm -rf "$W" && mkdir -p "$LOGS" "$W/bench" "$W/bench-full" "$OUT" || exit 2
rm -f "$OUT"/{gpu_check.log,env.txt,summary.txt,logs.tar.gz,bench.tar.gz,results.tar.gz,autotune_sweep.json}
: >"$STEPS_TSV"
: >"$MAINLOG"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -e .whl ] && compgen -G ".whl/*.whl" >/dev/null && [ "$DRY" = 0 ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
[ "$DRY" = 0 ] && unset TRITON_INTERPRET  # compiled kernels on the GPU
HYBRIDRAG_COMMIT=$(commit)
export DRY PY OUT W LOGS HYBRIDRAG_COMMIT SLUG=unknown-device

if [ "$DRY" = 0 ] && ! command -v nvidia-smi >/dev/null && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device here: run it on a GPU machine (see --help), or add --dry-run" >&2
    exit 2
fi
say "gpu_check ($([ "$DRY" = 1 ] && echo 'dry run, no GPU' || echo GPU)): commit $HYBRIDRAG_COMMIT, budget ${BUDGET_S} s, files in $OUT"

for name in $(steps); do
    run_step "$name"
    if [ "$name" = install ]; then  # the device slug names benchmarks/results/<gpu>/
        SLUG=$("$PY" -c "from benchmarks.common import default_device, device_slug; print(device_slug(default_device()))" \
            2>/dev/null || echo unknown-device)
    fi
done
[ -f "$OUT/summary.txt" ] && selected summary && { say ""; cat "$OUT/summary.txt" | tee -a "$MAINLOG"; }
pack
print_steps
