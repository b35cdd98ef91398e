"""The Triton kernels compile for sm_90 (H100) without a GPU, so GPU-only compile errors fail CI.

Every kernel variant the backend launches is selected by its compile-time constants
(`triton_maml.kernel_constants`: kernel, dtype, loss, activation, depth, padded sizes, first order,
which gradients). This file compiles a covering set of them (each value of each constant at least once,
plus the sinusoid net and the largest sizes the backend takes) with `triton.compile(ASTSource,
target=GPUTarget("cuda", 90, 32))`, through ptxas to a cubin, and checks the shared memory each needs
fits one H100 block. Both layouts of the kernels are covered: each call's own (`auto`: the scratch
layout from a padded width of 128) and the scratch layout forced at the small sizes. The default leaves
out the two slowest compiles: the register layout at width 128 (FASTMAML_TRITON_LAYOUT=registers, not
what `auto` runs), whose backward took 8 minutes on 2 cores beside another compile, and the float32
backward at width 64 with 64 points (303 s, as long as the rest of the set together; 196,608 B of
shared memory). The float64 backward at width 64 stays (212,992 B, the most of any variant), as do
the float32 forward at 64 x 64 and the float32 backward at width 128.
`FASTMAML_TRITON_COMPILE_SET=full` adds them back (`_slowest`), `=small` leaves out every largest size,
`=all` compiles every combination (hours). On 2 cores the default set took about 3 minutes, `small`
about 1; the variants are compiled in parallel over the cores, and each one's time is printed
(`pytest -s`).

The compiler must run with `TRITON_INTERPRET` unset (conftest.py sets it for the in-process tests, and
the kernels read it when they are defined), so the compiles run in subprocesses, this file being their
script: `python tests/test_triton_compile.py '<json list of variants>'` prints one JSON line per variant.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
import importlib.util

import pytest

SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def _variant(kind, dtype, dims, n_support, n_query, loss, activation, layout="", **options):
    """One kernel variant; `layout` "" is the one a call of these sizes takes (`triton_maml.layout_for`)."""
    return dict(kind=kind, dtype=dtype, dims=list(dims), n_support=n_support, n_query=n_query, loss=loss,
                activation=activation, layout=layout, options=options)


def covering_variants() -> list[dict]:
    """Each kernel with every (dtype, loss, activation), each depth and option both ways, and sizes
    from one 16-block to the backend's largest."""
    out = []
    combos = list(itertools.product(["float32", "float64"], [0, 1], [0, 1]))
    for layout in ("", "scratch"):  # the small sizes take the register layout; the scratch one forced
        for i, (dtype, loss, act) in enumerate(combos):
            depth = 1 + (i + (layout == "scratch")) % 4
            dims = [5] + [21] * (depth - 1) + [3]  # blocks of 16 and 32
            out.append(_variant("bwd", dtype, dims, 10, 19, loss, act, layout, first_order=i % 2 == 1,
                                need_lr_grad=i % 3 != 2, need_x_grad=i % 4 != 3))
            out.append(_variant("fwd", dtype, dims, 10, 19, loss, act, layout, query=i % 2 == 0))
    # The sinusoid net of the MAML paper, and the width-128 one (which takes the scratch layout); their
    # backward as a training call launches it (maml_train: the forward's outputs too).
    for width in (40, 128):
        out.append(_variant("bwd", "float32", [1, width, width, 1], 10, 10, 0, 0, outputs=True))
        out.append(_variant("fwd", "float32", [1, width, width, 1], 10, 10, 0, 0))
    # Layers 1 wide (padded by default; under FASTMAML_TRITON_WIDTH1=keep, which
    # test_width_one_layers_are_not_turned_into_tf32_products compiles, their products are broadcasts and
    # sums): a hidden one with input gradients, and the sinusoid net's shape at small widths, first order and
    # forward without a query.
    out.append(_variant("bwd", "float64", [3, 1, 5], 10, 19, 1, 1, need_lr_grad=True, need_x_grad=True))
    out.append(_variant("bwd", "float32", [1, 21, 1], 10, 19, 0, 1, first_order=True, need_x_grad=True))
    out.append(_variant("fwd", "float32", [1, 6, 1], 10, 19, 0, 0, query=False))
    # The largest sizes the backend takes, with the options that need the most shared memory (less the
    # slowest compile, left to the full set).
    slow = {_name(v) for v in _slowest()}
    out += [v for v in _largest_variants() if _name(v) not in slow]
    return out


def _largest_variants() -> list[dict]:
    from fastmaml.backends.triton_maml import MAX_DEPTH, MAX_POINTS_BY_WIDTH

    out = []
    for dtype, table in MAX_POINTS_BY_WIDTH.items():
        for width, points in table.items():
            dims = [width] * (MAX_DEPTH + 1)
            name = str(dtype).replace("torch.", "")
            out.append(_variant("bwd", name, dims, points, points, 1, 1))
            out.append(_variant("fwd", name, dims, points, points, 1, 1))
    return out


def _registers_at_128() -> list[dict]:
    """The register layout at width 128 (FASTMAML_TRITON_LAYOUT=registers, the A/B's other value), whose
    backward is the slow compile (466 s of a 769 s run of the full set on 2 cores, beside another)."""
    dims = [128] * 5
    return [_variant("bwd", "float32", dims, 16, 16, 1, 1, "registers"),
            _variant("fwd", "float32", dims, 16, 16, 1, 1, "registers")]


def _slowest() -> list[dict]:
    """The compiles the default set leaves to `full`: the register layout at width 128, and the float32
    backward at width 64 with 64 points (one of the largest sizes; 303 s beside another compile)."""
    return _registers_at_128() + [_variant("bwd", "float32", [64] * 5, 64, 64, 1, 1)]


def all_variants() -> list[dict]:
    """Every combination of the options, per depth at small sizes and at each largest size."""
    import torch

    from fastmaml.backends.triton_maml import MAX_POINTS_BY_WIDTH

    out = []
    for dtype, loss, act, depth in itertools.product(["float32", "float64"], [0, 1], [0, 1], [1, 2, 3, 4]):
        for width, points in [(21, 10)] + list(MAX_POINTS_BY_WIDTH[getattr(torch, dtype)].items()):
            dims = [width] * depth + [3]
            for fo, lr, x in itertools.product([False, True], repeat=3):
                out.append(_variant("bwd", dtype, dims, points, points, loss, act, first_order=fo,
                                    need_lr_grad=lr, need_x_grad=x))
            for query in (True, False):
                out.append(_variant("fwd", dtype, dims, points, points, loss, act, query=query))
    return out + _registers_at_128()


def _name(v: dict) -> str:
    opts = "-".join(f"{k}={int(val)}" for k, val in sorted(v["options"].items()))
    return (f"{v['kind']}-{v['dtype']}-{'x'.join(map(str, v['dims']))}-n{v['n_support']}.{v['n_query']}"
            f"-loss{v['loss']}-act{v['activation']}" + (f"-{opts}" if opts else "")
            + (f"-{v['layout']}" if v["layout"] else ""))


# ---- the subprocess ------------------------------------------------------------------------------


def _compile_all(variants: list[dict]) -> None:
    """Compile each variant for sm_90; print one JSON line each (never raises)."""
    import torch

    from fastmaml.backends import _triton_targets as targets

    for v in variants:
        start = time.perf_counter()
        try:
            kernel, warps = targets.compile_for_target(v["kind"], getattr(torch, v["dtype"]), v["dims"],
                                                       v["n_support"], v["n_query"], v["activation"], v["loss"],
                                                       layout=v["layout"], **v["options"])
            result = dict(ok=True, shared=kernel.metadata.shared, cubin_bytes=len(kernel.asm["cubin"]),
                          num_warps=warps, mma=kernel.asm["ptx"].count("mma.sync"),
                          maxnreg=int((re.search(r"\.maxnreg\s+(\d+)", kernel.asm["ptx"]) or [0, 0])[1]))
        except Exception as err:  # reported to the test, which fails with it
            result = dict(ok=False, error=f"{type(err).__name__}: {err}"[-4000:])
        result.update(name=_name(v), seconds=round(time.perf_counter() - start, 1))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _compile_all(json.loads(sys.argv[1]))
    sys.exit(0)


# ---- the tests -----------------------------------------------------------------------------------


def _nvidia_compiler_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    try:
        from triton.backends import backends
    except Exception as err:  # pragma: no cover
        return f"triton.backends cannot be imported: {err}"
    if "nvidia" not in backends:
        return "this Triton has no NVIDIA backend"
    return None


def selected_variants() -> list[dict]:
    which = os.environ.get("FASTMAML_TRITON_COMPILE_SET", "covering")
    if which == "all":
        return all_variants()
    if which == "full":
        return covering_variants() + _slowest()
    if which == "small":  # without the largest sizes (each 1-2 minutes to compile)
        largest = {_name(v) for v in _largest_variants()}
        return [v for v in covering_variants() if _name(v) not in largest]
    if which != "covering":
        raise ValueError(f"FASTMAML_TRITON_COMPILE_SET must be small, covering, full or all, got {which!r}")
    return covering_variants()


VARIANTS = selected_variants()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_compile(variants: list[dict], cache_dir, extra_env: dict | None = None) -> subprocess.Popen:
    """This file as a subprocess compiling `variants` for sm_90: TRITON_INTERPRET unset (the kernels read it
    when they are defined), a fresh Triton cache, `extra_env` (the kernels' switches) set."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(extra_env or {}, TRITON_CACHE_DIR=str(cache_dir))
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(variants)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(stdout: str) -> dict:
    """A compile subprocess's JSON lines by variant name."""
    items = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {item["name"]: item for item in items}


# Seconds the slowest variants took to compile (the fixture prints each one's with `pytest -s`) on 2
# cores, two compiles at a time; the register layout at width 128 from a run of the full set. The rest
# took 1-18 s, backwards about three times as long as forwards.
_MEASURED_SECONDS = {
    "bwd-float32-64x64x64x64x64-n64.64-loss1-act1": 303,
    "fwd-float32-64x64x64x64x64-n64.64-loss1-act1": 52,
    "bwd-float64-64x64x64x64x64-n32.32-loss1-act1": 36,
    "bwd-float32-128x128x128x128x128-n16.16-loss1-act1": 30,
    "fwd-float64-64x64x64x64x64-n32.32-loss1-act1": 25,
    "bwd-float32-128x128x128x128x128-n16.16-loss1-act1-registers": 466,
}


def _compile_cost(variant: dict) -> float:
    """A variant's compile time in seconds: measured for the slowest, an average for the rest."""
    return _MEASURED_SECONDS.get(_name(variant), 9.0 if variant["kind"] == "bwd" else 3.0)


def _shares(variants: list[dict], workers: int) -> list[list[dict]]:
    """The variants dealt to `workers` compile processes, the costliest first, each to the least loaded
    process (dealing the list round-robin gave one process every backward: the list alternates bwd and
    fwd, and the fixture took the time of that one: 543 s in a CI run on 2 cores)."""
    shares: list[list[dict]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for v in sorted(variants, key=_compile_cost, reverse=True):
        i = load.index(min(load))
        shares[i].append(v)
        load[i] += _compile_cost(v)
    return shares


def _compile_variants(cache) -> dict:
    """Every variant compiled in parallel subprocesses (TRITON_INTERPRET unset, the Triton cache `cache`)."""
    workers = max(1, min(len(VARIANTS), os.cpu_count() or 1))
    procs = [_start_compile(share, cache) for share in _shares(VARIANTS, workers) if share]
    results = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=3600)
        results.update(_results(stdout))
        if proc.returncode != 0:
            results.setdefault("_worker_errors", []).append(stderr[-4000:])
    for name, item in sorted(results.items()):
        if not name.startswith("_"):
            print(f"compile sm_90 {item['seconds']:7.1f} s  shared {item.get('shared', '-')!s:>7}  {name}")
    return results


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every variant's compile result, compiled once per test run.

    Under pytest-xdist each worker process sets this module fixture up for itself. The first to get here
    compiles (on every core) and leaves the results in the run's shared temporary folder; the others wait
    on a lock and read them, rather than compile the whole set again at the same time."""
    why = _nvidia_compiler_missing()
    if why is not None:
        pytest.skip(why)
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:  # one process: nothing to share
        return _compile_variants(tmp_path_factory.mktemp("triton_cache"))
    from fastmaml import _ext

    shared = tmp_path_factory.getbasetemp().parent / f"sm90-compile-{run}"  # the workers' common parent
    shared.mkdir(exist_ok=True)
    with _ext._build_lock(shared):  # the extension build's lock: released if the holder dies
        done = shared / "results.json"
        if not done.exists():
            done.write_text(json.dumps(_compile_variants(shared / "triton_cache")))
        return json.loads(done.read_text())


@pytest.mark.parametrize("variant", VARIANTS, ids=[_name(v) for v in VARIANTS])
def test_kernel_compiles_for_sm90(compiled, variant):
    import torch

    from fastmaml.backends.triton_maml import size_limits

    name = _name(variant)
    assert size_limits(variant["dims"], variant["n_support"], variant["n_query"],
                       getattr(torch, variant["dtype"])) is None, f"{name} is past the backend's limits"
    assert name in compiled, f"no result for {name}: {compiled.get('_worker_errors')}"
    result = compiled[name]
    assert result["ok"], f"{name} does not compile for sm_90:\n{result['error']}"
    assert result["cubin_bytes"] > 0
    assert result["shared"] <= SM90_MAX_SHARED, (
        f"{name} needs {result['shared']} bytes of shared memory; an sm_90 block has {SM90_MAX_SHARED}"
    )


def _compile_in_subprocess(variants: list[dict], env_extra: dict, tmp_path) -> dict:
    """Compile `variants` with the kernels' switches `env_extra` (skips without Triton's NVIDIA backend)."""
    why = _nvidia_compiler_missing()
    if why is not None:
        pytest.skip(why)
    proc = _start_compile(variants, tmp_path / "triton_cache", env_extra)
    stdout, stderr = proc.communicate(timeout=1200)
    results = _results(stdout)
    assert results, f"no compile results:\n{stderr[-4000:]}"
    return results


def test_products_in_chunks_compile(tmp_path):
    """FASTMAML_TRITON_K_CHUNK=32 (the A/B's other value) compiles for sm_90: float32 with width and
    points padded to 64 (chunked products), float64 (never chunked)."""
    variants = [_variant("fwd", "float32", [2, 37, 3], 33, 5, 0, 1),
                _variant("bwd", "float32", [2, 37, 3], 33, 5, 0, 1),
                _variant("fwd", "float64", [2, 37, 3], 33, 5, 1, 0)]
    for name, result in _compile_in_subprocess(variants, {"FASTMAML_TRITON_K_CHUNK": "32"}, tmp_path).items():
        assert result["ok"], f"{name} does not compile with chunks of 32:\n{result['error']}"


def test_precision_switch_picks_tensor_cores_per_layout(tmp_path):
    """FASTMAML_TRITON_PRECISION: by default (auto) the register layout's products are FMAs and the
    scratch layout's tf32x3 tensor-core products; ieee and tf32x3 set both layouts (the GPU check's A/B).
    Each compiles for sm_90."""
    variants = [_variant("fwd", "float32", [5, 21, 3], 10, 19, 1, 1),  # its products show the instructions
                _variant("fwd", "float32", [5, 21, 3], 10, 19, 1, 1, "scratch")]
    names = [_name(v) for v in variants]
    for value, want in (("", [False, True]), ("ieee", [False, False]), ("tf32x3", [True, True])):
        results = _compile_in_subprocess(variants, {"FASTMAML_TRITON_PRECISION": value}, tmp_path / (value or "auto"))
        for name, tensor_cores in zip(names, want):
            result = results[name]
            assert result["ok"], f"{name} does not compile with {value or 'auto'!r}:\n{result['error']}"
            assert (result["mma"] > 0) == tensor_cores, f"{name} with {value or 'auto'!r}: {result['mma']} mma.sync"


def test_width_one_layers_are_not_turned_into_tf32_products(tmp_path):
    """Under FASTMAML_TRITON_WIDTH1=keep the register layout leaves a layer of width 1 one wide and multiplies
    by it as a broadcast. Written as a sum over a length-1 axis, Triton's combine pass turns such a sum into a
    `tl.dot` with TF32 inputs wherever both other sides are 16 or more (the sinusoid net's input layer and
    every product through its output layer), which float32 accuracy cannot afford and which the interpreter
    never shows. Compiled for sm_90 at the sinusoid size (the training kernel with its outputs, the forward, a
    first-order tanh backward) and with a hidden layer of width 1, both ways, the register layout's products
    must stay FMAs: no mma.sync."""
    variants = [_variant("bwd", "float32", [1, 40, 40, 1], 10, 10, 0, 0, outputs=True),
                _variant("fwd", "float32", [1, 40, 40, 1], 10, 10, 0, 0),
                _variant("bwd", "float32", [1, 40, 40, 1], 10, 10, 0, 1, first_order=True),
                _variant("bwd", "float32", [3, 1, 5], 10, 19, 1, 1, need_lr_grad=True, need_x_grad=True)]
    for value in ("keep", "pad"):
        results = _compile_in_subprocess(variants, {"FASTMAML_TRITON_WIDTH1": value}, tmp_path / value)
        for name, result in results.items():
            assert result["ok"], f"{name} does not compile with {value}:\n{result['error']}"
            assert result["mma"] == 0, f"{name} with {value}: {result['mma']} mma.sync in float32 products"


def test_fewer_warps_compile(tmp_path):
    """FASTMAML_TRITON_WARPS=4 (the A/B's two programs a multiprocessor where 8 warps of 255 registers make
    one): the sinusoid net's scratch-layout backward compiles for sm_90 at 4 warps, within shared memory."""
    variants = [_variant("bwd", "float32", [1, 40, 40, 1], 10, 10, 0, 0, "scratch")]
    for name, result in _compile_in_subprocess(variants, {"FASTMAML_TRITON_WARPS": "4"}, tmp_path).items():
        assert result["ok"], f"{name} does not compile at 4 warps:\n{result['error']}"
        assert result["num_warps"] == 4, result
        assert result["shared"] <= SM90_MAX_SHARED, result


def test_register_cap_compiles(tmp_path):
    """FASTMAML_TRITON_MAXNREG=128 (the A/B's two programs of 8 warps a multiprocessor where 255 registers
    a thread make one): the sinusoid net's scratch-layout training kernel compiles for sm_90 with the cap in
    its PTX (ptxas spills what no longer fits); without the switch, no cap."""
    variants = [_variant("bwd", "float32", [1, 40, 40, 1], 10, 10, 0, 0, "scratch", outputs=True,
                         need_lr_grad=False, need_x_grad=False)]
    for value, want in (("128", 128), ("", 0)):
        for name, result in _compile_in_subprocess(variants, {"FASTMAML_TRITON_MAXNREG": value},
                                                   tmp_path / (value or "none")).items():
            assert result["ok"], f"{name} does not compile with FASTMAML_TRITON_MAXNREG={value!r}:\n{result['error']}"
            assert result["maxnreg"] == want and result["num_warps"] == 8, result


@pytest.mark.parametrize("name,value,message", [
    ("FASTMAML_TRITON_PRECISION", "tf32",
     "FASTMAML_TRITON_PRECISION must be one of ('auto', 'ieee', 'tf32x3'), got 'tf32'"),
    ("FASTMAML_TRITON_K_CHUNK", "24", "FASTMAML_TRITON_K_CHUNK must be 0 or a power of two >= 16, got '24'"),
    ("FASTMAML_TRITON_K_CHUNK", "8", "FASTMAML_TRITON_K_CHUNK must be 0 or a power of two >= 16, got '8'"),
    ("FASTMAML_TRITON_K_CHUNK", "32k", "FASTMAML_TRITON_K_CHUNK must be 0 or a power of two >= 16, got '32k'"),
])
def test_a_bad_kernel_switch_is_refused(name, value, message):
    env = dict(os.environ, **{name: value})
    proc = subprocess.run([sys.executable, "-c", "import fastmaml.backends._triton_kernels"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr
