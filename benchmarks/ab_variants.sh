# fastmaml: the GPU check's A/B variants (benchmarks/gpu_check.sh sources this file; the variants are
# described there, at the A/B). Functions only, and the default list: tests/test_benchmark_tools.py runs
# them in bash.

AB_DEFAULT="onestep ow8 onestep_small tonestep keep1 scratch tonestep_kc16 tonestep16 tonestep2_kc16 offma offmas ogeneric ow16 oglobal okeep4g tonestep2 tonestep_tf ow4 ftriton fcuda mma blocks4 blocks6 blocks6+states frevauto fpairs fstages2 fbwd3 fwarps8 team64s lds thetas warps4 nreg128 floops fchunk16 team32 ftf32x3 team64 blocks6+team64 blocks4+states w4nreg128 ieee warps2"
# One variant's switches: sets `setting`, `method`, `widths`, `steps` and `tasks` (the widths, inner steps
# and batch sizes it is measured at; T=65,536 unless the variant says otherwise).
ab_variant() {
  widths="40 128" steps="1 5" tasks=65536
  case "$1" in
    scratch) setting=FASTMAML_TRITON_LAYOUT=scratch; method=triton; widths=40 ;;
    keep1) setting=FASTMAML_TRITON_WIDTH1=keep; method=triton; widths=40 ;;
    warps4) setting="FASTMAML_TRITON_LAYOUT=scratch FASTMAML_TRITON_WARPS=4"; method=triton ;;
    warps2) setting="FASTMAML_TRITON_LAYOUT=scratch FASTMAML_TRITON_WARPS=2"; method=triton; widths=40 ;;
    nreg128) setting="FASTMAML_TRITON_LAYOUT=scratch FASTMAML_TRITON_MAXNREG=128"; method=triton ;;
    w4nreg128) setting="FASTMAML_TRITON_LAYOUT=scratch FASTMAML_TRITON_WARPS=4 FASTMAML_TRITON_MAXNREG=128"
      method=triton ;;
    tiles) setting=FASTMAML_CUDA_TILES=0; method=cuda ;;
    mma) setting=FASTMAML_CUDA_MMA=1; method=cuda ;;
    blocks4) setting=FASTMAML_CUDA_MIN_BLOCKS=4; method=cuda ;;
    blocks6) setting=FASTMAML_CUDA_MIN_BLOCKS=6; method=cuda ;;
    lds) setting=FASTMAML_CUDA_LDS=0; method=cuda; widths=40 ;;
    states) setting=FASTMAML_CUDA_STATES=global; method=cuda; widths=40 ;;
    thetas) setting=FASTMAML_REVERSE_THETAS=keep; method=cuda ;;
    shared) setting=FASTMAML_CUDA_SHARED_KB=44; method=cuda ;;
    team32) setting="FASTMAML_CUDA_THREADS=32 FASTMAML_CUDA_SHARED_KB=0"; method=cuda ;;
    team64) setting="FASTMAML_CUDA_THREADS=64 FASTMAML_CUDA_SHARED_KB=0"; method=cuda ;;
    team64s) setting=FASTMAML_CUDA_THREADS=64; method=cuda; widths=40 ;;
    kchunk) setting=FASTMAML_TRITON_K_CHUNK=32; method=triton ;;
    tf32x3) setting=FASTMAML_TRITON_PRECISION=tf32x3; method=triton; widths=40 ;;
    ieee) setting=FASTMAML_TRITON_PRECISION=ieee; method=triton; widths=128 ;;
    batched) setting=FASTMAML_FACTORED_TRITON=never; method=factored ;;
    chunk4g) setting=FASTMAML_FACTORED_CHUNK_MB=4096; method=factored ;;
    ftf32x3) setting=FASTMAML_FACTORED_PRECISION=tf32x3; method=factored ;;
    fchunk16) setting=FASTMAML_FACTORED_K_CHUNK=16; method=factored ;;
    floops) setting=FASTMAML_FACTORED_K_LOOP=per_factor; method=factored ;;
    frevauto) setting=FASTMAML_FACTORED_REVERSE=autograd; method=factored ;;
    fpairs) setting=FASTMAML_FACTORED_PAIRS=fused; method=factored ;;
    fstages2) setting=FASTMAML_FACTORED_STAGES=2; method=factored ;;
    fbwd3) setting="FASTMAML_FACTORED_REVERSE=autograd FASTMAML_FACTORED_FUSED_BACKWARD=0"; method=factored ;;
    fwarps8) setting=FASTMAML_FACTORED_WARPS=8; method=factored ;;
    fcuda) setting=FASTMAML_FACTORED_KERNELS=cuda; method=factored ;;
    ftriton) setting=FASTMAML_FACTORED_KERNELS=triton; method=factored ;;
    factors) setting=FASTMAML_FACTORED_DENSE=never; method=factored ;;
    onestep) setting=FASTMAML_CUDA_ONESTEP=1; method=cuda; steps=1 ;;
    onestep_small) setting=FASTMAML_CUDA_ONESTEP=1; method=cuda; steps=1; tasks="25 1024" ;;
    ow4) setting="FASTMAML_CUDA_ONESTEP=1 FASTMAML_ONESTEP_WARPS=4"; method=cuda; steps=1 ;;
    ow16) setting="FASTMAML_CUDA_ONESTEP=1 FASTMAML_ONESTEP_WARPS=16"; method=cuda; steps=1 ;;
    ow8) setting="FASTMAML_CUDA_ONESTEP=1 FASTMAML_ONESTEP_WARPS=8"; method=cuda; steps=1; widths=40 ;;
    oglobal) setting="FASTMAML_CUDA_ONESTEP=1 FASTMAML_ONESTEP_SHARED=0"; method=cuda; steps=1 ;;
    ogeneric) setting="FASTMAML_CUDA_ONESTEP=1 FASTMAML_ONESTEP_FORM=generic"; method=cuda; steps=1; widths=40 ;;
    offma) setting="FASTMAML_CUDA_ONESTEP=1 FASTMAML_ONESTEP_PRODUCTS=ffma"; method=cuda; steps=1 ;;
    offmas) setting="FASTMAML_CUDA_ONESTEP=1 FASTMAML_ONESTEP_PRODUCTS=ffma FASTMAML_ONESTEP_FORM=shared"; method=cuda
      steps=1; widths=40 ;;
    okeep4g) setting="FASTMAML_CUDA_ONESTEP=1 FASTMAML_ONESTEP_KEEP_MB=4096"; method=cuda; steps=1 ;;
    tonestep) setting=FASTMAML_TRITON_ONESTEP=1; method=triton; steps=1 ;;
    tonestep_kc16) setting="FASTMAML_TRITON_ONESTEP=1 FASTMAML_TRITON_ONESTEP_CHUNK=16"; method=triton; steps=1
      widths=40 ;;
    tonestep2_kc16) setting="FASTMAML_TRITON_ONESTEP=1 FASTMAML_TRITON_ONESTEP_TASKS=2 FASTMAML_TRITON_ONESTEP_CHUNK=16"
      method=triton; steps=1; widths=40 ;;
    tonestep16) setting="FASTMAML_TRITON_ONESTEP=1 FASTMAML_TRITON_WARPS=16 FASTMAML_TRITON_MAXNREG=128"
      method=triton; steps=1; widths=128 ;;
    tonestep2) setting="FASTMAML_TRITON_ONESTEP=1 FASTMAML_TRITON_ONESTEP_TASKS=2"; method=triton; steps=1; widths=40 ;;
    tonestep_tf) setting="FASTMAML_TRITON_ONESTEP=1 FASTMAML_TRITON_PRECISION=tf32x3"; method=triton; steps=1
      widths=40 ;;
    # Controls: a method with no switch, in the A/B's own run (same arguments, minutes from its variants;
    # the sweep's rows are another process's, with other repeats, or another call's).
    base_cuda) setting=""; method=cuda ;;
    base_triton) setting=""; method=triton ;;
    base_factored) setting=""; method=factored ;;
    *) return 1 ;;
  esac
}
# One variant, its parts joined with '+' (mma+blocks4): sets `setting` (all its parts' switches), `method`,
# `widths`, `steps` and `tasks` (those its parts share); fails for an unknown part, parts of different
# methods, or states without blocks4 or blocks6 (the default sweep does not stage the states, and the backend
# refuses it).
ab_resolve() {
  local all_settings="" all_method="" all_widths="40 128" all_steps="1 5" all_tasks="25 1024 65536" part
  for part in ${1//+/ }; do
    ab_variant "$part" || return 1
    [ -n "$all_method" ] && [ "$all_method" != "$method" ] && return 1
    all_method=$method
    all_settings="${all_settings:+$all_settings }$setting"
    all_widths=$(for w in $all_widths; do [[ " $widths " == *" $w "* ]] && echo "$w"; done | xargs)
    all_steps=$(for k in $all_steps; do [[ " $steps " == *" $k "* ]] && echo "$k"; done | xargs)
    all_tasks=$(for t in $all_tasks; do [[ " $tasks " == *" $t "* ]] && echo "$t"; done | xargs)
  done
  [[ " ${1//+/ } " == *" states "* && " ${1//+/ } " != *" blocks"[46]" "* ]] && return 1
  [ -n "$all_method" ] && [ -n "$all_widths" ] && [ -n "$all_steps" ] && [ -n "$all_tasks" ] || return 1
  setting=$all_settings method=$all_method widths=$all_widths steps=$all_steps tasks=$all_tasks
}

# The direct children of process $1, from /proc (no procps needed).
child_pids() {
  local stat pid ppid
  for stat in /proc/[0-9]*/stat; do
    read -r pid _ _ ppid _ < "$stat" 2>/dev/null || continue
    [ "$ppid" = "$1" ] && echo "$pid"
  done
}

# Waits up to PREWARM_WAIT_S for the prewarm (the background loop PREWARM_PID, a child of this shell),
# then stops it: its running processes first, then the loop.
stop_prewarm() {
  [ -n "$PREWARM_PID" ] || return 0
  local waited=0
  while kill -0 "$PREWARM_PID" 2>/dev/null && [ "$waited" -lt "${PREWARM_WAIT_S:-30}" ]; do
    sleep 1; waited=$(( waited + 1 ))
  done
  if kill -0 "$PREWARM_PID" 2>/dev/null; then
    kill "$PREWARM_PID" $(child_pids "$PREWARM_PID") 2>/dev/null
    echo "prewarm stopped after waiting ${waited}s" >> "${DIR:-.}/prewarm.log"
  fi
  wait "$PREWARM_PID" 2>/dev/null
  PREWARM_PID=""
  grep -cE "^== " "${DIR:-.}/prewarm.log" | sed 's/^/prewarm: variants started: /'
}
