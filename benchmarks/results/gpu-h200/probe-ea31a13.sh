#!/usr/bin/env bash
# one-off (not committed)
export PYTHONPATH=$PWD
D=/tmp/p; mkdir -p $D
python benchmarks/prebuilt.py install .gpu_prebuilt > $D/install.log 2>&1
timeout 60 python probe_onestep.py > $D/probe.log 2>&1; echo "probe rc $?" >> $D/probe.log
cat $D/probe.log
FASTMAML_TEST_BACKENDS=cuda,triton,factored timeout 190 python -m pytest tests/test_backends.py \
  tests/test_gpu_overhead.py tests/test_overhead.py tests/test_lowrank.py tests/test_triton_maml.py \
  tests/test_benchmark_tools.py tests/test_same_function.py tests/test_onestep.py -q -rfE -n 16 --tb=short \
  -p no:cacheprovider \
  -k "test_backends or gpu_overhead or compile or on_the_gpu or wide_nets or launch_report or cuda_kernel or cuda_lowrank or nan_spreads or unused_inputs or cuda_op_matches or onestep_kernel" > $D/tests.log 2>&1
echo "tests rc $?" >> $D/tests.log
grep -v PytestBenchmarkWarning $D/tests.log | grep -v "warner(" | tail -c 5000
tar czf "$OUT/probe.tgz" -C $D .
