"""The GPU-side measuring tools that can run here: the ptxas report parser of
benchmarks/kernel_registers.py, the reader of ncu's source page (benchmarks/ncu_source.py), and
benchmarks/profile_kernels.py on the CPU (on a GPU, benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import kernel_registers  # noqa: E402
import ncu_source  # noqa: E402

PTXAS = """\
ptxas info    : Compiling entry function '_ZN8fastmaml4cuda45_GLOBAL__N__x10bwd_kernelIfEEvNS_4task6scalar3NetEll' for 'sm_90a'
ptxas info    : Function properties for _ZN8fastmaml4cuda45_GLOBAL__N__x10bwd_kernelIfEEvNS_4task6scalar3NetEll
    64 bytes stack frame, 80 bytes spill stores, 124 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 64 bytes cumulative stack size, 1024 bytes smem
ptxas info    : Compiling entry function '_ZN8fastmaml4cuda45_GLOBAL__N__x10bwd_kernelIfLi4EEEvNS_4task6scalar3NetEll' for 'sm_90a'
ptxas info    : Function properties for _ZN8fastmaml4cuda45_GLOBAL__N__x10bwd_kernelIfLi4EEEvNS_4task6scalar3NetEll
    0 bytes stack frame, 236 bytes spill stores, 464 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 32 bytes smem
ptxas info    : Compiling entry function '_ZN8fastmaml4cuda45_GLOBAL__N__x17column_sum_kernelIdEEvPKT_' for 'sm_90a'
ptxas info    : Function properties for _ZN8fastmaml4cuda45_GLOBAL__N__x17column_sum_kernelIdEEvPKT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 4096 bytes smem
"""


def test_ptxas_report_is_read_per_kernel():
    parsed = kernel_registers.parse_ptxas(PTXAS)
    by_name = {kernel_registers.short_name(k): v for k, v in parsed.items()}
    assert by_name == {
        "bwd_kernel<float>": dict(registers=168, spill_stores=80, spill_loads=124, stack=64),
        "bwd_kernel<float, 4>": dict(registers=128, spill_stores=236, spill_loads=464, stack=0),
        "column_sum_kernel<double>": dict(registers=32, spill_stores=0, spill_loads=0, stack=0),
    }


def test_kernel_names_with_the_timeline_flag():
    """The reverse sweep's template carries a bool for its barrier timeline (csrc/cuda/timeline.h): the
    names as nvcc 13 mangles them now, each variant told apart."""
    stem = "_ZN8fastmaml4cuda49_GLOBAL__N__b41779e0_10_bwd_f32_cu_8007c2aa_2957310bwd_kernelI"
    tail = "EEvNS_4task6scalar3NetElllliPKT_"
    assert kernel_registers.short_name(stem + "fLi0ELb0EE" + tail) == "bwd_kernel<float>"
    assert kernel_registers.short_name(stem + "fLi4ELb0EE" + tail) == "bwd_kernel<float, 4>"
    assert kernel_registers.short_name(stem + "fLi3ELb1EE" + tail) == "bwd_kernel<float, 3, timeline>"
    assert kernel_registers.short_name(stem + "dLi0ELb0EE" + tail) == "bwd_kernel<double>"
    # the factored backend's CUDA lowrank_add: elements a load in each pass first, then the dtype
    lowrank = "_ZN8fastmaml4cuda53_GLOBAL__N__3e54c23e_15_lowrank_cuda_cu_42f71b2f_130718lowrank_add_kernelI{}EEvNS_7"
    assert kernel_registers.short_name(lowrank.format("Li4ELi1Ef")) == "lowrank_add_kernel<float, loads 4/1>"
    assert kernel_registers.short_name(lowrank.format("Li1ELi2Ed")) == "lowrank_add_kernel<double, loads 1/2>"
    # the one-step kernel: <dtype, shared-operand form, tensor cores>; cut to 60 characters its six names were one
    onestep = "_ZN8fastmaml4cuda49_GLOBAL__N__4d6d5c41_10_onestep_cu_105b93da_2748814onestep_kernelI{}EEEvNS0_11OnestepArgsIT_EEbbl"
    assert kernel_registers.short_name(onestep.format("fLb0ELb0")) == "onestep_kernel<float>"
    assert kernel_registers.short_name(onestep.format("fLb1ELb1")) == "onestep_kernel<float, shared, mma>"
    assert kernel_registers.short_name(onestep.format("dLb1ELb0")) == "onestep_kernel<double, shared>"
    pairs = lowrank.replace("18lowrank_add_kernel", "20lowrank_pairs_kernel")
    assert kernel_registers.short_name(pairs.format("Li4ELi4Ef")) == "lowrank_pairs_kernel<float, loads 4/4>"


SASS = """\
\t\tFunction : _ZN8fastmaml4cuda45_GLOBAL__N__x10bwd_kernelIfLi0EEEvNS_4task6scalar3NetEll
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LD.E R4, desc[UR4][R2.64] ;
        /*0020*/                   LD.E R5, desc[UR4][R2.64+0x4] ;
        /*0030*/                   FFMA R6, R4, R5, R6 ;
        /*0040*/                   FFMA R7, R4, R5, R7 ;
        /*0050*/                   FFMA R8, R4, R5, R8 ;
        /*0060*/                   FFMA R9, R4, R5, R9 ;
        /*0070*/                   IMAD.WIDE R2, R10, 0x4, R2 ;
        /*0080*/               @P0 BRA 0x10 ;
        /*0090*/                   STL [R1], R6 ;
        /*00a0*/                   FFMA R6, R4, R5, R6 ;
        /*00b0*/                   LDS R4, [R11] ;
        /*00c0*/                   FFMA R6, R4, R5, R6 ;
        /*00d0*/                   FFMA R6, R4, R5, R6 ;
        /*00e0*/                   FFMA R6, R4, R5, R6 ;
        /*00f0*/              @!P1 BRA 0x10 ;
        /*0100*/                   LDS R12, [R11] ;
        /*0110*/                   HMMA.1688.F32.TF32 R20, R12, R14, R20 ;
        /*0120*/                   HMMA.1688.F32.TF32 R24, R12, R16, R24 ;
        /*0130*/               @P2 BRA 0x100 ;
        /*0140*/                   EXIT ;
"""


def test_sass_inner_loops_are_counted():
    """Only the innermost multiply-add loop counts (the outer one holds it); totals count every
    instruction, local traffic (spills) apart; a loop of tensor-core HMMAs is listed on its own."""
    stats = kernel_registers.parse_sass(SASS)
    (name, st), = stats.items()
    assert kernel_registers.short_name(name) == "bwd_kernel<float>"
    assert st == dict(instructions=21, ffma=8, hmma=2, loads=4, local=1, loops=[(8, 4, 2)], mma_loops=[(4, 2, 1)])
    lines = kernel_registers.sass_lines(stats)
    assert "bwd_kernel<float>" in lines[0] and "0.50 FFMA an instruction" in lines[0] and "2 HMMA" in lines[0]
    assert "loop of    8 instructions:   4 FFMA,   2 loads (0.50)" in lines[1]
    assert "tensor-core loop of    4 instructions:  2 HMMA,   1 loads (2.0 instructions an HMMA)" in lines[2]


# `nvdisasm -gi` of a cubin built with -lineinfo (nvcc 13.0's layout, shortened): each run of instructions
# follows its frames, innermost first; data sections after the code hold `.dword`s, not instructions.
DIS = """\
\t.section\t.nv.info,"",@"SHT_CUDA_INFO"
        /*00ac*/ \t.dword\t_ZN8fastmaml4cuda45_GLOBAL__N__x10bwd_kernelIfLi0ELb0EEEvNS_4task6scalar3NetEll
\t.section\t.text._ZN8fastmaml4cuda45_GLOBAL__N__x10bwd_kernelIfLi0ELb0EEEvNS_4task6scalar3NetEll,"ax",@progbits
.text._ZN8fastmaml4cuda45_GLOBAL__N__x10bwd_kernelIfLi0ELb0EEEvNS_4task6scalar3NetEll:
\t//## File "/src/csrc/cuda/kernels.cuh", line 236
        /*0000*/                   LDC R1, c[0x0][0x28] ;
\t//## File "/src/csrc/task/team_tiles.h", line 69 inlined at "/src/csrc/task/team_tiles.h", line 99
\t//## File "/src/csrc/task/team_tiles.h", line 99 inlined at "/src/csrc/task/products.h", line 68
\t//## File "/src/csrc/task/products.h", line 68 inlined at "/src/csrc/task/mlp.h", line 279
\t//## File "/src/csrc/task/mlp.h", line 279 inlined at "/src/csrc/cuda/kernels.cuh", line 259
\t//## File "/src/csrc/cuda/kernels.cuh", line 259
        /*0010*/                   FFMA R6, R4, R5, R6 ;
        /*0020*/               @P0 FFMA R7, R4, R5, R7 ;
\t//## File "/usr/local/cuda/include/crt/math_functions.hpp", line 924 inlined at "/src/csrc/task/mlp.h", line 107
\t//## File "/src/csrc/task/mlp.h", line 107 inlined at "/src/csrc/cuda/kernels.cuh", line 259
\t//## File "/src/csrc/cuda/kernels.cuh", line 259
        /*0030*/                   MUFU.TANH R8, R8 ;
        /*0040*/                   EXIT ;
\t.section\t.nv.constant0,"a",@progbits
        /*0000*/ \t.byte\t0x00, 0x00
"""


def test_sass_is_counted_by_source_line_and_caller():
    """Each instruction goes to its innermost frame's line and to the innermost frame outside the
    primitives (team_tiles.h, products.h) and the toolkit's headers; a run without a new comment keeps the
    last frames; the data sections' lines are not instructions."""
    stats = kernel_registers.parse_sass_sources(DIS)
    (name, st), = stats.items()
    assert kernel_registers.short_name(name) == "bwd_kernel<float>"
    assert st["instructions"] == 5
    assert st["lines"] == {"kernels.cuh:236": 1, "team_tiles.h:69": 2, "math_functions.hpp:924": 2}
    assert st["callers"] == {"kernels.cuh:236": 1, "mlp.h:279": 2, "mlp.h:107": 2}
    assert st["files"] == {"kernels.cuh": 1, "team_tiles.h": 2, "math_functions.hpp": 2}
    lines = kernel_registers.source_lines(stats)
    assert lines[0].startswith("bwd_kernel<float>") and "5 instructions: team_tiles.h 40%" in lines[0]
    assert lines[1] == "    lines: team_tiles.h:69 2, math_functions.hpp:924 2, kernels.cuh:236 1"
    assert lines[2] == "    callers: mlp.h:279 2, mlp.h:107 2, kernels.cuh:236 1"



def test_cuda_report_adds_line_tables_and_sources_only_when_asked(monkeypatch):
    """`--sources` builds with -lineinfo and disassembles; without it the build and the report are as
    before (nvcc stubbed: no object is written, so nothing is disassembled either way)."""
    commands = []

    class FakeNvcc:
        returncode = 0

        def __init__(self, cmd, **kwargs):
            commands.append(cmd)

        def communicate(self):
            return "", ""

    monkeypatch.setattr(kernel_registers.shutil, "which", lambda name: sys.executable)
    monkeypatch.setattr(kernel_registers.subprocess, "Popen", FakeNvcc)
    report = kernel_registers.cuda_report("90a")
    assert commands and not any("-lineinfo" in cmd for cmd in commands)
    assert not any("by source line" in line or line.startswith("sources:") for line in report)
    commands.clear()
    report = kernel_registers.cuda_report("90a", sources=True)
    assert commands and all("-lineinfo" in cmd for cmd in commands)
    assert any("by source line" in line or line.startswith("sources:") for line in report)

def test_profile_runs_on_the_cpu(capsys):
    import profile_kernels

    assert profile_kernels.main(["--device", "cpu", "--methods", "cpu", "--tasks", "5", "--steps", "1",
                                 "--width", "7", "--warmup", "1", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "cpu: " in out and "ms per iteration" in out
    assert "no GPU kernels recorded" in out


def test_profile_takes_a_grid_of_cells(capsys):
    """--steps and --width take lists: every cell is profiled under its own header, in order."""
    import profile_kernels

    assert profile_kernels.main(["--device", "cpu", "--methods", "cpu", "--tasks", "3", "--steps", "1", "2",
                                 "--width", "5", "7", "--warmup", "0", "--iters", "1"]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    cells = [tuple(part for part in line.split(" | ")[2].split() if part[0] in "KW") for line in headers]
    assert cells == [("K=1", "W=5"), ("K=1", "W=7"), ("K=2", "W=5"), ("K=2", "W=7")]


def test_harness_measures_what_auto_has_not_placed():
    """The benchmarks pass over a backend on a device `auto` keeps it off (Triton's interpreter on CPU
    tensors) unless it is named, and measure one `auto` places on no device yet (factored) everywhere."""
    import _harness as H

    w = H.make_workload(3, 1, 7, device="cpu")
    assert H.why_not("cpu", w) is None
    assert H.why_not("factored", w) is None
    why = H.why_not("triton", w)
    assert why is not None and ("not meant for cpu" in why or "interpreter" in why), why


LAUNCH = re.compile(r"launch: (\d+) blocks of (\d+) threads, (\d+) tasks a block, workspace ([\d.]+) KiB in "
                    r"(shared|global) memory, (\d+) registers and (\d+) B local a thread, (\d+) blocks a "
                    r"multiprocessor(, theta_k rebuilt)?(, tensor cores)?(?:, support states ([\d.]+) KiB apart in "
                    r"global memory)?")


def test_cuda_launch_report(monkeypatch):
    """The throughput sweep's line under every cuda row: how the training call was laid out and how many
    of its blocks a multiprocessor holds (fastmaml_testing::cuda_training_launch). Nothing off a GPU; the
    report's fields in their places (a stand-in for the op here); on a GPU, figures that agree with the
    launch (at the sinusoid size the workspace is in shared memory)."""
    from types import SimpleNamespace

    import torch

    import _harness as H

    assert H.cuda_launch_note(H.make_workload(3, 1, 7, device="cpu")) == ""
    fake = SimpleNamespace(device=torch.device("cuda"), params=[torch.zeros(1)], width=40, K=5, T=65536,
                           x_support=torch.zeros(65536, 10, 1), x_query=torch.zeros(65536, 10, 1))
    seen = []

    def op(theta, dims, ns, nq, k, t, need_lr):
        seen.append((list(dims), ns, nq, k, t, need_lr))
        return [128, 2048, 32, 1, 70656, 1, 0, 168, 0, 3, 0]

    with monkeypatch.context() as mp:
        mp.setattr(torch.ops.fastmaml_testing, "cuda_training_launch", op, raising=False)
        note = H.cuda_launch_note(fake)
    assert seen == [([1, 40, 40, 1], 10, 10, 5, 65536, False)]
    m = LAUNCH.fullmatch(note)
    assert m is not None and m.groups() == ("2048", "128", "32", "69.0", "shared", "168", "0", "3",
                                            ", theta_k rebuilt", None, None), note
    # FASTMAML_CUDA_STATES=global: the support states' bytes a block, kept apart from the workspace.
    with monkeypatch.context() as mp:
        mp.setattr(torch.ops.fastmaml_testing, "cuda_training_launch",
                   lambda *a: [128, 2048, 32, 1, 31232, 1, 0, 80, 416, 6, 33280], raising=False)
        m = LAUNCH.fullmatch(H.cuda_launch_note(fake))
    assert m is not None and m.groups()[3:] == ("30.5", "shared", "80", "416", "6", ", theta_k rebuilt", None,
                                                "32.5"), m
    if not torch.cuda.is_available():
        return
    from fastmaml import dispatch

    why = dispatch.get_backend("cuda").unavailable()  # loads the library the report is in
    if why is not None:
        pytest.skip(f"no CUDA kernels: {why}")
    note = H.cuda_launch_note(H.make_workload(1000, 1, 40, device="cuda"))
    m = LAUNCH.fullmatch(note)
    assert m is not None, note
    blocks, threads, chunk = (int(m[i]) for i in (1, 2, 3))
    assert blocks * chunk >= 1000 and (blocks - 1) * chunk < 1000 and threads % 32 == 0
    assert m[5] == "shared" and 0 < float(m[4]) < 64 and int(m[6]) > 0 and int(m[8]) >= 1


def test_sweep_probes_before_skipping_on_a_far_estimate(monkeypatch):
    """A large batch whose only estimate comes from a far smaller one (T=25 before T=65,536: proportional
    to T, far too high for a batched method) is probed on a 64th and a 16th of its tasks before it is
    skipped; an estimate past 32x the limit (a task loop's) is trusted and skips at once. The probe's
    times are given (a batched method's: mostly fixed cost), so that a busy machine (parallel tests)
    cannot change the outcome; the real probe is run on its own at the end."""
    from types import SimpleNamespace

    import _harness as H
    import bench_throughput

    w = H.make_workload(65536, 1, 7, device="cpu")
    args = SimpleNamespace(max_seconds=1.0)
    estimator = H.Estimator()
    estimator.add("cpu", H.head(w, 25), 2.0)  # 2 ms at T=25: 5.2 s at T=65,536 if proportional
    assert estimator.estimate_s("cpu", w) > args.max_seconds
    probed = []

    def probe(method, workload, sizes):
        probed.append(tuple(sizes))
        for t in sizes:  # 5 ms at T=1,024 and 8 ms at T=4,096: 68 ms at T=65,536 on their line
            estimator.add(method, H.head(workload, t), 4.0 + t / 1024)

    monkeypatch.setattr(estimator, "probe", probe)
    assert bench_throughput._skip_reason("cpu", w, set(), estimator, args, None) is None
    assert probed == [(1024, 4096)]
    assert estimator.largest_t("cpu", w) == 4096
    assert estimator.estimate_s("cpu", w) == pytest.approx(0.068)
    far = H.Estimator()
    far.add("cpu", H.head(w, 25), 20.0)  # 52 s: past 32 x 1 s, no probe
    assert "estimated" in bench_throughput._skip_reason("cpu", w, set(), far, args, None)
    assert far.largest_t("cpu", w) == 25
    real = H.Estimator()
    real.probe("cpu", w, (16, 64))
    assert real.largest_t("cpu", w) == 64 and real.estimate_s("cpu", w) > 0



def test_graph_method_keeps_what_its_replays_write(monkeypatch):
    """bench_overhead's `graph` method: the call it returns keeps the parameters and the optimizer alive,
    which the captured kernels write in place on every replay (a returned `graph.replay` kept only the
    graph; the rest was freed, and replays wrote to memory given back to the driver: the H200's illegal
    memory access). The CUDA pieces are stand-ins here; the iteration runs on the CPU."""
    import gc
    import types
    import weakref

    import torch

    import bench_overhead
    from _harness import make_workload

    class Stub:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait_stream(self, *args):
            pass

        def replay(self):
            pass

    for name, value in (("Stream", Stub), ("CUDAGraph", Stub), ("stream", lambda s: Stub()),
                        ("current_stream", lambda *a: Stub()), ("graph", lambda g, **k: Stub())):
        monkeypatch.setattr(torch.cuda, name, value)
    adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda params, **k: adam(params, lr=k.get("lr", 1e-3)))
    w = make_workload(4, 1, 8)
    made = []
    fresh = type(w).fresh_params
    monkeypatch.setattr(type(w), "fresh_params", lambda self: made.extend(fresh(self)) or made[-len(self.params):])
    call = bench_overhead.build("graph", w, types.SimpleNamespace(type="cuda"))
    refs = [weakref.ref(p) for p in made]
    made.clear()
    gc.collect()
    assert all(r() is not None for r in refs), "the graph's parameters were freed when build() returned"
    call()


def _bash(script: str, env: dict | None = None) -> str:
    """`script` run by bash in the repository with ab_variants.sh's functions (and `env`, else this one's)."""
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("bash is not installed (the GPU check is a bash script)")
    proc = subprocess.run(["bash", "-c", f"source benchmarks/ab_variants.sh\n{script}"], cwd=BENCH.parent,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_ab_variants_resolve_to_their_switches():
    """The GPU check's A/B variants (benchmarks/ab_variants.sh): a '+' joins one method's switches at the
    widths its parts share; an unknown part, parts of two methods, and the states switch without the 4- or
    6-block sweep (which alone stage the states) are refused; every default variant resolves."""
    out = _bash('for v in blocks6+states states mma+states fchunk16+fwarps8 mma+fwarps8 nosuch team64s+mma '
                'lds+ieee base_factored base_cuda+mma $AB_DEFAULT; do if ab_resolve "$v"; then echo "$v|$method|$widths|$setting"; '
                'else echo "$v|refused"; fi; done')
    got = dict(line.split("|", 1) for line in out.splitlines())
    assert got["blocks6+states"] == "cuda|40|FASTMAML_CUDA_MIN_BLOCKS=6 FASTMAML_CUDA_STATES=global"
    assert got["fchunk16+fwarps8"] == "factored|40 128|FASTMAML_FACTORED_K_CHUNK=16 FASTMAML_FACTORED_WARPS=8"
    assert got["team64s+mma"] == "cuda|40|FASTMAML_CUDA_THREADS=64 FASTMAML_CUDA_MMA=1"
    assert got["base_factored"] == "factored|40 128|"  # a control: the method, no switch
    assert got["base_cuda+mma"] == "cuda|40 128|FASTMAML_CUDA_MMA=1"
    # the fused backward's A/B runs autograd's path: the written-out sweep has no lowrank_add backward
    assert got["fbwd3"] == ("factored|40 128|FASTMAML_FACTORED_REVERSE=autograd "
                            "FASTMAML_FACTORED_FUSED_BACKWARD=0")
    for refused in ("states", "mma+states", "mma+fwarps8", "nosuch", "lds+ieee"):
        assert got[refused] == "refused", refused
    defaults = _bash('echo "$AB_DEFAULT"').split()
    assert len(defaults) > 10 and all(got[v] != "refused" for v in defaults), got
    # the batch sizes: T=65,536 unless a variant names others; parts share theirs, or the join is refused
    sizes = _bash('for v in onestep onestep_small onestep_small+ow16; do ab_resolve "$v" && echo "$v|$tasks" '
                  '|| echo "$v|refused"; done')
    assert dict(line.split("|") for line in sizes.splitlines()) == {
        "onestep": "65536", "onestep_small": "25 1024", "onestep_small+ow16": "refused"}
    # The one-step kernel's variants measure K=1 only (at K=5 they would time the default sweep again); a
    # part joined with them keeps the steps they share.
    steps = _bash('for v in onestep ow16+mma mma base_cuda; do ab_resolve "$v"; echo "$v|$steps|$setting"; done')
    got = dict(line.split("|", 1) for line in steps.splitlines())
    assert got["onestep"] == "1|FASTMAML_CUDA_ONESTEP=1"
    assert got["ow16+mma"] == "1|FASTMAML_CUDA_ONESTEP=1 FASTMAML_ONESTEP_WARPS=16 FASTMAML_CUDA_MMA=1"
    assert got["mma"].startswith("1 5|") and got["base_cuda"] == "1 5|"


def _mode_defaults(mode: str, env: str = "") -> dict:
    """The variables gpu_check.sh's `--measure` / `--tests` defaults leave set, for MODE `mode` with the
    assignments `env` made first."""
    script = (BENCH / "gpu_check.sh").read_text()
    block = script[script.index('if [ "$MODE" = measure ]; then'):]
    block = block[:block.index("\nfi\n") + 4]
    out = _bash(f"""MODE={mode}
{env}
{block}
for v in EXPLAIN REPORTS NCU_ONESTEP_S AB_S AB_VARIANTS CUDA_TESTS_S; do echo "$v=${{!v:-}}"; done""")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_gpu_check_modes_fit_their_time():
    """--measure's default A/B list fits its AB_S at the 25 s a variant the A/B needs (a variant past that is
    not run, and the run fails), and every one resolves; a --tests call with the quick tests off (the
    session's third call, for a switch's tests or an ncu) leaves out auto's choice and the register
    reports, which the first call gave (the nvcc report alone takes minutes, and the run waits for it)."""
    measure = _mode_defaults("measure")
    variants = measure["AB_VARIANTS"].split()
    assert variants and len(variants) <= int(measure["AB_S"]) // 25, measure
    out = _bash(f'for v in {" ".join(variants)}; do ab_resolve "$v" || echo "refused $v"; done')
    assert "refused" not in out, out
    first = _mode_defaults("tests")
    assert first["EXPLAIN"] == "" and first["REPORTS"] == "" and first["CUDA_TESTS_S"] == "110", first
    later = _mode_defaults("tests", "CUDA_TESTS_S=0 TRITON_TESTS_S=0")
    assert later["EXPLAIN"] == "0" and later["REPORTS"] == "0" and later["CUDA_TESTS_S"] == "0", later
    asked = _mode_defaults("tests", "CUDA_TESTS_S=0 TRITON_TESTS_S=0 REPORTS=1")
    assert asked["REPORTS"] == "1", asked  # what the call sets stays


def test_register_report_is_stopped_without_procps(tmp_path):
    """gpu_check.sh's stop_report ends the register report's compiles (each `timeout 300 nvcc` leads a
    process group of its own) by a look through /proc, so a machine without pkill stops them too, and it
    leaves other compiles alone, and the shell whose script names the same command."""
    import os

    (tmp_path / "nvcc").write_text("#!/usr/bin/env bash\nsleep 60\n")
    (tmp_path / "nvcc").chmod(0o755)
    (tmp_path / "bin").mkdir()  # no pkill on this PATH
    os.symlink((tmp_path / "nvcc"), tmp_path / "bin" / "nvcc")
    for tool in ("bash", "sleep", "tr", "grep", "timeout", "cut"):
        found = next((Path(d) / tool for d in os.environ["PATH"].split(os.pathsep) if (Path(d) / tool).exists()),
                     None)
        if found is not None:
            os.symlink(found, tmp_path / "bin" / tool)
    script = (BENCH / "gpu_check.sh").read_text()
    function = script[script.index("stop_report() {"):]
    function = function[:function.index("\n}\n") + 3]
    out = _bash(f"""{function}
PTXAS_PID=999999
timeout 300 nvcc -c /tmp/fastmaml_ptxas_a.cu & mine=$!
timeout 300 nvcc -c /tmp/another.cu & other=$!
sleep 0.5
stop_report
sleep 0.5
for p in $mine $other; do [ "$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null)" = S ] && echo "alive $p"; done
echo "mine $mine other $other"
kill $other $mine 2>/dev/null; true""", env={"PATH": str(tmp_path / "bin")})
    mine, other = out.split("\n")[-2].split()[1::2]
    assert f"alive {other}" in out and f"alive {mine}" not in out, out


def test_prewarm_is_stopped_with_its_processes(tmp_path):
    """stop_prewarm waits up to PREWARM_WAIT_S for the background compile loop, then stops the loop and the
    processes it runs, so that nothing of it runs beside the A/B's timed calls."""
    out = _bash(f'''DIR={tmp_path}
( echo "== one"; sleep 60 | cat ) > "$DIR/prewarm.log" 2>&1 &
PREWARM_PID=$!
sleep 0.5
kids=$(child_pids "$PREWARM_PID" | xargs)
echo "kids $kids"
PREWARM_WAIT_S=1 stop_prewarm
sleep 0.3
for k in $kids; do [ "$(cut -d' ' -f3 /proc/$k/stat 2>/dev/null)" = S ] && echo "alive $k"; done
echo "pid [$PREWARM_PID]"''')
    assert len(out.split("\n")[0].split()) == 3, out  # the loop ran its two processes
    assert "alive" not in out and "pid []" in out and "variants started: 1" in out, out
    assert "prewarm stopped after waiting 1s" in (tmp_path / "prewarm.log").read_text()


# ncu's `--page source --print-source cuda,sass --csv` layout (2024.1-2025.x): for every file of the kernel a
# file and a function row, a header whose second "Source" is the instruction, per line its totals, then its
# instructions (line number empty); an instruction that two inlined lines share is listed under both; "..."
# elides. The `sass` view: a kernel row and a header per launch, then the instructions. Made-up numbers.
_STALLS = ["stall_barrier", "stall_long_sb", "stall_mio", "stall_barrier (Not Issued)"]
_METRICS = ["Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)", "# Samples",
            "Instructions Executed", "Thread Instructions Executed", *_STALLS]
_FFMA = ["0x7f00", "@!P0 FFMA R1, R2, R3, R1 ", "30", "5", "30", "2000", "64000", "0", "5", "25", "0"]
_LDS = ["0x7f10", "LDS.128 R4, [R9+0x10] ", "40", "5", "40", "1000", "32000", "0", "15", "25", "0"]
_BAR = ["0x7f20", "BAR.SYNC.DEFER_BLOCKING 0x0 ", "30", "30", "30", "500", "16000", "30", "0", "0", "30"]
_KERNEL = "void bwd_kernel<float>(Net)"


def _write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as fh:
        csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(rows)


def _ncu_csv(path):
    header = ["Line No", "Source", "Address", "Source", *_METRICS]
    _write_csv(path, [
        ["File Path", "/src/csrc/task/products.h"], ["Function Name", _KERNEL], header,
        ["41", "acc += a[k] * b[k];", "-", "-", "70", "10", "70", "3000", "96000", "0", "20", "50", "0"],
        ["", "", *_FFMA], ["", "", *_LDS], ["", "", "...", "", "", "", "", "", "", "", "", "", ""],
        ["File Path", "/src/csrc/cuda/kernels.cuh"], ["Function Name", _KERNEL], header,
        ["7", "__syncthreads();", "-", "-", "30", "30", "30", "1500", "48000", "30", "0", "0", "30"],
        ["", "", *_BAR], ["", "", *_LDS]])


def _ncu_sass_csv(path, launches):
    _write_csv(path, [["Kernel Name", _KERNEL, ""], ["Address", "Source", *_METRICS], _FFMA, _LDS, _BAR] * launches)


def test_ncu_source_page_is_read_by_line_and_instruction(tmp_path, capsys):
    """Totals count each instruction once (the LDS listed under both files' lines and the elision row not
    twice), opcodes lose their predicate and modifiers, each line keeps its file, and the report ranks lines
    with their stall reasons."""
    path = tmp_path / "source.csv"
    _ncu_csv(path)
    prof = ncu_source.read(path)
    assert prof.kernels == [_KERNEL]
    assert prof.inst == 3500 and prof.samples == 100
    assert dict(prof.opcodes) == {"FFMA": 2000, "LDS": 1000, "BAR": 500}
    assert [(r.file.split("/")[-1], r.line, r.inst) for r in prof.lines] == [("products.h", 41, 3000),
                                                                              ("kernels.cuh", 7, 1500)]
    assert prof.stalls == {"barrier": 30, "long_sb": 20, "mio": 50}
    text = "\n".join(ncu_source.report(prof, top=1, tasks=7))
    assert "warp instructions a task: 500" in text
    assert "among the instructions executed: 57.1%" in text  # FFMA 2000 of 3500
    assert "products.h:41" in text and "mio 71%" in text
    assert "by file: products.h 85.7%, kernels.cuh 14.3%" in text
    out = tmp_path / "lines.csv"
    assert ncu_source.main([str(path), "--lines-out", str(out), "--tasks", "7"]) == 0
    assert out.read_text().splitlines()[1].startswith("/src/csrc/task/products.h,41,3000,70,mio=50 long_sb=20")
    assert "FFMA 57.1%" in capsys.readouterr().out


def test_ncu_totals_come_from_the_sass_view_and_add_up_over_launches(tmp_path, capsys):
    """The `sass` view of a report of several launches (the low-rank stage's four) lists each launch's
    instructions in turn: they add up, and with `--sass` they are the totals, the lines still the other
    view's."""
    lines, sass = tmp_path / "source.csv", tmp_path / "sass.csv"
    _ncu_csv(lines)
    _ncu_sass_csv(sass, launches=3)
    prof = ncu_source.read(sass)
    assert prof.inst == 3 * 3500 and dict(prof.opcodes) == {"FFMA": 6000, "LDS": 3000, "BAR": 1500}
    assert ncu_source.main([str(lines), "--sass", str(sass), "--tasks", "3"]) == 0
    out = capsys.readouterr().out
    assert "warp instructions executed: 10,500" in out and "a task: 3,500" in out
    assert "products.h:41" in out and "by file: products.h 85.7%" in out


def test_sweep_prints_each_new_triton_kernel_once(monkeypatch, capsys):
    """The sweep prints the Triton kernels compiled since its last row as it goes (an A/B run ends by its
    timeout, which would lose a report printed only at the end), each kernel once."""
    import bench_throughput

    from fastmaml.backends import _triton_targets

    compiled = ["registers: maml_bwd_kernel 255 registers"]
    monkeypatch.setattr(_triton_targets, "compiled_report", lambda: list(compiled))
    reported: set[str] = set()
    bench_throughput._print_new_triton_kernels(reported)
    compiled.append("scratch: maml_bwd_kernel 246 registers")
    bench_throughput._print_new_triton_kernels(reported)
    out = capsys.readouterr().out.splitlines()
    assert out == ["    triton kernel compiled: registers: maml_bwd_kernel 255 registers",
                   "    triton kernel compiled: scratch: maml_bwd_kernel 246 registers"]


def test_ncu_source_page_of_another_release(tmp_path):
    """A release that names the file row "File Name" still places each line in its file, and one whose stall
    columns are not `stall_*` says the stall reasons were not read, with the columns it found."""
    path = tmp_path / "source.csv"
    _ncu_csv(path)
    renamed = path.read_text().replace('"File Path"', '"File Name"').replace('"stall_', '"smsp__pcsamp_')
    path.write_text(renamed)
    prof = ncu_source.read(path)
    assert [r.file.split("/")[-1] for r in prof.lines] == ["products.h", "kernels.cuh"]
    assert not prof.stalls
    text = "\n".join(ncu_source.report(prof))
    assert "none read (no 'stall_*' columns)" in text and "smsp__pcsamp_barrier" in text


def test_ncu_source_page_without_the_counters_is_refused(tmp_path, capsys):
    """A report without SourceCounters has no "Instructions Executed" column: said, not read as zeros."""
    path = tmp_path / "source.csv"
    path.write_text('"Kernel Name","k"\n"Address","Source","# Samples"\n"0x1","FFMA R1, R2, R3, R1","4"\n')
    assert ncu_source.main([str(path)]) == 1
    assert "SourceCounters" in capsys.readouterr().err


def _gpu_check_function(name: str) -> str:
    """The definition of the shell function `name` in gpu_check.sh (its text up to its closing brace)."""
    script = (BENCH / "gpu_check.sh").read_text()
    start = script.index(f"{name}() {{")
    return script[start:script.index("\n}\n", start) + 3]


def _stub_tool(tmp_path: Path, name: str, text: str) -> Path:
    """A folder tmp_path/bin holding an executable stub `name` with the script `text` (for PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
    return bin_dir


_STUB_NCU = """#!/usr/bin/env bash
# ncu as the GPU check calls it: -o NAME writes NAME.ncu-rep (unless STUB_NO_REPORT), -i REP --page source
# --print-source VIEW prints that view's CSV (fails under STUB_NO_SOURCE), --page details a line.
out=""; page=""; view=""; prev=""
for a in "$@"; do
  [ "$prev" = -o ] && out=$a; [ "$prev" = --page ] && page=$a; [ "$prev" = --print-source ] && view=$a; prev=$a
done
if [ -n "$out" ]; then [ -n "${STUB_NO_REPORT:-}" ] || echo report > "$out.ncu-rep"; exit 0; fi
if [ "$page" = details ]; then echo "Section: SpeedOfLight"; exit 0; fi
if [ -n "${STUB_NO_SOURCE:-}" ]; then echo "==ERROR== no source"; exit 1; fi
cat "$STUB_DIR/$view.csv"
"""


@pytest.mark.parametrize("case", ["profiled", "stale report, none profiled", "no source page"])
def test_gpu_check_ncu_stage_with_a_stub_ncu(tmp_path, case):
    """gpu_check.sh's `ncu_launches` against a stub ncu: it keeps the report, reads both source views and
    sums them into profile.txt (exit 0); a report left from an earlier run is not read again when this one
    profiled nothing (exit 3); a source page that cannot be read fails the stage (exit 4)."""
    import os
    import subprocess

    function = _gpu_check_function("ncu_launches")
    bin_dir, out = _stub_tool(tmp_path, "ncu", _STUB_NCU), tmp_path / "out"
    out.mkdir()
    _ncu_csv(tmp_path / "cuda,sass.csv")
    _ncu_sass_csv(tmp_path / "sass.csv", launches=1)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DIR=str(out), STUB_DIR=str(tmp_path))
    if case.startswith("stale"):
        (out / "ncu_k.ncu-rep").write_text("an earlier run's")
        env["STUB_NO_REPORT"] = "1"
    elif case == "no source page":
        env["STUB_NO_SOURCE"] = "1"
    run = subprocess.run(["bash", "-c", f'set -uo pipefail\n{function}\nncu_launches 60 k "" kern "--launch-count 1" '
                          "--methods cuda --tasks 7"], cwd=BENCH.parent, env=env, capture_output=True, text=True)
    profile = (out / "profile.txt").read_text()
    if case == "profiled":
        assert run.returncode == 0, profile
        assert "warp instructions a task: 500" in profile and "products.h:41" in profile
        assert (out / "ncu_k_lines.csv").exists() and (out / "ncu_k.ncu-rep").exists()
    elif case.startswith("stale"):
        assert run.returncode == 3 and "no report" in profile
        assert "warp instructions" not in profile and not (out / "ncu_k.ncu-rep").exists()
    else:
        assert run.returncode == 4 and "==ERROR== no source" in profile


# ---- the prebuilt library carried to the GPU machine (benchmarks/prebuilt.py) -----------------------------

def _fake_build(folder: Path, payload: bytes = b"\x7fELF library") -> None:
    folder.mkdir(parents=True)
    (folder / "fastmaml_cpu.so").write_bytes(payload)
    (folder / "fastmaml.ok").write_text("built in 1.0 s\n")


def test_prebuilt_is_packed_installed_and_removed(tmp_path, monkeypatch):
    """A finished build is packed with its manifest; installed, it is where this machine's build looks, with
    the same bytes; a second install leaves it; uninstall removes only a folder that install made."""
    import json

    import prebuilt

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    want = prebuilt.expected_folder()
    _fake_build(want, b"\x7fELF the library")
    target = prebuilt.pack(tmp_path / "packs")
    assert target == tmp_path / "packs" / want.name
    manifest = json.loads((target / prebuilt.MANIFEST).read_text())
    assert manifest["folder"] == want.name and manifest["bytes"] == len(b"\x7fELF the library")

    import shutil

    shutil.rmtree(want)
    line = prebuilt.install(tmp_path / "packs")
    assert line.startswith("prebuilt: installed") and "cannot import" not in line, line
    assert (want / "fastmaml_cpu.so").read_bytes() == b"\x7fELF the library"
    assert (want / "fastmaml.ok").is_file() and (want / prebuilt.MANIFEST).is_file()
    assert prebuilt.install(tmp_path / "packs").startswith("prebuilt: not needed")
    assert prebuilt.uninstall().startswith("prebuilt: removed") and not want.exists()
    # A build of this machine's own (no manifest) is never removed.
    _fake_build(want)
    assert prebuilt.uninstall().startswith("prebuilt: nothing to remove") and (want / "fastmaml_cpu.so").is_file()


def test_prebuilt_for_other_sources_is_not_used(tmp_path, monkeypatch):
    """A pack whose folder name differs (other sources, torch, Python, flags or architectures) is listed and
    left alone, a pack without its stamp is not installed, and nothing is packed from an unfinished build."""
    import prebuilt

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    want = prebuilt.expected_folder()
    with pytest.raises(SystemExit, match="no finished build"):
        prebuilt.pack(tmp_path / "packs")
    _fake_build(want)
    target = prebuilt.pack(tmp_path / "packs")
    other = target.with_name(want.name.replace("fastmaml_", "fastmaml_0"))
    target.rename(other)
    import shutil

    shutil.rmtree(want)
    line = prebuilt.install(tmp_path / "packs")
    assert line.startswith("prebuilt: none for this build") and other.name in line, line
    assert not want.exists()
    other.rename(target)
    (target / "fastmaml.ok").unlink()
    assert prebuilt.install(tmp_path / "packs").startswith("prebuilt: none") and not want.exists()


_STUB_PYTHON = """#!/usr/bin/env bash
# prebuilt.py as the build stage calls it: install and uninstall leave a line and a trace.
case "$2" in
  install) echo "install" >> "$TRACE"; echo "${STUB_INSTALL:-prebuilt: installed /cache/x (commit c)}" ;;
  uninstall) echo "uninstall" >> "$TRACE"; echo "prebuilt: removed /cache/x" ;;
esac
"""


@pytest.mark.parametrize("case", ["loads", "does not load", "no pack"])
def test_gpu_check_build_stage_falls_back_from_a_prebuilt_library(tmp_path, case):
    """gpu_check.sh's build stage: a carried pack is installed before the build; when the installed library
    does not load, it is removed and the extension built once more; without a matching pack, one build."""
    import os
    import subprocess

    script = (BENCH / "gpu_check.sh").read_text()
    start = script.index("  # A library built ahead")
    block = script[start:script.index('} > "$DIR/build.log"', start)]
    repo, out, bin_dir = tmp_path / "repo", tmp_path / "out", _stub_tool(tmp_path, "python", _STUB_PYTHON)
    for d in (repo / ".gpu_prebuilt", out):
        d.mkdir(parents=True)
    trace = tmp_path / "trace"
    fails = "1" if case == "does not load" else ""
    harness = f"""set -uo pipefail
check_rc() {{ echo "check_rc $*"; }}
build_extension() {{
  echo "build $1" >> "$TRACE"
  if [ -n "$FAILS" ] && [ "$(grep -c build "$TRACE")" = 1 ]; then
    echo "backend cpu        unavailable: loading the C++ extension failed: undefined symbol"
  else
    echo "backend cpu        available (0.1 s)"
  fi
}}
{{
{block}}} > "$DIR/build.log" 2>&1
"""
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DIR=str(out), REPO=str(repo), BUILD_S="150",
               TRACE=str(trace), FAILS=fails)
    if case == "no pack":
        env["STUB_INSTALL"] = "prebuilt: none for this build (x); packs found: none; the extension is compiled here"
    run = subprocess.run(["bash", "-c", harness], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    steps = trace.read_text().split("\n")[:-1]
    log = (out / "build.log").read_text()
    if case == "does not load":
        assert steps == ["install", "build 150", "uninstall", "build 150"], steps
        assert "prebuilt: removed" in log and log.rstrip().endswith("available (0.1 s)")
    else:
        assert steps == ["install", "build 150"], steps


def test_compile_ahead_runs_the_sweeps_first_calls_in_parallel(tmp_path, capsys):
    """compile_ahead.py keeps the sweep's settings of the methods that compile Triton kernels, the largest T
    first, and runs each first call in a process of its own (here the factored backend on the CPU, which
    compiles nothing: the pool, its workers' imports and their report are what run)."""
    import bench_throughput
    import compile_ahead

    args = bench_throughput.parse_args(["--device", "cuda", "--tasks", "65536", "25", "--steps", "5", "1",
                                        "--width", "40", "--methods", "cuda", "triton", "factored", "vmap"])
    got = compile_ahead.cells(args)
    assert got[:3] == [("triton", 65536, 1, 40, ()), ("factored", 65536, 1, 40, ()), ("triton", 65536, 5, 40, ())], got
    assert got[-1] == ("factored", 25, 5, 40, ()), got
    assert len(got) == 8 and {m for m, *_ in got} == {"triton", "factored"}
    got = compile_ahead.cells(args, ["A=1 B=x=y|triton|65536|1|128 40", "C=1|cuda|65536|1 5|40"])
    assert got[8:] == [("triton", 65536, 1, 40, (("A", "1"), ("B", "x=y"))),
                       ("triton", 65536, 1, 128, (("A", "1"), ("B", "x=y")))], got[8:]
    with pytest.raises(SystemExit, match="is not"):
        compile_ahead.cells(args, ["A|triton|65536|1|40"])

    assert compile_ahead.main(["--methods", "cuda", "vmap"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # A variant's switch reaches its call's process only: FASTMAML_FACTORED_K_LOOP takes two values, and a
    # wrong one fails the call when the factored backend reads it.
    assert compile_ahead.main(["--device", "cpu", "--methods", "factored", "--tasks", "5", "7", "--width", "6",
                               "--jobs", "2", "--variant", "FASTMAML_FACTORED_K_LOOP=bogus|factored|5|1|6"]) == 0
    out = capsys.readouterr().out
    assert "3 first calls in 2 processes" in out and "done in" in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("  factored")]
    plain = [ln for ln in lines if "[" not in ln]
    assert len(plain) == 2 and all(re.search(r" \d+\.\d s$", ln) for ln in plain), out
    assert [ln for ln in lines if ln.endswith("[FASTMAML_FACTORED_K_LOOP=bogus]") and " failed (" in ln], out


def test_gpu_check_compiles_ahead_the_sweep_and_the_ab_triton_variants(tmp_path):
    """gpu_check.sh's compile-ahead stage: the sweep's arguments, then one --variant for each A/B variant of a
    Triton-compiling method among those the A/B has time for (AB_S / 25), under a limit of at most half the
    sweep's; the sweep's limit is then cut to what the later stages leave."""
    import os

    script = (BENCH / "gpu_check.sh").read_text()
    start = script.index("  # The Triton kernels the sweep's first calls would compile")
    block = script[start:script.index('  stage "sweep on $DEVICE', start)]
    room = _gpu_check_function("sweep_room")
    bin_dir = _stub_tool(tmp_path, "python",
                         '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS"\necho "compile ahead: done"\n')
    harness = f"""set -uo pipefail
stage() {{ echo "stage $*"; }}
left() {{ echo "$LEFT"; }}
{room}
SWEEP=(--tasks 25 65536 --steps 1 5)
{block}
echo "budget $budget"
"""
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", ARGS=str(tmp_path / "args"), DIR=str(tmp_path),
               DEVICE="cuda", DRY_RUN="0", budget="75", AB_S="100", AB_VARIANTS="tonestep onestep ftf32x3 keep1 scratch",
               SWEEP_FIRST="1", PROFILE_S="0", TIMELINE_S="25", LEFT="200")
    out = _bash(harness, env)
    args = (tmp_path / "args").read_text().split("\n")[:-1]
    assert args[:8] == ["benchmarks/compile_ahead.py", "--device", "cuda", "--order", "second", "--tasks", "25",
                        "65536"], args
    variants = [args[i + 1] for i, a in enumerate(args) if a == "--variant"]
    # AB_S=100: the first four variants can run; onestep is the CUDA kernel's, scratch does not fit.
    assert variants == ["FASTMAML_TRITON_ONESTEP=1|triton|65536|1|40 128",
                        "FASTMAML_FACTORED_PRECISION=tf32x3|factored|65536|1 5|40 128",
                        "FASTMAML_TRITON_WIDTH1=keep|triton|65536|1 5|40"], variants
    assert "limit 37s" in out and "budget 75" in out, out
    # Less left after it than the sweep's limit and the later stages: the sweep's limit is cut (not under 30).
    env.update(LEFT="80")
    assert "budget 55" in _bash(harness, env)
    env.update(LEFT="40")
    assert "budget 30" in _bash(harness, env)
    # No A/B: the sweep alone; a sweep limit under 30 s: no compile ahead.
    env.update(AB_S="0")
    _bash(harness, env)
    assert "--variant" not in (tmp_path / "args").read_text()
    (tmp_path / "args").unlink()
    env.update(budget="29")
    assert "stage compiling" not in _bash(harness, env) and not (tmp_path / "args").exists()


def test_ab_table_compares_each_variant_row_with_the_sweeps(tmp_path, capsys):
    """report.py --ab: a variant's row against the sweep's row of the same method and setting (not another
    method's, width's or K's), and against the sweep's vmap; what the sweep lacks shows "-", a failed row its
    status."""
    import csv

    import report

    cols = ["method", "device", "T", "K", "width", "order", "tasks_per_s", "status"]

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=cols)
            out.writeheader()
            for r in rows:
                out.writerow(dict(zip(cols, r)))

    write(tmp_path / "throughput.csv", [
        ["cuda", "cuda", 65536, 1, 40, "second", 4_000_000, "ok"], ["triton", "cuda", 65536, 1, 40, "second", 1e6, "ok"],
        ["cuda", "cuda", 65536, 5, 40, "second", 1_000_000, "ok"], ["vmap", "cuda", 65536, 1, 40, "second", 5e6, "ok"]])
    write(tmp_path / "ab" / "onestep" / "throughput.csv", [
        ["cuda", "cuda", 65536, 1, 40, "second", 8_000_000, "ok"], ["cuda", "cuda", 65536, 1, 128, "second", 2e6, "ok"]])
    write(tmp_path / "ab" / "mma" / "throughput.csv", [["cuda", "cuda", 65536, 5, 40, "second", "", "failed"]])
    assert report.main([str(tmp_path / "throughput.csv"), "--ab", str(tmp_path / "ab")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["variant", "method", "T", "K", "width", "variant", "default", "ratio", "vs", "vmap"]
    rows = {tuple(ln.split()[:5]): ln.split()[5:] for ln in lines[1:]}
    assert rows[("onestep", "cuda", "65536", "1", "40")] == ["8,000,000", "4,000,000", "2.00x", "1.60x"]
    assert rows[("onestep", "cuda", "65536", "1", "128")] == ["2,000,000", "-", "-", "-"]
    assert rows[("mma", "cuda", "65536", "5", "40")] == ["failed", "1,000,000", "-", "-"]


def test_gpu_check_summary_gives_the_float32_errors(tmp_path):
    """The summary lists the GPU's largest float32 errors from the tests' log (FASTMAML_ERROR_LOG), the
    figures the tests' bounds are to be set from; the CPU's rows are counted, not listed."""
    import json
    import os

    script = (BENCH / "gpu_check.sh").read_text()
    start = script.index("# The float32 comparisons' largest errors on the card")
    block = "set -uo pipefail\n" + script[start:script.index("FINISHED=1", start)]
    log = tmp_path / "float32_errors.jsonl"
    rows = [("t[cuda-a]", "grad", 3e-3, 2e-5, "cuda"), ("t[cuda-b]", "preds", 4e-4, 9e-5, "cuda"),
            ("t[cpu]", "grad", 5e-2, 5e-2, "cpu")]
    log.write_text("".join(json.dumps({"test": f"tests/x.py::{t}", "tensor": n, "worst_over_scale": w,
                                       "norm_wise": nw, "numel": 7, "device": d}) + "\n"
                           for t, n, w, nw, d in rows))
    env = dict(os.environ, DIR=str(tmp_path), FASTMAML_ERROR_LOG=str(log),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = _bash(block, env)
    lines = out.splitlines()
    assert lines[0] == "float32 comparisons: 3, 2 of them on the GPU"
    assert lines[1].split() == ["worst_over_scale", "3.00e-03", "(7", "elements)", "t[cuda-a]", "[grad]"]
    assert lines[3].split()[:2] == ["norm_wise", "9.00e-05"] and "cpu" not in out
    assert (tmp_path / "summary.txt").read_text() == out
    env.pop("FASTMAML_ERROR_LOG")
    assert _bash(block, env) == ""  # no log (a run without tests): nothing


def test_gpu_check_summary_adds_the_ab_table(tmp_path):
    """gpu_check.sh's summary appends the A/B table when the run has an ab/ folder and a sweep to compare
    with: its own throughput.csv, or AB_BASELINE's where it ran no sweep; without either, nothing."""
    import os
    import shutil

    script = (BENCH / "gpu_check.sh").read_text()
    start = script.index("# The A/B's rows against the sweep's")
    block = "set -uo pipefail\n" + script[start:script.index("FINISHED=1", start)]
    run_dir, earlier = tmp_path / "run", tmp_path / "earlier"
    (run_dir / "ab" / "onestep").mkdir(parents=True)
    earlier.mkdir()
    header = "method,device,T,K,width,order,tasks_per_s,status\n"
    (run_dir / "ab" / "onestep" / "throughput.csv").write_text(header + "cuda,cuda,65536,1,40,second,8000000,ok\n")
    (earlier / "throughput.csv").write_text(header + "cuda,cuda,65536,1,40,second,4000000,ok\n")
    env = dict(os.environ, DIR=str(run_dir), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    _bash(block, env)
    assert not (run_dir / "summary.txt").exists()  # no sweep in this run and no baseline named
    env["AB_BASELINE"] = str(earlier / "throughput.csv")
    out = _bash(block, env)
    assert "2.00x" in out and "2.00x" in (run_dir / "summary.txt").read_text()
    del env["AB_BASELINE"]
    shutil.copy(earlier / "throughput.csv", run_dir / "throughput.csv")
    (run_dir / "summary.txt").unlink()
    assert "2.00x" in _bash(block, env)


def test_traffic_charges_reads_and_writes_not_views():
    """benchmarks/traffic.py: a product is charged its two operands and its output; a view, a
    transpose, a matmul's reshape and an allocation nothing; a broadcast operand its distinct elements
    once, an overlapping view no more than its storage; zeros_like its output alone; an in-place product its target read and written; an `out=` and a
    copy_ their target written only."""
    import torch
    import traffic

    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    counter = traffic.TrafficCount()
    with counter:
        c = a @ b
        c.t(), c.reshape(-1)[:4]  # views: nothing moves (c.t().reshape(-1) would copy, and be charged)
        torch.empty(100)
        d = c + torch.ones(7, dtype=torch.float64).expand(3, 7)  # a row broadcast over 3 rows: read once
        torch.zeros_like(d)  # reads d's shape only: charged its output
        d.addmm_(a, b)  # d read and written, a and b read
        torch.mul(c, 2.0, out=d)  # c read, d written
        d.copy_(c)  # c read, d written
        torch.randn(2, 3, 5, dtype=torch.float64) @ b  # mm of [6, 5] and [5, 7], then an _unsafe_view
        torch.arange(100, dtype=torch.float64).unfold(0, 50, 1).sum()  # 51 overlapping windows: 100 read
    assert d.shape == (3, 7)
    assert dict(counter.bytes) == {"aten::mm": 8 * (15 + 35 + 21 + 30 + 35 + 42), "aten::ones": 8 * 7,
                                   "aten::add": 8 * (21 + 7 + 21), "aten::zeros_like": 8 * 21,
                                   "aten::addmm_": 8 * (2 * 21 + 15 + 35), "aten::mul": 8 * (21 + 21),
                                   "aten::copy_": 8 * (21 + 21), "aten::randn": 8 * 30,
                                   "aten::arange": 8 * 100, "aten::sum": 8 * (100 + 1)}
    assert counter.calls["aten::mm"] == 2 and "aten::t" not in counter.calls


def test_traffic_runs_on_the_cpu_and_reads_a_measured_csv(tmp_path, capsys):
    """A cell of vmap and the cpu kernel, with a measured time from a throughput CSV: the bytes a task are
    those of one meta-iteration counted here apart, the floor is them at the given batch and bandwidth,
    its share of the measured time is printed, and the fused kernel moves far fewer bytes."""
    import csv

    import _harness
    import traffic

    path = tmp_path / "throughput.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "T", "K", "width", "order", "ms", "status"])
        writer.writeheader()
        writer.writerow(dict(method="vmap", T=64, K=1, width=24, order="second", ms=1000, status="ok"))
    assert traffic.main(["--methods", "vmap", "cpu", "--steps", "1", "--width", "24", "--tasks", "8",
                         "--scale-tasks", "64", "--bandwidth", "0.001", "--measured", str(path)]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    step = _harness.make_step("vmap", _harness.make_workload(8, 1, 24))
    step()
    counter = traffic.TrafficCount()
    with counter:
        step()
    vmap_kb, vmap_floor = float(rows["vmap"][4]), float(rows["vmap"][5])
    assert vmap_kb == pytest.approx(sum(counter.bytes.values()) / 8 / 1e3, abs=0.051)
    assert vmap_floor == pytest.approx(vmap_kb * 1e3 * 64 / 1e9 * 1e3, rel=1e-3)
    assert rows["vmap"][7] == f"{100 * vmap_floor / 1000:.0f}%"
    assert rows["cpu"][6] == "-" and float(rows["cpu"][4]) < vmap_kb / 5


_STUB_SWITCH_PYTHON = """#!/usr/bin/env bash
# python as switch_tests calls it (-m pytest ...): records the backend, the switches and the arguments, and
# fails where the backend is STUB_FAIL.
echo "backend=$FASTMAML_TEST_BACKENDS mma=${FASTMAML_CUDA_MMA:-} blocks=${FASTMAML_CUDA_MIN_BLOCKS:-} \\
states=${FASTMAML_CUDA_STATES:-} layout=${FASTMAML_TRITON_LAYOUT:-} nreg=${FASTMAML_TRITON_MAXNREG:-} args=$*" \\
  >> "$STUB_LOG"
[ "$FASTMAML_TEST_BACKENDS" != "${STUB_FAIL:-}" ]
"""


def test_gpu_check_switch_tests_run_each_backend_under_its_switch(tmp_path):
    """gpu_check.sh's `switch_tests` (the --tests call's tests of the A/B's switches) against a stub python:
    each entry, an A/B variant's name with a limit, runs test_backends.py's float32 comparisons for that
    variant's backend with its switches only, a limit of 0 skips its entry, and a failing run, or a name the
    A/B does not know, is listed as that entry's failure."""
    import os
    import subprocess

    function = _gpu_check_function("switch_tests")
    bin_dir, out = _stub_tool(tmp_path, "python", _STUB_SWITCH_PYTHON), tmp_path / "out"
    out.mkdir()
    stubs = ('capped() { echo "$1"; }\ntoo_late() { return 1; }\nstage() { echo "== $*"; }\n'
             'check_rc() { [ "$2" = 0 ] || echo "FAILED: $1"; }\nfail() { echo "LISTED: $1"; }\n')
    call = 'source benchmarks/ab_variants.sh\nswitch_tests "mma|30" "blocks6+states|0" "nosuch|10" "nreg128|20"'
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DIR=str(out), STUB_LOG=str(tmp_path / "log"),
               STUB_FAIL="triton")
    run = subprocess.run(["bash", "-c", f"set -uo pipefail\n{stubs}{function}\n{call}"], cwd=BENCH.parent, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    assert len(calls) == 2, calls
    assert calls[0].startswith("backend=cuda mma=1 blocks= states= layout= nreg= args=-m pytest tests/test_backends.py")
    assert calls[1].startswith("backend=triton mma= blocks= states= layout=scratch nreg=128 args=-m pytest")
    assert all("-k gpu_sizes or (maml_matches_reference and f32)" in c for c in calls)
    failures = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
    assert failures == ["FAILED: tests of triton with FASTMAML_TRITON_LAYOUT=scratch FASTMAML_TRITON_MAXNREG=128"], \
        run.stdout
    assert "LISTED: tests of nosuch (no such A/B variant)" in run.stdout.splitlines(), run.stdout
