#!/usr/bin/env bash
# One command for a GPU machine: environment, build, the throughput sweep, the kernel profile, GPU tests,
# the per-call overhead and the A/B of the kernels' switches, in that order (the measurements first).
#
#   benchmarks/gpu_check.sh [OUT_DIR]            # OUT_DIR defaults to $OUT, else ./gpu_out
#   benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # (or DRY_RUN=1) the CPU-side parts, on a machine without a GPU
#   benchmarks/gpu_check.sh --quick [OUT_DIR]    # (or QUICK=1) 450-600 s, 2 minutes of them the build: a
#                                                # sweep at T in {25, 1024, 65536}, the profile, the GPU tests
#                                                # of test_backends.py and those new with G2/G3 (no
#                                                # synchronisation, CUDA graphs, compile), the overhead
#   benchmarks/gpu_check.sh --measure [OUT_DIR]  # under 300 s: the build, the quick sweep, the A/B of
#                                                # seven variants (AB_S=175); no tests
#   benchmarks/gpu_check.sh --tests [OUT_DIR]    # under 300 s, best on the machine --measure warmed (the
#                                                # build cached): the quick tests, auto's choice, ncu of
#                                                # the CUDA one-step kernel, the register reports; no sweep
#   The two halves of --quick, each with room for a rerun in a session's 15 minutes of device time,
#   less --quick's kernel profile (PROFILE_S) and overhead run (OVERHEAD_S): set those to add them. Every
#   stage's limit is cut to the time left, and a stage with under 15 s is skipped and listed; on any
#   exit, an outer timeout's included, the stages still running are stopped and failed.txt says where
#   the run was.
#   SKIP_TESTS=1 SKIP_SWEEP=1 PROFILE_S=0 OVERHEAD_S=0 REPORTS=0 AB_S=220 benchmarks/gpu_check.sh --quick
#                                                # a second call on the warm machine (the build cached): the
#                                                # A/B only; with NCU_S=60, ncu of one CUDA backward launch too
#   FASTMAML_COMMIT=$(git rev-parse --short HEAD) benchmarks/gpu_check.sh   # when the copy has no .git
#
# A device call returns at most 8 files: write to a folder outside $OUT and pack it, under a timeout
# shorter than the call's own limit (600 s), so that the pack is made even when a stage overruns:
#   timeout 560 benchmarks/gpu_check.sh --quick /tmp/g; tar czf "$OUT/gpu_out.tgz" -C /tmp/g .
#
# The build stage compiles the CUDA kernels (about 2 minutes of 16 cores) unless the call carries a library
# built ahead for the same sources, torch, Python and architectures (`benchmarks/cuda_build_check.sh --carry`
# on a machine with the GPU machine's torch, then carry [".gpu_prebuilt"]): that one is installed where the
# build looks (benchmarks/prebuilt.py; build.log says which), and removed again if it does not load there.
#
# Needs what the GPU machine has (Python, a CUDA torch, triton, nvcc, ninja, pytest) and no network:
# nothing is downloaded; fastmaml runs from this checkout (PYTHONPATH), installed editable when pip can.
# Every stage has a time limit and the whole run ends within about TOTAL_S (default 470 s). The output
# folder gets env.txt, build.log, ptxas.txt, tests.log, float32_errors.jsonl (every float32 comparison of the
# tests: worst element and norm-wise error), ab.txt, profile.txt, timeline.txt (and the folder
# timeline/), overhead.txt, overhead.json, compile_ahead.log, sweep.log, throughput.csv, throughput.png,
# summary.txt. The last thing printed is the compact summary table, then the stages that failed or ran out of
# time, if any: the exit status is then 1 (0 when every stage that ran finished cleanly).
#
# Stage limits (seconds, override by environment): BUILD_S=180 (nvcc), SWEEP_S (75 with --quick, else no
# cap: what is left of TOTAL_S after the profile's and the A/B's time and a reserve for the summary),
# CUDA_TESTS_S=100 and TRITON_TESTS_S=120 (the GPU tests: tests/test_backends.py for each GPU backend,
# tests/test_triton_maml.py, and once tests/test_same_function.py and tests/test_distributed.py (DDP over
# NCCL, a world of one); pytest-xdist spreads them over the cores when it is installed). The tests log to
# tests.log. GPU_TEST_BACKENDS (default "cuda triton factored") picks the backends tested, SWEEP_ARGS
# replaces the GPU sweep's settings, SKIP_SWEEP=1 skips it; before it, COMPILE_AHEAD_S=60 (0 skips it; at
# most half the sweep's limit) compiles the Triton kernels its first calls need, and those of the A/B's
# Triton variants, in parallel (compile_ahead.log). AB_S (only when set; --quick adds it to TOTAL_S) runs
# the A/B of the kernels' switches (ab.txt) last, with what is left of the run up to AB_S;
# PROFILE_S=60 (45) the kernels' GPU time at T=65,536, K=5, W=128 by torch.profiler (PROFILE_ARGS other
# cells and methods, PROFILE_SETTING switches for it) and NCU_S=60 (0) ncu of one backward launch at K=5,
# W=NCU_WIDTH (40), under the switches NCU_SETTING (none), with its stall reasons (profile.txt);
# NCU_LOWRANK_S (0: only when asked) ncu of four of the factored backend's low-rank launches at K=5, W=128,
# Triton's and the CUDA lowrank_add's (FASTMAML_FACTORED_KERNELS=cuda), half the limit each (profile.txt);
# NCU_ONESTEP_S (0; 45 in --tests) ncu of one launch of the one-step kernel at T=8192, K=1, W=40
# (profile.txt); NCU_TRITON_S (0) ncu of one launch of Triton's training kernel at T=2048, K=5,
# W=NCU_TRITON_WIDTH (40). Every ncu stage also keeps its report's source page, summed by
# benchmarks/ncu_source.py (ncu_*_lines.csv, profile.txt);
# TIMELINE_S=30 the CUDA reverse sweep's phases by their barriers (timeline.txt and timeline/; TIMELINE_ARGS
# its settings). With --quick, MMA_TESTS_S=40 (0 skips it) runs test_backends.py's float32 comparisons
# of cuda (every option, the GPU sizes) with FASTMAML_CUDA_MMA=1, STATES_TESTS_S=30 with
# FASTMAML_CUDA_MIN_BLOCKS=6 and FASTMAML_CUDA_STATES=global, NREG_TESTS_S=0 (only when asked) those of
# triton with its scratch layout capped at 128 registers (the A/B's nreg128), and TONESTEP_TESTS_S=55 (0 in
# --tests) three GPU tests of the Triton one-step kernel (tests/test_triton_onestep.py).
# EXPLAIN=0 skips auto's choice, OVERHEAD_S=0 the overhead run, REPORTS=0 the register reports (nvcc's of
# the CUDA kernels takes minutes of the machine's CPUs). ncu runs after the tests and auto's choice. With AB_S, the A/B's Triton variants are compiled in the background from
# the tests on (prewarm.log; PREWARM=0 skips it, PREWARM_WAIT_S=30 how long the A/B waits for it).
set -uo pipefail

DRY_RUN="${DRY_RUN:-0}"
QUICK="${QUICK:-0}"
MODE=""  # only from the flags: a stray MODE in the environment must not change the run
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --quick) QUICK=1 ;;
    --measure|--tests) QUICK=1; MODE="${arg#--}" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) OUT_ARG="$arg" ;;
  esac
done
DIR="${OUT_ARG:-${OUT:-./gpu_out}}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
cd "$(dirname "$0")/.."
REPO="$(pwd)"
# Everything the console shows goes with the results too (exit codes and stage lines were console-only).
exec > >(tee -a "$DIR/console.log") 2>&1
TEE_PID=$!

# The halves of --quick set their own defaults first (each still overridable from the environment).
# --measure, under 300 s: the build (a few seconds with a carried prebuilt library, 110-150 s without),
# the Triton kernels compiled ahead (at most 37 s), the sweep 75 (30 s measured on the H200 with warm
# caches), the A/B with what is left, up to 175 s (seven variants at 25 s; without a prebuilt library about
# the first one), the summary. No timeline by default (TIMELINE_S=25 adds it): the default reverse sweep's
# kernels are those whose timeline the H200 run of ea31a13 recorded (benchmarks/results/gpu-h200), and
# its 25 s measure one more variant. Its A/B, after that run: the CUDA one-step kernel at K=1 with its
# tensor-core products (its default: right at every GPU test's shape, 1.9x / 3.7x the reverse sweep at
# T=65,536, W=40 / 128), then with 8 warps a block (about the 9 it ran with before its scratch buffers
# shared places; now 13 at W=40); then for K=5, W=40, the cell furthest from G2's targets, the reverse
# sweep's products on tensor cores (FASTMAML_CUDA_MMA=1: fewer instructions a multiply-add in a sweep that
# waits on its instructions' latency), its 6-block build with the support states in global memory (6 tasks
# a multiprocessor instead of 3), neither yet measured on an H200, and the two together (measured with its
# parts, so that no later run is needed for it); then the one-step kernel at T=25 and 1,024; then Triton's
# scratch layout capped at 128 registers (two programs a multiprocessor instead of one: predicted up to
# 1.8x triton's row at K=5, W=128, where triton is 0.73x vmap). Left out: the FFMA loop's mended
# shared-operand form (offmas: an opt-in engine, whose mend the --tests call's test checks) and the factored
# backend's Triton lowrank_add (ftriton: measured as fcuda).
if [ "$MODE" = measure ]; then
  : "${SKIP_TESTS:=1}" "${PROFILE_S:=0}" "${OVERHEAD_S:=0}" "${REPORTS:=0}" "${TIMELINE_S:=0}" "${NCU_S:=0}"
  : "${EXPLAIN:=0}" "${PREWARM:=0}" "${SWEEP_FIRST:=1}" "${AB_S:=175}" "${RESERVE_S:=20}"
  : "${AB_VARIANTS:=onestep ow8 mma blocks6+states mma+blocks6+states onestep_small nreg128}" "${TOTAL_S:=290}"
elif [ "$MODE" = tests ]; then
  # The quick tests 175 s (ea31a13's took 155 s with 16 workers and warm caches, and ran out of their 120 s
  # with 12), auto's choice, ncu of the one-step kernel (45 s, with its source page: ncu collects for two
  # thirds of a limit, and the mended kernel runs the whole task, where the 35 s of ea31a13's run profiled
  # a build that stopped after the support pass), the register reports
  # (nvcc's in the background from the start, Triton's 30 s in the reserve at the end). The Triton one-step
  # tests, the CUDA backward's and Triton's ncu, the mma, blocks6+states and nreg128 switches' tests only
  # when asked (TONESTEP_TESTS_S=50, NCU_S=40, NCU_TRITON_S=35, MMA_TESTS_S, STATES_TESTS_S, NREG_TESTS_S):
  # ea31a13's run left them no time. Every stage's limit is cut to the time left. A call with the quick
  # tests off (CUDA_TESTS_S=0 TRITON_TESTS_S=0: a later call for a switch's tests or an ncu alone) also
  # leaves out what the first call gave, auto's choice and the register reports: the nvcc report alone takes
  # about 3 minutes, and the run waits for it until its end.
  if [ "${CUDA_TESTS_S:-}" = 0 ] && [ "${TRITON_TESTS_S:-}" = 0 ]; then : "${EXPLAIN:=0}" "${REPORTS:=0}"; fi
  : "${SKIP_SWEEP:=1}" "${PROFILE_S:=0}" "${OVERHEAD_S:=0}" "${TIMELINE_S:=0}" "${NCU_S:=0}" "${NCU_LOWRANK_S:=0}"
  : "${NCU_ONESTEP_S:=45}" "${NCU_TRITON_S:=0}" "${TONESTEP_TESTS_S:=0}" "${TEST_WORKERS:=16}"
  : "${CUDA_TESTS_S:=110}" "${TRITON_TESTS_S:=65}" "${MMA_TESTS_S:=0}" "${STATES_TESTS_S:=0}" "${TOTAL_S:=285}"
  : "${RESERVE_S:=35}"
fi
if [ "$QUICK" = 1 ]; then
  TOTAL_S="${TOTAL_S:-$(( 450 + ${AB_S:-0} ))}"  # the A/B, when asked for, gets its own time on top
  SWEEP_S="${SWEEP_S:-75}"  # the quick sweep measured 30 s on the H200 without T=1024
  # T=1024 too: G2's table has three batch sizes (25, 1024, 65536), each in the same run as vmap.
  SWEEP_ARGS="${SWEEP_ARGS:---tasks 25 1024 65536 --steps 1 5 --width 40 128 --methods cuda triton factored vmap --warmup 1 --repeats 3 --max-seconds 3}"
  BUILD_S="${BUILD_S:-150}"
  CUDA_TESTS_S="${CUDA_TESTS_S:-90}"
  TRITON_TESTS_S="${TRITON_TESTS_S:-60}"
  OVERHEAD_S="${OVERHEAD_S:-40}"
  OVERHEAD_ARGS="${OVERHEAD_ARGS:---seconds 1 --rounds 3}"
  PROFILE_S="${PROFILE_S:-45}"
  NCU_S="${NCU_S:-0}"  # ncu only when asked (NCU_S=60)
fi
TOTAL_S="${TOTAL_S:-470}"
BUILD_S="${BUILD_S:-180}"
CUDA_TESTS_S="${CUDA_TESTS_S:-100}"
TRITON_TESTS_S="${TRITON_TESTS_S:-120}"
TESTS_S=$(( CUDA_TESTS_S + TRITON_TESTS_S ))
RESERVE_S="${RESERVE_S:-50}"  # the Triton register report (30 s) and the summary
START=$SECONDS
left() { echo $(( TOTAL_S - RESERVE_S - (SECONDS - START) )); }
CURRENT_STAGE="start"
stage() { CURRENT_STAGE="$*"; echo "== [$(( SECONDS - START ))s] $*"; }
# The stages that failed or ran out of time: each written to failed.txt as it ends (an outer timeout
# may end the run before the summary), listed at the end, and the script then exits 1 (after writing
# everything it could: a pack after it, joined with `;`, still runs).
FAILED=()
rm -f "$DIR/failed.txt"
fail() { FAILED+=("$1"); echo "$1" >> "$DIR/failed.txt"; }
check_rc() { [ "$2" = 0 ] || fail "$1 (exit $2)"; }
# A stage's limit cut to the time left (0 when none): `lim=$(capped 60)`. Under 15 s a stage is skipped.
capped() { local l=$1 r; r=$(left); [ "$r" -lt "$l" ] && l=$r; [ "$l" -lt 0 ] && l=0; echo "$l"; }
too_late() {  # a stage that cannot start in time: said, and listed
  if [ "$2" -lt 15 ]; then stage "$1: skipped, ${2}s for it"; fail "$1 (not run: ${2}s for it)"; return 0; fi
  return 1
}

# test_backends.py's float32 comparisons with the reference (every option, the GPU sizes) of one backend
# under a switch, for each "variant|limit" given (a limit of 0 skips it; float64 is left out: the switches
# are float's). The variant is the A/B's name (ab_variants.sh's ab_resolve gives its backend and switches),
# so the tests run the very kernel the A/B's row measures. Stage by stage, as the other tests: into
# tests.log, each failure listed. Its locals take ab_resolve's answers, so the A/B's own are left alone.
switch_tests() {
  local entry variant limit rc setting method widths steps tasks
  for entry in "$@"; do
    IFS='|' read -r variant limit <<< "$entry"
    [ "$limit" -gt 0 ] || continue
    ab_resolve "$variant" || { fail "tests of $variant (no such A/B variant)"; continue; }
    limit=$(capped "$limit")
    too_late "tests of $method with $setting" "$limit" && continue
    stage "tests of $method with $setting: test_backends' float32 comparisons (limit ${limit}s) -> $DIR/tests.log"
    echo "===== $method, $setting: tests/test_backends.py" >> "$DIR/tests.log"
    # shellcheck disable=SC2086  # a setting may set several variables
    env $setting FASTMAML_TEST_BACKENDS="$method" timeout "$limit" python -m pytest \
      tests/test_backends.py -q -rfE ${XDIST[@]+"${XDIST[@]}"} -p no:cacheprovider \
      -k "gpu_sizes or (maml_matches_reference and f32)" >> "$DIR/tests.log" 2>&1
    rc=$?
    echo "tests of $method with $setting: exit code $rc"
    check_rc "tests of $method with $setting" $rc
    tail -n 2 "$DIR/tests.log" | cut -c1-300
  done
}

# shellcheck source=benchmarks/ab_variants.sh
source "$REPO/benchmarks/ab_variants.sh"  # AB_DEFAULT, ab_variant, ab_resolve, child_pids, stop_prewarm

# An outer `timeout` ends bash and its process group only: every stage's own `timeout` leads a group of
# its own (and the register report another), so pytest or ncu would go on using the GPU and writing the
# logs while the results are packed, or into the next call. On any exit the stages still running are
# ended (each inner timeout passes the signal to its group), and an interrupted run says where.
FINISHED=0
on_exit() {
  if [ "$FINISHED" != 1 ]; then
    echo "interrupted during: $CURRENT_STAGE ($(( SECONDS - START ))s)" | tee -a "$DIR/failed.txt" >> "$DIR/summary.txt"
  fi
  [ -n "${PTXAS_PID:-}" ] && kill -0 "$PTXAS_PID" 2>/dev/null && stop_report
  [ -n "${PREWARM_PID:-}" ] && kill "$PREWARM_PID" $(child_pids "$PREWARM_PID") 2>/dev/null
  local pid
  for pid in $(child_pids $$); do [ "$pid" = "$TEE_PID" ] || kill "$pid" 2>/dev/null; done
  exec >&- 2>&-  # then tee, the last child, ends with its input
  wait "$TEE_PID" 2>/dev/null
}
trap on_exit EXIT
# The background register report: its group (before its late write of ptxas.txt), and each of its
# `timeout`s, which leads a group of its own and takes its nvcc's children down with it.
# Found through /proc, not pkill: procps may be missing, and then the niced compiles would run on. Each
# command line is read as one line (a `bash -c` script's own lines must not match).
stop_report() {
  kill -- -"$PTXAS_PID" 2>/dev/null
  local f pid
  for f in /proc/[0-9]*/cmdline; do
    pid=${f%/cmdline}; pid=${pid#/proc/}
    { tr '\0\n' '  ' < "$f"; } 2>/dev/null | grep -q "^timeout 300 nvcc .*fastmaml_ptxas_" && kill "$pid" 2>/dev/null
  done
}

# Some images have only `python3`: give the stages a `python` that is it.
if ! command -v python >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
  mkdir -p /tmp/fastmaml_shim && ln -sf "$(command -v python3)" /tmp/fastmaml_shim/python
  export PATH="/tmp/fastmaml_shim:$PATH"
fi
# The GPU build compiles for the visible card only (torch's default) unless told otherwise. A carried
# prebuilt library (.gpu_prebuilt, benchmarks/prebuilt.py) built for this card's capability names its own
# list (9.0a for a 9.0 card), so that the build finds it instead of compiling the same kernels again.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  cap="$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')"
  packed="$(sed -n 's/.*"arch_list": *"\([^"]*\)".*/\1/p' "$REPO"/.gpu_prebuilt/*/prebuilt.json 2>/dev/null | head -1)"
  if [ -n "$cap" ] && [ -n "$packed" ] && [ "${packed%a}" = "$cap" ]; then
    export TORCH_CUDA_ARCH_LIST="$packed"
  elif [ -n "$cap" ]; then
    export TORCH_CUDA_ARCH_LIST="$cap"
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Every float32 comparison of the tests appends its errors here (tests/_reference_loop.py,
# record_float32_error): the figures that the float32 bounds are to be set from.
export FASTMAML_ERROR_LOG="$DIR/float32_errors.jsonl"
if [ -z "${FASTMAML_COMMIT:-}" ]; then
  FASTMAML_COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
fi
# A tree that differs from its commit is labelled so: the rule of benchmarks/_harness.py's commit(), which
# labels the rows (here for env.txt and the stage lines, without importing the library first).
if [ -n "$(git -C "$REPO" status --porcelain -- fastmaml csrc benchmarks 2>/dev/null)" ] \
   && [[ "$FASTMAML_COMMIT" != *+dirty ]]; then
  FASTMAML_COMMIT="$FASTMAML_COMMIT+dirty"
fi
export FASTMAML_COMMIT

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu
  SWEEP=(--tasks 25 --steps 1 --width 40 --warmup 1 --repeats 3 --max-seconds 20)
else
  DEVICE=cuda
  # shellcheck disable=SC2206
  SWEEP=(${SWEEP_ARGS:---tasks 25 1024 65536 --steps 1 5 --width 40 128 --warmup 2 --repeats 10 --max-seconds 6})
fi

# ---- environment -------------------------------------------------------------------------------
stage "environment -> $DIR/env.txt (dry run: $DRY_RUN, commit $FASTMAML_COMMIT)"
{
  date -Is
  echo "commit: $FASTMAML_COMMIT"
  git -C "$REPO" diff --stat 2>/dev/null | tail -20
  # Switches set in the caller's shell apply to every stage: a variant would pass for the default.
  env | grep -E '^(FASTMAML|TRITON|TORCH|CUDA|PYTORCH)_' | sort | sed 's/^/env: /'
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi || echo "nvidia-smi failed"
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2 || echo "nvcc: not found"
  for tool in ncu nsys cuobjdump; do echo "$tool: $(command -v $tool || echo not found)"; done
  timeout 60 python - <<'EOF' || echo "python environment check failed"
import sys, platform, torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as err:
    print("triton: not importable:", err)
EOF
} > "$DIR/env.txt" 2>&1
grep -E "^(torch|gpu|triton|python)|MiB|not found" "$DIR/env.txt" | head -8

# ---- build -------------------------------------------------------------------------------------
# Asking every backend whether it can run builds what it needs (the C++ extension, the CUDA kernels).
build_extension() {
  timeout "$1" python - <<'EOF'
import time
import fastmaml
from fastmaml.dispatch import get_backend
for name in fastmaml.list_backends():
    t0 = time.perf_counter()
    try:
        why = get_backend(name).unavailable()
    except Exception as err:
        why = f"unavailable() raised {type(err).__name__}: {err}"
    print(f"backend {name:<10} {'available' if why is None else 'unavailable: ' + why} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
EOF
}
stage "build (limit ${BUILD_S}s) -> $DIR/build.log"
{
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: no pip install (fastmaml runs from PYTHONPATH=$REPO)"
  else
    timeout 60 python -m pip install -e . --no-deps --no-build-isolation -q \
      || echo "pip install -e . failed; running from PYTHONPATH=$REPO"
  fi
  # A library built ahead for this machine's torch, sources and architectures (benchmarks/prebuilt.py; the
  # device call carries .gpu_prebuilt): put where the build looks, it spares the build its compile.
  if [ -d "$REPO/.gpu_prebuilt" ]; then
    timeout 60 python benchmarks/prebuilt.py install "$REPO/.gpu_prebuilt" || echo "prebuilt: install failed"
  fi
  build_extension "$BUILD_S" || { rc=$?; echo "build step failed or timed out"; check_rc build $rc; }
  # A prebuilt library that does not load here (the GPU machine's system libraries differ from the builder's):
  # removed, and the extension compiled here after all.
  if grep -q "^prebuilt: installed" "$DIR/build.log" && grep -q "loading the C++ extension failed" "$DIR/build.log"; then
    timeout 60 python benchmarks/prebuilt.py uninstall
    build_extension "$BUILD_S" || { rc=$?; echo "build step failed or timed out"; check_rc build $rc; }
  fi
} > "$DIR/build.log" 2>&1
grep -E "^backend|^prebuilt|failed" "$DIR/build.log" | cut -c1-200

# ---- register and spill report (G2), in the background while the rest runs ----------------------
if command -v nvcc >/dev/null 2>&1 && [ "${REPORTS:-1}" = 1 ]; then
  stage "nvcc -Xptxas -v of every CUDA kernel variant (background) -> $DIR/ptxas.txt"
  ptx_arch="$(echo "${TORCH_CUDA_ARCH_LIST:-9.0}" | tr ';' ' ' | awk '{print $1}' | tr -d '.')"
  # Every file at once, as the build compiles them, but at most one a core: each has 300 s (on 2 cores the
  # six files all at once ran past it).
  # Niced, on half the cores: it runs beside the sweep, whose small-T cells are host-bound.
  set -m  # its own process group, so that a report out of time can be stopped whole (nvcc's children too)
  ( printf '%s\n' csrc/cuda/*.cu | nice -n 19 xargs -P "$(( $(nproc 2>/dev/null || echo 4) / 2 + 1 ))" -I{} sh -c '
      out="/tmp/fastmaml_ptxas_$(basename "$1")"
      timeout 300 nvcc -arch="sm_$2" -O3 -Xptxas -v -c "$1" -I csrc -o "$out.o" > "$out.txt" 2>&1 \
        || echo "nvcc failed on $1" >> "$out.txt"' _ {} "$ptx_arch"
    cat /tmp/fastmaml_ptxas_*.cu.txt | c++filt > "$DIR/ptxas.txt"
    # The products' inner loops: FFMAs against loads and address arithmetic (a static count).
    if command -v cuobjdump >/dev/null 2>&1; then
      for o in /tmp/fastmaml_ptxas_*.cu.o; do cuobjdump -sass "$o" 2>/dev/null; done \
        | python benchmarks/kernel_registers.py --sass-from - >> "$DIR/ptxas.txt" 2>&1
    fi ) &
  PTXAS_PID=$!
  set +m
fi

# ---- sweep -------------------------------------------------------------------------------------
# First after the build: the throughput table is the check's main result (G2), and a GPU session's run
# must not lose it to slow tests (the H200's first quick run did). At most SWEEP_S seconds (0: no cap),
# and the profile and the A/B keep their time (PROFILE_S, 60 s by default, 0 skips it; AB_S when set).
# With SWEEP_FIRST=1 (--measure) a slow build takes its time from the A/B, not from the sweep.
# What the run leaves the sweep now: the time left less that of the later stages it must not take.
sweep_room() {
  echo $(( $(left) - ( DRY_RUN == 1 ? 0 : ${PROFILE_S:-60} + ${TIMELINE_S:-30} + ( ${SWEEP_FIRST:-0} == 1 ? 0 : ${AB_S:-0} ) ) ))
}
budget=$(sweep_room)
if [ "${SWEEP_S:-0}" -gt 0 ] && [ "$budget" -gt "${SWEEP_S}" ]; then budget=$SWEEP_S; fi
if [ "${SKIP_SWEEP:-0}" = 1 ]; then
  stage "sweep: skipped (SKIP_SWEEP=1)"
elif [ "$budget" -lt 30 ]; then
  stage "sweep: skipped, only ${budget}s left"
else
  # The Triton kernels the sweep's first calls would compile one after another, compiled first on every core
  # (benchmarks/compile_ahead.py: the same calls in parallel processes; Triton's disk cache keeps them), in
  # at most COMPILE_AHEAD_S (60 s, 0 skips it; at most half the sweep's limit).
  ahead="${COMPILE_AHEAD_S:-60}"
  [ "$ahead" -gt $(( budget / 2 )) ] && ahead=$(( budget / 2 ))
  if [ "$DRY_RUN" != 1 ] && [ "$ahead" -ge 15 ]; then
    # With them the A/B's Triton variants that can run (25 s each at least), whose slot of about 30 s two to
    # four compiles would fill.
    ahead_variants=()
    if [ "${AB_S:-0}" -gt 0 ]; then
      for v in $(echo ${AB_VARIANTS:-$AB_DEFAULT} | tr ' ' '\n' | head -n $(( AB_S / 25 ))); do
        if ab_resolve "$v"; then
          case "$method" in triton|factored) ahead_variants+=(--variant "$setting|$method|65536|$steps|$widths") ;; esac
        fi
      done
    fi
    stage "compiling the sweep's Triton kernels ahead (limit ${ahead}s) -> $DIR/compile_ahead.log"
    timeout -k 5 "$ahead" python benchmarks/compile_ahead.py --device "$DEVICE" --order second "${SWEEP[@]}" \
      ${ahead_variants[@]+"${ahead_variants[@]}"} > "$DIR/compile_ahead.log" 2>&1
    rc=$?
    [ $rc = 124 ] && echo "compile ahead: stopped after ${ahead}s (the sweep compiles the rest)" >> "$DIR/compile_ahead.log"
    grep -E "^compile ahead|failed" "$DIR/compile_ahead.log" | head -6 | cut -c1-200
    # Its time comes from the later stages as the build's does (from the A/B with SWEEP_FIRST=1), else from
    # the sweep's own.
    cap=$(sweep_room)
    [ "$budget" -gt "$cap" ] && budget=$cap
    [ "$budget" -lt 30 ] && budget=30  # the sweep is the run's main result: never under its minimum
  fi
  stage "sweep on $DEVICE (limit ${budget}s) -> $DIR/throughput.csv, throughput.png, sweep.log"
  timeout "$budget" python benchmarks/bench_throughput.py --device "$DEVICE" --order second "${SWEEP[@]}" \
    --time-budget $(( budget - 25 )) --out "$DIR" > "$DIR/sweep.log" 2>&1
  rc=$?
  [ $rc = 124 ] && echo "sweep: timed out after ${budget}s (the CSV keeps the rows measured)" | tee -a "$DIR/sweep.log"
  echo "sweep exit code $rc (1: a method failed its check)"
  check_rc sweep $rc
  grep -E "failed|oom|Error" "$DIR/sweep.log" | head -8 | cut -c1-200
fi

# ---- where the time goes (G2) ------------------------------------------------------------------
if [ "$DRY_RUN" != 1 ] && [ "${PROFILE_S:-60}" -gt 0 ] && lim=$(capped "${PROFILE_S:-60}") && ! too_late profile "$lim"; then
  # PROFILE_ARGS replaces the cell and methods (profile_kernels.py's options; --steps and --width take
  # lists), PROFILE_SETTING sets switches for it, as NCU_SETTING does for ncu. By default G2's W=128 cell,
  # triton last: at that width it is the slowest by far, and the limit may end it.
  : "${PROFILE_ARGS:=--methods cuda factored vmap triton --tasks 65536 --steps 5 --width 128}"
  stage "kernels by GPU time: ${PROFILE_ARGS} ${PROFILE_SETTING:-} (limit ${lim}s) -> $DIR/profile.txt"
  echo "===== torch.profiler: ${PROFILE_ARGS} ${PROFILE_SETTING:-(defaults)}" > "$DIR/profile.txt"
  # shellcheck disable=SC2086  # the options and a setting of several variables are words
  ( cd benchmarks && env ${PROFILE_SETTING:-} timeout "$lim" python profile_kernels.py $PROFILE_ARGS \
      --warmup 1 --iters 2 ) >> "$DIR/profile.txt" 2>&1
  check_rc profile $?
  grep -E "per iteration|failed|skipped" "$DIR/profile.txt" | head -12
fi
# The CUDA reverse sweep's time by phase: one training call's barrier timeline (csrc/cuda/timeline.h),
# each phase named by the barrier that ends it, at T=25 (a task alone on a multiprocessor) and T=65,536
# (as many as fit), compared phase by phase (benchmarks/phase_timeline.py).
if [ "$DRY_RUN" != 1 ] && [ "${TIMELINE_S:-30}" -gt 0 ] && lim=$(capped "${TIMELINE_S:-30}") && ! too_late timeline "$lim"; then
  stage "the cuda reverse sweep's phases at T=25 and 65536 (limit ${lim}s) -> $DIR/timeline.txt, $DIR/timeline/"
  # shellcheck disable=SC2086
  timeout "$lim" python benchmarks/phase_timeline.py ${TIMELINE_ARGS:---tasks 25 65536 --steps 5 1 --width 40 128} \
    --out "$DIR/timeline" > "$DIR/timeline.txt" 2>&1
  rc=$?
  echo "timeline exit code $rc"
  check_rc timeline $rc
  grep -E "^== K=|^cycles a task: |failed" "$DIR/timeline.txt" | head -12 | cut -c1-200
fi

# The Triton kernels of the A/B's triton and factored variants, compiled ahead in the background while the
# tests run: a variant's kernels (other warps, layouts, chunks) are new to Triton's cache, and compiling
# them inside the A/B took its share of the time (the scratch layout's backward alone compiles for about
# 30 s). One call of each variant at T=64 (the kernels' sizes are runtime values: the same compiled
# kernels as at T=65,536) fills the cache on disk that the A/B's processes then load from; its check
# against the reference is an early word on the variant. Stopped when the A/B starts (after up to
# PREWARM_WAIT_S=30 more seconds), so that it never runs beside a timed call. PREWARM=0 skips it.
PREWARM_PID=""
if [ "$DRY_RUN" != 1 ] && [ "${AB_S:-0}" -gt 0 ] && [ "${PREWARM:-1}" = 1 ]; then
  stage "compiling the A/B's Triton variants in the background -> $DIR/prewarm.log"
  (
    for v in ${AB_VARIANTS:-$AB_DEFAULT}; do
      ab_resolve "$v" || continue
      [ "$method" = cuda ] && continue
      echo "== $v: $setting ($method)"
      # shellcheck disable=SC2086  # a variant may set several variables
      env $setting python benchmarks/bench_throughput.py --device cuda --order second --methods "$method" \
        --tasks 64 --steps 1 5 --width $widths --warmup 0 --repeats 1 --max-seconds 60 \
        --out "/tmp/fastmaml_prewarm_$v" 2>&1 | grep -E "tasks/s|failed|skipped|Error" | cut -c1-200
    done
    echo "prewarm done"
  ) > "$DIR/prewarm.log" 2>&1 &
  PREWARM_PID=$!
fi

# ---- tests -------------------------------------------------------------------------------------
if [ "${SKIP_TESTS:-0}" = 1 ]; then
  stage "tests: skipped (SKIP_TESTS=1)"
elif [ "$DRY_RUN" = 1 ]; then
  stage "tests: collection only in a dry run (limit ${TESTS_S}s) -> $DIR/tests.log"
  timeout "$TESTS_S" python -m pytest tests -q --co > "$DIR/tests.log" 2>&1
  rc=$?
  echo "tests exit code $rc"
  check_rc "test collection" $rc
else
  XDIST=()
  python -c "import xdist" >/dev/null 2>&1 && XDIST=(-n "${TEST_WORKERS:-12}")
  : > "$DIR/tests.log"
  if [ "$QUICK" = 1 ]; then
    # One run for the GPU backends: every case of tests/test_backends.py (G2's first must-show: every
    # option, the sinusoid size, 20,000 tasks, width 128) and the tests new with G2/G3 (with the launch
    # report under the sweep's cuda rows; the factored backend's CUDA lowrank_add kernel; NaN spreading
    # as in the reference through each GPU kernel's ReLU; an infinity under tanh; no gradient for the
    # inputs a call does not read).
    # CUDA_TESTS_S=0 TRITON_TESTS_S=0 skip them (a call for the switches' tests or ncu alone; `timeout 0`
    # would not limit them at all).
    # Verbose: a run its limit ends prints no summary, and at ea31a13 its failures were counted but not named
    # (a rerun without a limit cost 155 s); each test's line names them as they happen.
    if [ "$TESTS_S" -le 0 ]; then
      stage "quick tests: skipped (CUDA_TESTS_S + TRITON_TESTS_S = 0)"
    else
      lim=$(capped "$TESTS_S")
      stage "quick tests: test_backends, sync-free calls, CUDA graphs, compile (limit ${lim}s) -> $DIR/tests.log"
      FASTMAML_TEST_BACKENDS=cuda,triton,factored timeout "$lim" python -m pytest tests/test_backends.py \
        tests/test_gpu_overhead.py tests/test_overhead.py tests/test_lowrank.py tests/test_triton_maml.py \
        tests/test_benchmark_tools.py tests/test_same_function.py tests/test_onestep.py -v -rfE "${XDIST[@]}" \
        -p no:cacheprovider \
        -k "test_backends or gpu_overhead or compile or on_the_gpu or wide_nets or launch_report or cuda_kernel or cuda_lowrank or nan_spreads or an_infinity or unused_inputs or cuda_op_matches or onestep_kernel" \
        >> "$DIR/tests.log" 2>&1
      rc=$?
      echo "quick tests exit code $rc"
      check_rc "quick tests" $rc
      if [ "$rc" = 124 ]; then
        echo "quick tests: out of time after ${lim}s; the failures so far:"
        grep -E "(FAILED|ERROR) tests/" "$DIR/tests.log" | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' | head -20 | cut -c1-300
      else
        tail -n 4 "$DIR/tests.log" | cut -c1-300
      fi
    fi
    # The Triton one-step kernel (FASTMAML_TRITON_ONESTEP=1, the A/B's tonestep), a stage of its own: each of
    # its GPU tests compiles a kernel variant (10-20 s without pytest-xdist), which would push the quick tests
    # past their limit. The compiled kernel against the CPU op at the sinusoid size with 20,000 tasks, its
    # chunked form at width 128 (ReLU), and the backend under the switch; TONESTEP_TESTS_S (0 skips them).
    limit=${TONESTEP_TESTS_S:-55}
    if [ "$limit" -gt 0 ]; then
      limit=$(capped "$limit")
      if ! too_late "tests of the Triton one-step kernel" "$limit"; then
        stage "tests of the Triton one-step kernel: three GPU tests (limit ${limit}s) -> $DIR/tests.log"
        echo "===== triton one-step: tests/test_triton_onestep.py" >> "$DIR/tests.log"
        timeout "$limit" python -m pytest tests/test_triton_onestep.py -q -rfE -p no:cacheprovider \
          -k "(gpu_kernel_matches and sinusoid and f32_one) or (gpu_chunked and relu) or gpu_backend_switch" \
          >> "$DIR/tests.log" 2>&1
        rc=$?
        echo "Triton one-step tests: exit code $rc"
        check_rc "tests of the Triton one-step kernel" $rc
        tail -n 2 "$DIR/tests.log" | cut -c1-300
      fi
    fi
    # The switches' own tests, so that an A/B row is a kernel the tests have passed: the tensor-core
    # products (FASTMAML_CUDA_MMA=1: the A/B's `mma`), MMA_TESTS_S; the 6-block sweep with the support states
    # apart (FASTMAML_CUDA_MIN_BLOCKS=6, FASTMAML_CUDA_STATES=global: `blocks6+states`), STATES_TESTS_S;
    # Triton's scratch layout capped at 128 registers (`nreg128`), NREG_TESTS_S (0 unless asked).
    # Not the CUDA one-step switch (FASTMAML_CUDA_ONESTEP=1): these cases ask for input gradients or weight
    # the query losses, which the one-step kernel refuses, so none would run it. The quick tests'
    # `cuda_op_matches` and `onestep_kernel` run it, against the CPU op and through the backend under the switch.
    switch_tests "mma|${MMA_TESTS_S:-40}" "blocks6+states|${STATES_TESTS_S:-30}" "nreg128|${NREG_TESTS_S:-0}"
  fi
  for backend in $( [ "$QUICK" = 1 ] || echo "${GPU_TEST_BACKENDS:-cuda triton factored}" ); do
    files=(tests/test_backends.py)
    limit=$CUDA_TESTS_S
    if [ "$backend" = triton ]; then files+=(tests/test_triton_maml.py tests/test_triton_onestep.py); limit=$TRITON_TESTS_S; fi
    if [ "$backend" = factored ]; then files+=(tests/test_lowrank.py tests/test_factored.py); fi
    # Every backend computes the model's function or refuses (y requiring grad, frozen parameters, ...):
    # its cases cover cpu, triton and cuda at once, so they run once, with the cuda tests.
    # The G3 tests (no synchronisation, CUDA graphs, torch.compile of every fused backend) too.
    if [ "$backend" = cuda ]; then
      files+=(tests/test_same_function.py tests/test_distributed.py tests/test_overhead.py tests/test_gpu_overhead.py
              tests/test_onestep.py)
    fi
    limit=$(capped "$limit")
    too_late "tests of $backend" "$limit" && continue
    stage "tests of $backend: ${files[*]} (limit ${limit}s) -> $DIR/tests.log"
    echo "===== $backend: ${files[*]}" >> "$DIR/tests.log"
    FASTMAML_TEST_BACKENDS=$backend timeout "$limit" python -m pytest "${files[@]}" -q -rfE "${XDIST[@]}" \
      -p no:cacheprovider >> "$DIR/tests.log" 2>&1
    rc=$?
    [ $rc = 124 ] && echo "tests of $backend: timed out after ${limit}s" | tee -a "$DIR/tests.log"
    echo "tests of $backend exit code $rc"
    check_rc "tests of $backend" $rc
    tail -n 4 "$DIR/tests.log" | cut -c1-300
  done
fi

# ---- what auto picks ---------------------------------------------------------------------------
if [ "$DRY_RUN" != 1 ] && [ "${EXPLAIN:-1}" = 1 ] && lim=$(capped 60) && ! too_late "auto's choice" "$lim"; then
  stage "auto's choice on the GPU (small and large batch) -> $DIR/tests.log"
  timeout "$lim" python - >> "$DIR/tests.log" 2>&1 <<'EOF'
import torch, fastmaml
for T in (25, 65536):
    dims, g = [1, 40, 40, 1], torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(o, i, device="cuda", generator=g) * 0.3 if k == 0 else torch.zeros(o, device="cuda")
              for i, o in zip(dims[:-1], dims[1:]) for k in (0, 1)]
    xs, ys, xq, yq = (torch.randn(T, 10, 1, device="cuda", generator=g) for _ in range(4))
    print(fastmaml.explain(params, xs, ys, xq, yq, inner_steps=1))
EOF
  check_rc "auto's choice" $?
  grep -E "chosen|rejected: slower" "$DIR/tests.log" | tail -4
fi

# ---- ncu (G2): after the tests, which G2's first must-show needs more --------------------------------
if [ "$DRY_RUN" != 1 ] && command -v ncu >/dev/null 2>&1 \
   && { [ "${NCU_S:-60}" -gt 0 ] || [ "${NCU_LOWRANK_S:-0}" -gt 0 ] || [ "${NCU_ONESTEP_S:-0}" -gt 0 ] \
        || [ "${NCU_TRITON_S:-0}" -gt 0 ]; }; then
  stop_prewarm  # its compiles and GPU calls would run beside the profiled launches
fi
# One ncu run into profile.txt: `ncu_launches LIMIT TAG SETTING REGEX "LAUNCH OPTIONS" PROFILE_KERNELS_ARGS...`
# (SETTING: switches for its environment, "" for none), with the sections every ncu stage reads: occupancy,
# stall reasons (WarpStateStats: long scoreboard, waiting on loads; no instruction, fetch), memory traffic,
# the executed instruction mix, and SourceCounters: the report (ncu_TAG.ncu-rep, the sources in it) gives
# each source line its instructions executed and stall samples, which benchmarks/ncu_source.py sums into
# profile.txt (the instruction mix by opcode, the instructions a task, the lines that issue the most) and
# ncu_TAG_lines.csv (the pages' CSVs are kept under 6 MB, the report under 4 MB). Returns ncu's exit code, 3
# when no launch was profiled, 4 when the source page could not be read.
ncu_launches() {
  local lim=$1 tag=$2 setting=$3 regex=$4 launches=$5 tasks=0 prev="" a rc t0=$SECONDS
  shift 5
  for a in "$@"; do [ "$prev" = --tasks ] && tasks=$a; prev=$a; done
  local rep="$DIR/ncu_$tag.ncu-rep" lines="$DIR/ncu_${tag}_source.csv" sass="$DIR/ncu_${tag}_sass.csv"
  rm -f "$rep" "$lines" "$sass" "$DIR/ncu_${tag}_lines.csv"  # a folder used before must not lend its report
  # The collection gets the limit less 25 s (at most a third of it) for reading the report back.
  local post=$(( lim / 3 < 25 ? lim / 3 : 25 ))
  # shellcheck disable=SC2086  # a setting may set several variables; the launch options are words
  ( cd benchmarks && env $setting timeout "$(( lim - post ))" ncu --clock-control none --kernel-name regex:"$regex" \
      $launches --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section InstructionStats --section SourceCounters --import-source yes \
      -f -o "$DIR/ncu_$tag" python profile_kernels.py "$@" --warmup 0 --iters 1 --no-profiler ) \
      >> "$DIR/profile.txt" 2>&1
  rc=$?
  if [ ! -f "$rep" ]; then
    echo "ncu ($tag): no report (exit $rc; a kernel name that matched nothing profiles no launch)" >> "$DIR/profile.txt"
    [ "$rc" = 0 ] && rc=3
    return $rc
  fi
  # The sections as ncu printed them before the report was kept; then the source page in both views: the
  # `sass` view lists each launch's instructions once (the totals), `cuda,sass` each source line's (an
  # instruction of inlined code under every line it came from). What is left of the limit, 10 s at least
  # for each: the reverse sweep's page lists some 80,000 instructions.
  timeout 10 ncu -i "$rep" --page details >> "$DIR/profile.txt" 2>&1
  local view out ok=1 left
  for view in sass cuda,sass; do
    out=$sass; [ "$view" = sass ] || out=$lines
    left=$(( lim - (SECONDS - t0) )); [ "$left" -lt 10 ] && left=10
    if ! timeout "$left" ncu -i "$rep" --page source --print-source "$view" --csv > "$out" 2>> "$DIR/profile.txt"; then
      echo "ncu source page ($tag, $view) failed or ran out of time; it began:" >> "$DIR/profile.txt"
      head -c 600 "$out" >> "$DIR/profile.txt"; ok=0
    fi
  done
  if [ "$ok" = 1 ]; then
    echo "===== ncu source lines ($tag)" >> "$DIR/profile.txt"
    timeout 60 python benchmarks/ncu_source.py "$lines" --sass "$sass" --top 25 --tasks "$tasks" \
      --lines-out "$DIR/ncu_${tag}_lines.csv" >> "$DIR/profile.txt" 2>&1 || ok=0
  fi
  # The pack comes back in one file of at most 16 MiB: the big ones stay behind (no ncu here reads a report).
  for a in "$lines" "$sass"; do [ "$(stat -c %s "$a" 2>/dev/null || echo 0)" -gt 6000000 ] && rm -f "$a"; done
  [ "$(stat -c %s "$rep" 2>/dev/null || echo 0)" -gt 4000000 ] && rm -f "$rep"
  [ "$rc" = 0 ] && [ "$ok" = 0 ] && rc=4  # the profile ran; its source page did not come
  return $rc
}
# The one-step kernel first (G2's redesign for K=1, never profiled): one launch at T=8192, K=1, W=40.
if [ "$DRY_RUN" != 1 ] && command -v ncu >/dev/null 2>&1 && [ "${NCU_ONESTEP_S:-0}" -gt 0 ] \
   && lim=$(capped "$NCU_ONESTEP_S") && ! too_late "ncu of the one-step kernel" "$lim"; then
  stage "ncu of one one-step launch at T=8192, K=1, W=40 (limit ${lim}s) -> $DIR/profile.txt"
  echo "===== ncu, FASTMAML_CUDA_ONESTEP=1" >> "$DIR/profile.txt"
  ncu_launches "$lim" onestep FASTMAML_CUDA_ONESTEP=1 onestep_kernel "--launch-count 1" \
    --methods cuda --tasks 8192 --steps 1 --width 40
  rc=$?
  echo "ncu (one-step) exit code $rc"
  check_rc "ncu of the one-step kernel" $rc
fi
# ncu apart from the profile, so that a second run can ask for it alone (PROFILE_S=0 NCU_S=60).
if [ "$DRY_RUN" != 1 ] && command -v ncu >/dev/null 2>&1 && [ "${NCU_S:-60}" -gt 0 ] \
   && lim=$(capped "${NCU_S:-60}") && ! too_late ncu "$lim"; then
  # Width 40 (NCU_WIDTH): the workspace in shared memory, the products' LDS loop; the 2026-11-30 run
  # profiled W=128. NCU_SETTING (none by default) profiles the sweep under switches, e.g. the A/B's winner:
  # NCU_SETTING="FASTMAML_CUDA_MMA=1".
  stage "ncu of one cuda backward launch at T=8192, K=5, W=${NCU_WIDTH:-40} ${NCU_SETTING:-} (limit ${lim}s)"
  echo "===== ncu, cuda backward, K=5, W=${NCU_WIDTH:-40} ${NCU_SETTING:-(defaults)}" >> "$DIR/profile.txt"
  ncu_launches "$lim" "bwd_w${NCU_WIDTH:-40}" "${NCU_SETTING:-}" bwd_kernel "--launch-count 1" --methods cuda \
    --tasks 8192 --steps 5 --width "${NCU_WIDTH:-40}"
  rc=$?
  echo "ncu exit code $rc"
  check_rc ncu $rc
fi

# The Triton training kernel at K=5 (one program a multiprocessor at 255 registers; 0.28x vmap at W=40 on
# the H200, a75ae00): where its instructions and stalls are, by Python line of the kernel.
if [ "$DRY_RUN" != 1 ] && command -v ncu >/dev/null 2>&1 && [ "${NCU_TRITON_S:-0}" -gt 0 ] \
   && lim=$(capped "$NCU_TRITON_S") && ! too_late "ncu of the Triton kernel" "$lim"; then
  stage "ncu of one triton training launch at T=2048, K=5, W=${NCU_TRITON_WIDTH:-40} (limit ${lim}s)"
  echo "===== ncu, triton maml_bwd_kernel" >> "$DIR/profile.txt"
  ncu_launches "$lim" "triton_w${NCU_TRITON_WIDTH:-40}" "" maml_bwd_kernel "--launch-count 1" --methods triton \
    --tasks 2048 --steps 5 --width "${NCU_TRITON_WIDTH:-40}"
  rc=$?
  echo "ncu (triton) exit code $rc"
  check_rc "ncu of the Triton kernel" $rc
fi

# The factored backend's low-rank Triton kernels: two thirds of its time at K=5, W=128 on the H200
# (a75ae00), at about a quarter of the bandwidth the rest of its iteration reached. Launches 7 to 10 of a
# call at T=8192, K=5 (logged through the interpreter): the forward's lowrank_add with four, four and five
# factor pairs, then the written-out sweep's first, the query pass's backward through five pairs (under
# FASTMAML_FACTORED_REVERSE=autograd, the first fused backward).
if [ "$DRY_RUN" != 1 ] && command -v ncu >/dev/null 2>&1 && [ "${NCU_LOWRANK_S:-0}" -gt 0 ]; then
  # Triton's lowrank_add and the extension's CUDA one (FASTMAML_FACTORED_KERNELS), half the limit each.
  for kernels in triton cuda; do
    lim=$(capped $(( NCU_LOWRANK_S / 2 )))
    too_late "ncu of the low-rank kernels ($kernels)" "$lim" && continue
    stage "ncu of four factored low-rank launches ($kernels) at T=8192, K=5, W=128 (limit ${lim}s) -> $DIR/profile.txt"
    echo "===== ncu, FASTMAML_FACTORED_KERNELS=$kernels" >> "$DIR/profile.txt"
    ncu_launches "$lim" "lowrank_$kernels" "FASTMAML_FACTORED_KERNELS=$kernels" "lowrank_" \
      "--launch-skip 6 --launch-count 4" \
      --methods factored --tasks 8192 --steps 5 --width 128
    rc=$?
    echo "ncu (low-rank, $kernels) exit code $rc"
    check_rc "ncu of the low-rank kernels ($kernels)" $rc
  done
fi

# ---- per-call overhead (G3) ---------------------------------------------------------------------
if [ "$DRY_RUN" != 1 ] && [ "${OVERHEAD_S:-90}" -gt 0 ] && lim=$(capped "${OVERHEAD_S:-90}") && ! too_late overhead "$lim"; then
  stop_prewarm  # its compiles and GPU calls would run beside the microsecond timings
  lim=$(capped "$lim")  # again: the wait for the prewarm took from the time left
  stage "overhead of a small training call (limit ${lim}s) -> $DIR/overhead.txt, overhead.json"
  # shellcheck disable=SC2086
  timeout "$lim" python benchmarks/bench_overhead.py --device cuda --tasks 25 --inner-steps 5 \
    ${OVERHEAD_ARGS:---seconds 2 --rounds 5} --json "$DIR/overhead.json" > "$DIR/overhead.txt" 2>&1
  rc=$?
  echo "overhead exit code $rc"
  check_rc overhead $rc
  grep -E "^\|" "$DIR/overhead.txt" | head -4
  if [ $rc != 0 ] && [ $rc != 124 ] && command -v compute-sanitizer >/dev/null 2>&1; then
    # A failure here was once an asynchronous 'illegal memory access' (H200, 2026-11-30), reported after
    # the kernel at fault had finished: memcheck names it. The compiled methods are left out (slow).
    stage "overhead failed: compute-sanitizer memcheck of its eager and graph methods (limit 60s) -> $DIR/overhead.txt"
    echo "===== compute-sanitizer --tool memcheck" >> "$DIR/overhead.txt"
    timeout 60 compute-sanitizer --tool memcheck --print-limit 8 python benchmarks/bench_overhead.py --device cuda \
      --tasks 25 --inner-steps 5 --methods eager,eager+adam,graph,vmap --seconds 0.2 --rounds 1 \
      >> "$DIR/overhead.txt" 2>&1
    echo "compute-sanitizer exit code $?"
    grep -E "Invalid|ERROR SUMMARY|at 0x|by thread" "$DIR/overhead.txt" | head -8 | cut -c1-200
  fi
fi

# ---- A/B of the kernels' switches (G2) -----------------------------------------------------------
# Each variant changes one kernel choice from the default (docs/kernels.md lists the switches), at the
# large-batch cells of G2 (T=65,536, K in {1, 5}, W in {40, 128} unless named); the defaults' own figures
# are the sweep's rows of the same cells. The variants:
#   frevauto FASTMAML_FACTORED_REVERSE=autograd: the factored backend's meta-gradient by autograd through
#            its inner loop (with the fused lowrank_backward), as before its written-out reverse sweep
#   fcuda    FASTMAML_FACTORED_KERNELS=cuda: the factored backend's lowrank_add by the C++ extension's CUDA
#            kernel (factors loaded into registers, sums over k by warp shuffles) wherever it can, not
#            Triton's (whose products read an operand from shared memory a multiply-add); needs the
#            extension built. The default (auto) since the H200 run of 2026-12-04 where the extension has it
#   ftriton  FASTMAML_FACTORED_KERNELS=triton: the Triton lowrank_add, the default before that run
#   fpairs   FASTMAML_FACTORED_PAIRS=fused: the sweep's two products of each weight cotangent with a step's
#            factors in one kernel (each pair read once from memory; more registers)
#   fstages2 FASTMAML_FACTORED_STAGES=2: the low-rank kernels' loops pipelined 2 deep, not 3 (fewer
#            registers: 118 instead of 148 at five pairs, 4 programs a multiprocessor instead of 3)
#   fbwd3    FASTMAML_FACTORED_REVERSE=autograd FASTMAML_FACTORED_FUSED_BACKWARD=0: autograd's path with the
#            low-rank products' backward as the three kernels it was before the fused lowrank_backward
#   fwarps8  FASTMAML_FACTORED_WARPS=8: those kernels at 8 warps a program (74 to 80 registers a thread at
#            five factor pairs instead of 148 to 154: 24 warps a multiprocessor instead of 12)
#   ftf32x3  FASTMAML_FACTORED_PRECISION=tf32x3: the factored backend's low-rank products on tensor cores
#   fchunk16 FASTMAML_FACTORED_K_CHUNK=16: those products in chunks of 16, for fewer registers and more
#            programs a multiprocessor (their time was an eighth of what their bytes allow)
#   floops   FASTMAML_FACTORED_K_LOOP=per_factor: those products' reduction in a loop per factor (as
#            before), not one loop for all factors (fewer rounds of dependent loads, more registers)
#   onestep_small  the same at T=25 and 1,024 (the sweep's rows there are the reverse sweep's): whether
#            the one-step kernel can be the default at K=1 where a batch does not fill the card
#   onestep  FASTMAML_CUDA_ONESTEP=1 at K=1: training calls of one inner step on the one-step kernel
#            (csrc/task/onestep.h: a warp a task, theta_0 shared by a block's warps in shared memory,
#            theta_1 never formed, the meta-gradient as factor rows summed by one product a layer; its float
#            products on tensor cores, 3xTF32, since the H200 run of 2026-12-04)
#   ow4, ow16  the same with 4 or 16 warps a block (FASTMAML_ONESTEP_WARPS; by default as many as fit in
#            shared memory where 8 or more do: 13 at W=40 with ReLU, else 16 with global scratch)
#   ow8      the same at W=40 with 8 warps a block: about the 9 the kernel ran before its scratch buffers
#            shared places (22 KiB a task, now 15.6): whether 13 warps a multiprocessor are faster
#   oglobal  the same with every warp's scratch in global memory (FASTMAML_ONESTEP_SHARED=0)
#   ogeneric the same at W=40 in the kernel's generic form (FASTMAML_ONESTEP_FORM=generic): the task's
#            inputs read where they lie, not copied into shared memory beside its scratch
#   offma    the same with its float products in the FFMA loop (FASTMAML_ONESTEP_PRODUCTS=ffma), in the
#            generic form; by count about 1.6x more instructions a task than the tiles at W=128, 1.4x fewer
#            at W=40
#   offmas   the same at W=40 in the shared-operand form (FASTMAML_ONESTEP_FORM=shared): the mended build
#            of the form nvcc had miscompiled (wrong results on the H200; off unless asked)
#   okeep4g  the same summing up to 4 GiB of factor rows a chunk (FASTMAML_ONESTEP_KEEP_MB=4096; 1 GiB by
#            default: at T=65536 the forward runs the kernel in two chunks at W=40, more at W=128)
#   tonestep FASTMAML_TRITON_ONESTEP=1 at K=1: the triton backend's one-step calls on its one-step kernel
#            (fastmaml/backends/_triton_onestep.py: the same math, a group of tasks a program, the products
#            with theta_0 one tl.dot over the group's points; 8 warps, one task a program); at W=128 its
#            products read their operands from the factor rows in chunks of 16 columns (one stage)
#   tonestep_kc16  the same at W=40 with the chunked products (FASTMAML_TRITON_ONESTEP_CHUNK=16; sm_90
#            no spills since e143a24 (48 / 112 B a thread before) against the register form's 156 / 232 B)
#   tonestep2_kc16  two tasks a program, chunked, at W=40 (352 / 892 B of spills; two tasks in registers
#            spill 5.0 / 5.9 KiB)
#   tonestep16  the same at W=128 with 16 warps a program at 128 registers (FASTMAML_TRITON_WARPS=16
#            FASTMAML_TRITON_MAXNREG=128: 16 warps a multiprocessor instead of 8, 276 / 736 B of spills
#            against 212 / 580, both before e143a24, which took the 8-warp form to 204 / 576)
#   tonestep2, tonestep_tf  the same with two tasks a program (FASTMAML_TRITON_ONESTEP_TASKS=2), or its
#            products on tensor cores (FASTMAML_TRITON_PRECISION=tf32x3)
#   thetas   FASTMAML_REVERSE_THETAS=keep: the CUDA reverse sweep keeps theta_1..theta_K, not rebuilding
#            them above 74 KiB of workspace (W=40, K=5: 2 tasks a multiprocessor instead of 3)
#   mma      FASTMAML_CUDA_MMA=1: the CUDA float reverse sweeps' products of at least 8 x 8 outputs on
#            tensor cores (mma.sync m16n8k8, 3xTF32), not register tiles of FFMAs
#   blocks4  FASTMAML_CUDA_MIN_BLOCKS=4: the CUDA reverse sweep compiled for 4 blocks a multiprocessor
#            (128 registers; 24 / 56 B of spills at ce8d7ec, 232 / 508 before d8db343)
#   blocks6  FASTMAML_CUDA_MIN_BLOCKS=6: compiled for 6 blocks (80 registers, more spills): at K=1, W=40
#            6 tasks of 4 warps a multiprocessor (shared memory allows 6), 24 warps instead of 12; at K=5,
#            W=40 shared memory still holds 3; at W=128 (global workspace) 6. With team64 (blocks6+team64):
#            12 tasks of 2 warps, with team32 25 of one warp, the workspaces in global memory
#   states   FASTMAML_CUDA_STATES=global at W=40, joined with blocks4 or blocks6 (only those sweeps stage
#            the states; alone it is refused): the reverse sweep's support states of steps 0..K-2 in
#            global memory apart, copied in and out of a workspace that keeps one (36.8 KiB at K=5, as at
#            K=1); blocks6+states: 6 tasks of 4 warps a multiprocessor at K=5 instead of 3, blocks4+states 4
#   lds      FASTMAML_CUDA_LDS=0 at W=40: the CUDA products' generic loads where both operands are in
#            shared memory, as before c5539fb (LDS: 35 instructions for a 2 x 2 tile's 16 FFMA, not 43)
#   team32   FASTMAML_CUDA_THREADS=32 (and SHARED_KB=0, every workspace in global memory, so that shared
#   team64   memory does not cap the tasks at 6 at K=1, W=40): a CUDA task's team of one or two warps,
#            more tasks resident a multiprocessor (by registers: 12 or 6 of the default sweep, 25 or 12
#            of the 6-block one, blocks6+team32), cheaper barriers
#   team64s  FASTMAML_CUDA_THREADS=64 with the workspace in shared memory, W=40: at K=1 (36.8 KiB a
#            task) 6 tasks of 2 warps a multiprocessor (shared memory and registers both allow 6) instead
#            of 3 of 4 warps; at K=5 (62.6 KiB) 3 tasks of 2 warps. Tests whether tasks in flight set the speed
#   warps4   FASTMAML_TRITON_LAYOUT=scratch FASTMAML_TRITON_WARPS=4: Triton's scratch layout at 4 warps
#            a program, two programs a multiprocessor instead of one (255 registers a thread)
#   warps2   the same at 2 warps, W=40 only (four programs; at W=128 it spills 0.3-0.6 KiB a thread)
#   nreg128  FASTMAML_TRITON_LAYOUT=scratch FASTMAML_TRITON_MAXNREG=128: Triton's scratch layout at 8 warps
#            capped at 128 registers, two programs a multiprocessor (spills 152 / 204 B a thread at W=40,
#            352 / 896 B at W=128; at W=128, K=5 the scratch budget's 240 programs run in one wave, not 132)
#   w4nreg128 the same at 4 warps: four programs a multiprocessor (432 / 1,144 B and 368 / 940 B)
#   ieee     FASTMAML_TRITON_PRECISION=ieee at W=128: the scratch layout's products as FMAs
#   scratch  FASTMAML_TRITON_LAYOUT=scratch at W=40 (`auto` takes it from W=128; the register layout at
#            W=128 is left out: its backward alone compiles for 8 minutes on 2 cores). Level with the
#            register layout on a75ae00; since e143a24 its loops stop at the real width (3 chunks of 16, not 4)
#   keep1    FASTMAML_TRITON_WIDTH1=keep at W=40: the register layout leaves the 1-wide input and output
#            layers 1 wide (broadcasts and row sums) instead of padding them to 16 (tl.dots); its training
#            kernel has 24% fewer FFMAs but issues 25% more instructions (barriers, shuffles; sm_90 SASS)
#   tf32x3   FASTMAML_TRITON_PRECISION=tf32x3 at W=40: the register layout's products on tensor cores
#   shared   FASTMAML_CUDA_SHARED_KB=44: CUDA workspaces above 44 KiB in global memory (before the opt-in)
#   tiles    FASTMAML_CUDA_TILES=0: CUDA products with one output per thread (before the register tiles)
#   kchunk   FASTMAML_TRITON_K_CHUNK=32: Triton's float32 products reduced in chunks of 32
#   batched  FASTMAML_FACTORED_TRITON=never: the factored products as batched PyTorch products
#   chunk4g  FASTMAML_FACTORED_CHUNK_MB=4096: the factored backend's chunks of tasks at 4 GiB, not 1
#   factors  FASTMAML_FACTORED_DENSE=never: factored layers kept in factors at every step
#   base_cuda, base_triton, base_factored: the method with no switch, the controls of the variants
#            beside them (same arguments, same process conditions, minutes apart)
# AB_VARIANTS picks some: name at most AB_S / 25 of them, a control with them (a variant at T=65536 and two
# widths needs about 25 s with the process's start; 9 s measured nothing on the H200). The default
# (AB_DEFAULT in benchmarks/ab_variants.sh) is what no GPU has measured yet, the likeliest gains first,
# too many for one call (scratch was measured with FMA products, equal to the register layout, and now runs
# tf32x3); "shared tiles chunk4g factors" were measured on the H200 (2026-11-30, benchmarks/RESULTS.md).
# AB_S is the time for all; each variant's CSV goes to ab/, and the summary compares its rows with the sweep's
# (AB_BASELINE=an earlier run's throughput.csv where this run has no sweep).
# Variants joined with '+' (mma+blocks4, team64s+mma) combine their switches, one method's only.
if [ "$DRY_RUN" != 1 ] && [ "${AB_S:-0}" -gt 0 ] && [ "$(left)" -ge 60 ]; then
  stop_prewarm
  variants=(${AB_VARIANTS:-$AB_DEFAULT})
  # What is left of the run, up to AB_S: the sweep and the profile (G2's must-shows) come first.
  ab_total=$(( $(left) < AB_S ? $(left) : AB_S ))
  # At least 25 s a variant (a process's start, imports and two widths; 9 s measured nothing): with less
  # time, the first variants that fit run whole and the rest are listed as not run.
  if [ $(( ab_total / 25 )) -lt ${#variants[@]} ]; then
    fits=$(( ab_total / 25 ))
    fail "A/B variants not run for time: ${variants[*]:$fits}"
    variants=("${variants[@]:0:$fits}")
  fi
  per=$(( ab_total / (${#variants[@]} > 0 ? ${#variants[@]} : 1) ))
  stage "A/B (T=65536 unless a variant says otherwise): ${variants[*]} (${per}s each) -> $DIR/ab.txt, ab/"
  : > "$DIR/ab.txt"
  if [ "$per" -lt 25 ]; then  # a process's start, imports and the cells at two widths: 9 s measured nothing
    echo "warning: ${per}s a variant is too little for T=65536 at two widths; name fewer (AB_VARIANTS)" | tee -a "$DIR/ab.txt"
  fi
  for v in "${variants[@]}"; do
    if ! ab_resolve "$v"; then
      echo "unknown A/B variant $v (or parts for different methods or widths; states needs blocks4 or blocks6)" \
        >> "$DIR/ab.txt"; continue
    fi
    echo "== $setting ($method; compare with the sweep's $method rows)" >> "$DIR/ab.txt"
    # shellcheck disable=SC2086  # a variant may set several variables
    env $setting timeout "$per" python benchmarks/bench_throughput.py --device cuda --order second \
      --methods "$method" --tasks $tasks --steps $steps --width $widths --warmup 1 --repeats 3 --max-seconds 3 \
      --out "$DIR/ab/$v" >> "$DIR/ab.txt" 2>&1
    rc=$?
    echo "exit code $rc" >> "$DIR/ab.txt"
    check_rc "A/B $v" $rc
  done
  grep -E "^==|tasks/s|failed|exit|unknown" "$DIR/ab.txt" | head -40 | cut -c1-160
fi

PREWARM_WAIT_S=0 stop_prewarm > /dev/null  # where the A/B did not run

# The nvcc report ran in the background from the build on (a 3-minute compile on the H200's CPUs):
# waited for only after the measurements (the Triton report below appends to its file).
# At most until the run's end less the Triton report's 30 s: a report still compiling then is left out.
if [ -n "${PTXAS_PID:-}" ]; then
  waited=0 deadline=$(( START + TOTAL_S - 30 ))  # the Triton report's 30 s stay
  while kill -0 "$PTXAS_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 2; waited=$(( waited + 2 ))
  done
  if kill -0 "$PTXAS_PID" 2>/dev/null; then
    echo "the nvcc register report was still compiling after ${waited}s more: left out (REPORTS=1 in a longer run)"
    stop_report
    fail "nvcc register report (out of time)"
  else
    grep -c "Used" "$DIR/ptxas.txt" | sed 's/^/ptxas reports: /'
  fi
fi

# ---- Triton registers and spills (G2) -------------------------------------------------------------
if [ "$DRY_RUN" != 1 ] && [ "${REPORTS:-1}" = 1 ]; then
  stage "Triton kernel variants at the sweep's shapes: registers, spills (limit 30s) -> $DIR/ptxas.txt"
  lim=$(( $(left) + RESERVE_S - 5 )); [ "$lim" -gt 30 ] && lim=30; [ "$lim" -lt 1 ] && lim=1  # in the reserve
  # Unbuffered, and each kernel's lines printed as soon as it has compiled: a timeout then loses only the
  # kernel still compiling, not the report.
  timeout "$lim" python -u - >> "$DIR/ptxas.txt" 2>&1 <<'EOF'
import torch, fastmaml
from fastmaml.backends import _lowrank, _triton_targets
print("== Triton kernels (registers and spills per thread)")
printed = set()
def report_new():
    for line in _triton_targets.compiled_report() + _lowrank.compiled_report():
        if line not in printed:
            printed.add(line)
            print(line)
for width in (40, 128):
    for K in (1, 5):
        dims, g = [1, width, width, 1], torch.Generator(device="cuda").manual_seed(0)
        params = [(torch.randn(o, i, device="cuda", generator=g) * 0.3 if k == 0 else torch.zeros(o, device="cuda")
                   ).requires_grad_() for i, o in zip(dims[:-1], dims[1:]) for k in (0, 1)]
        xs, ys, xq, yq = (torch.randn(64, 10, 1, device="cuda", generator=g) for _ in range(4))
        for backend in ("triton", "factored"):
            try:
                fastmaml.maml(params, xs, ys, xq, yq, inner_steps=K, backend=backend).loss.backward()
            except Exception as err:
                print(f"{backend} width {width} K {K}: {type(err).__name__}: {err}")
            report_new()
        if width == 40 and K == 1:
            sinusoid = (params, xs, ys, xq, yq)
# Last (a compile of its own, where the stage's time may run out): the Triton one-step kernel, which only
# FASTMAML_TRITON_ONESTEP=1 switches on.
from fastmaml.backends import _triton_onestep_call
_triton_onestep_call.settings()
was, _triton_onestep_call.ONESTEP = _triton_onestep_call.ONESTEP, True
try:
    fastmaml.maml(*sinusoid, inner_steps=1, backend="triton").loss.backward()
except Exception as err:
    print(f"triton one-step width 40: {type(err).__name__}: {err}")
_triton_onestep_call.ONESTEP = was
report_new()
print("" if printed else "no compiled Triton kernels to report")
EOF
  grep -E "registers" "$DIR/ptxas.txt" | tail -4 | cut -c1-200
fi

# ---- summary (last output) ---------------------------------------------------------------------
stage "summary -> $DIR/summary.txt (total $(( SECONDS - START ))s)"
if [ -s "$DIR/throughput.csv" ]; then
  [ -f "$DIR/throughput.png" ] || timeout 60 python benchmarks/report.py "$DIR/throughput.csv" --plot "$DIR/throughput.png" > /dev/null 2>&1
  timeout 60 python benchmarks/report.py "$DIR/throughput.csv" --compact > "$DIR/summary.txt" 2>&1
  cat "$DIR/summary.txt"
else
  [ "${SKIP_SWEEP:-0}" = 1 ] && echo "no sweep in this run (SKIP_SWEEP=1)" | tee "$DIR/summary.txt" \
    || echo "no throughput.csv: see $DIR/sweep.log" | tee "$DIR/summary.txt"
fi
# The A/B's rows against the sweep's (this run's, or AB_BASELINE: an earlier run's throughput.csv on the same
# machine, for an A/B run without a sweep).
ab_base="${AB_BASELINE:-$DIR/throughput.csv}"
if [ -d "$DIR/ab" ] && [ -s "$ab_base" ]; then
  echo "A/B against the sweep in $ab_base (ratio above 1: the variant is faster than the default)" | tee -a "$DIR/summary.txt"
  timeout 60 python benchmarks/report.py "$ab_base" --ab "$DIR/ab" 2>&1 | tee -a "$DIR/summary.txt"
fi
# The float32 comparisons' largest errors on the card: what the tests' bounds (1e-4 norm-wise, 1e-2 for any
# element of a large batch) are to be set from.
if [ -s "${FASTMAML_ERROR_LOG:-}" ]; then
  timeout 30 python - "$FASTMAML_ERROR_LOG" 2>&1 <<'EOF_ERRORS' | tee -a "$DIR/summary.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
gpu = [r for r in rows if r["device"] == "cuda"]
print(f"float32 comparisons: {len(rows)}, {len(gpu)} of them on the GPU")
for key in ("worst_over_scale", "norm_wise"):
    for r in sorted(gpu, key=lambda r: -r[key])[:4]:
        print(f"  {key} {r[key]:.2e} ({r['numel']} elements) {r['test'].split('::')[-1][:90]} [{r['tensor']}]")
EOF_ERRORS
fi
FINISHED=1
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'failed or out of time (the logs above say which part):%s\n' "$(printf ' %s;' "${FAILED[@]}")" \
    | tee -a "$DIR/summary.txt"
  exit 1
fi
