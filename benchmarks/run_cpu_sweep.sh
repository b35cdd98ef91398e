#!/usr/bin/env bash
# The CPU sweep of benchmarks/RESULTS.md, regenerated with one command (run it on a quiet machine):
#
#   benchmarks/run_cpu_sweep.sh            # measures, writes benchmarks/results/cpu/, updates RESULTS.md
#   benchmarks/run_cpu_sweep.sh --print    # measures and prints the markdown, RESULTS.md untouched
#
# Settings: T in {25, 256, 4096}, K in {1, 5}, width 40, second order, float32, every fastmaml backend
# that runs CPU tensors and the peers (vmap, loop, higher). A method is given MAX_SECONDS (default 60)
# per setting; one estimated to need more for a single call is skipped with the estimate.
# Extra arguments after --print (or alone) go to bench_throughput.py, e.g. --threads 1: on a machine
# whose cores other processes are using, torch's OpenMP threads wait for each other and every method
# slows down 4-10x with 2 threads (measured on this 2-core machine); one thread per process is then
# the fairer comparison.
set -euo pipefail
cd "$(dirname "$0")/.."

update=1
if [ "${1:-}" = "--print" ]; then update=0; shift; fi
out="benchmarks/results/cpu"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
cores="$(nproc)"
cmd="python benchmarks/bench_throughput.py --device cpu --tasks 25 256 4096 --steps 1 5 --width 40 --order second --max-seconds ${MAX_SECONDS:-60} --out $out $*"

echo "load average before: $load_before"
# Build what the backends need first (the C++ extension), so no measurement waits for a compiler.
python -c "import fastmaml; from fastmaml.dispatch import get_backend; [print(n, get_backend(n).unavailable() or 'available') for n in fastmaml.list_backends()]"
status=0
$cmd || status=$?   # 1: a method failed its correctness check (its row says so); still reported
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
python benchmarks/report.py "$out/throughput.csv" --plot "$out/throughput.png" > /dev/null

torch_version="$(python -c 'import torch; print(torch.__version__)')"
first_row() { sed -n 2p "$out/throughput.csv" | python -c "import csv,sys; print(next(csv.reader(sys.stdin))[$1])"; }
commit="$(first_row 13)"
device_name="$(first_row 2)"
busy="$(python -c "print(int(float('${load_before%% *}') > 0.5 * $cores or float('${load_after%% *}') > 1.5 * $cores))")"
warning=""
if [ "$busy" = 1 ]; then
  warning="**The machine was busy during this run (other processes on its cores; see the load averages):
these figures may be noisy. Rerun \`benchmarks/run_cpu_sweep.sh\` on a quiet machine.**

"
fi
preamble="${warning}Measured $(date -I) on ${device_name} of a ${cores}-core machine, torch ${torch_version}, fastmaml commit ${commit}.
Load average (1, 5, 15 min) before: ${load_before}; after: ${load_after}.

Command: \`MAX_SECONDS=${MAX_SECONDS:-60} benchmarks/run_cpu_sweep.sh $*\` (runs \`${cmd}\`). CSV and plot: \`${out}/\`."

if [ "$update" = 1 ]; then
  python benchmarks/report.py "$out/throughput.csv" --update benchmarks/RESULTS.md --section cpu \
    --preamble "$preamble" > /dev/null
  echo "updated benchmarks/RESULTS.md"
else
  echo "$preamble"
  echo
  python benchmarks/report.py "$out/throughput.csv" --markdown
fi
exit $status
