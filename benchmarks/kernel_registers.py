"""Registers and spills of the GPU kernels, compiled for a GPU on a machine without one.

    python benchmarks/kernel_registers.py                     # CUDA kernels and the sinusoid net's Triton kernels
                                                              # (fused, and the factored backend's products)
    python benchmarks/kernel_registers.py --widths 40 128 --precisions ieee tf32x3
    python benchmarks/kernel_registers.py --skip-cuda --widths 128 --warps 16
    python benchmarks/kernel_registers.py --skip-triton --sass  # + the CUDA kernels' inner loops (cuobjdump)
    python benchmarks/kernel_registers.py --skip-triton --sources  # + their code by source line (nvdisasm -gi)
    cuobjdump -sass k.o | python benchmarks/kernel_registers.py --sass-from -
    FASTMAML_TRITON_K_CHUNK=0 python benchmarks/kernel_registers.py --skip-cuda   # the kernels' switches apply

What a kernel change does to register use and spills is the one figure of a GPU kernel's cost that this
side of a GPU can measure: the CUDA kernels go through `nvcc -Xptxas -v` (every kernel of
`csrc/cuda/*.cu`, float32 and float64, the files compiled in parallel), the Triton kernels through
`triton.compile` for the target and `ptxas -v` of their PTX (the 1-W-W-1 MLP with 10 + 10 points, mse,
relu, second order with every gradient, float32; 2-60 s a variant). One line per kernel: registers per
thread, bytes of spill stores and loads, stack frame. On a GPU, `benchmarks/gpu_check.sh` prints the
same for the kernels it launched.

`--sass` also disassembles the CUDA kernels (`cuobjdump -sass`: from PATH, `$FASTMAML_CUOBJDUMP`, the
`nvidia-cuda-cuobjdump` wheel or the triton wheel's copy) and counts, per kernel, the instructions of its
innermost loops that hold multiply-adds: how many of a product's instructions are the FFMAs it exists for,
the rest being loads, address arithmetic and loop control. A static count (no trip counts), but the
products' loops are where the reverse sweep spends its arithmetic.

`--sources` builds with `-lineinfo` and counts each kernel's instructions by the source line they come
from (`nvdisasm -gi`, its inlining chain): by the innermost frame (a product's loop in team_tiles.h) and by
the innermost caller outside the primitives (the layer pass of mlp.h it serves). Where the code is, not
where the time goes: a kernel too large for the instruction cache is the question it answers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?(\S+?)'?(?: for |$)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict[str, dict]:
    """`ptxas -v` output -> {function: {registers, spill_stores, spill_loads, stack}}, kernels and the
    device functions that were not inlined."""
    out: dict[str, dict] = {}
    name = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            name = m.group(1)
            out.setdefault(name, {})
            continue
        if name is None:
            continue
        m = _SPILL.search(line)
        if m:
            out[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            out[name]["registers"] = int(m.group(1))
    return out


_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_SASS_BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def _opcode(instr: str) -> str:
    instr = instr.strip()
    if instr.startswith("@"):  # a predicate
        instr = instr.split(None, 1)[1]
    return instr.split()[0].split(".")[0]


def parse_sass(text: str) -> dict[str, dict]:
    """`cuobjdump -sass` output -> {function: {instructions, ffma, hmma, loads, local, loops, mma_loops}}.
    `loops` lists the innermost loops (a backward branch with no other backward branch inside) holding at
    least 4 FFMAs, as (instructions, ffma, loads) of one pass of the loop's body; `mma_loops` those holding
    a tensor-core HMMA, as (instructions, hmma, loads); `loads` counts LD, LDS and LDG, `local` the spill
    traffic's LDL and STL."""
    out: dict[str, dict] = {}
    for chunk in re.split(r"^\s*Function : ", text, flags=re.M)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        instrs = [(int(a, 16), body) for a, body in _SASS_INSTR.findall(chunk)]
        ops = [_opcode(body) for _, body in instrs]
        index = {addr: i for i, (addr, _) in enumerate(instrs)}
        backward = []  # (start, end) of every backward branch, as instruction indices
        for i, (addr, body) in enumerate(instrs):
            m = _SASS_BRANCH.search(body)
            if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
                backward.append((index[int(m.group(1), 16)], i))
        loops, mma_loops = [], []
        for start, end in backward:
            if any(start <= s2 and e2 < end for s2, e2 in backward if (s2, e2) != (start, end)):
                continue  # holds another loop
            body = ops[start:end + 1]
            loads = sum(body.count(o) for o in ("LD", "LDS", "LDG"))
            if body.count("FFMA") >= 4:
                loops.append((len(body), body.count("FFMA"), loads))
            if body.count("HMMA"):
                mma_loops.append((len(body), body.count("HMMA"), loads))
        out[name] = dict(instructions=len(ops), ffma=ops.count("FFMA"), hmma=ops.count("HMMA"),
                         loads=sum(ops.count(o) for o in ("LD", "LDS", "LDG")),
                         local=ops.count("LDL") + ops.count("STL"), loops=loops, mma_loops=mma_loops)
    return out


def sass_lines(stats: dict[str, dict], top: int = 6) -> list[str]:
    """A line per kernel: totals, and its innermost multiply-add loops' FFMAs per instruction (all of them
    together, and the largest loop bodies' own); then its tensor-core loops, with their instructions per
    HMMA (an HMMA.1688 is 1,024 multiply-adds of a warp, 32 FFMAs of each lane)."""
    lines = []
    for mangled, st in stats.items():
        if "_kernel" not in mangled or not st["loops"]:
            continue
        n = sum(l[0] for l in st["loops"])
        f = sum(l[1] for l in st["loops"])
        hmma = f", {st['hmma']} HMMA" if st.get("hmma") else ""
        lines.append(f"{short_name(mangled):<40} {st['instructions']:>6} instructions, {st['ffma']} FFMA{hmma}, "
                     f"{st['local']} local loads/stores; {len(st['loops'])} FFMA loops: {f / n:.2f} FFMA "
                     f"an instruction")
        for size, ffma, loads in sorted(set(st["loops"]), key=lambda t: (-t[1], t[0]))[:top]:
            lines.append(f"    loop of {size:>4} instructions: {ffma:>3} FFMA, {loads:>3} loads ({ffma / size:.2f})")
        for size, hm, loads in sorted(set(st.get("mma_loops", [])), key=lambda t: (-t[1], t[0]))[:top]:
            lines.append(f"    tensor-core loop of {size:>4} instructions: {hm:>2} HMMA, {loads:>3} loads "
                         f"({size / hm:.1f} instructions an HMMA)")
    return lines


# nvdisasm -gi (-g: line info, -i: the inlining chain) writes, before each run of instructions from one
# place, one comment line a frame, innermost first: `//## File "path", line N inlined at "path2", line M`,
# then the next frame out, the last without "inlined at".
_SASS_FRAME = re.compile(r'//## File "([^"]+)", line (\d+)')
_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?[A-Z]")
_SASS_SECTION = re.compile(r"^\.text\.(\S+):\s*$")
# The primitives of the per-task math (csrc/task/): a product's loops, the teams' loops and tiles. An
# instruction's caller is the innermost frame outside them (and outside the toolkit's headers): the layer
# pass or driver step (mlp.h, drivers.h, onestep.h, ...) whose product or loop it belongs to.
_PRIMITIVES = {"products.h", "team.h", "team_tiles.h", "team_mma.h", "host_tiles.h", "config.h", "layout.h",
               "onestep_loops.h"}


def parse_sass_sources(text: str) -> dict[str, dict]:
    """`nvdisasm -gi` of a cubin built with -lineinfo -> {function: {instructions, files, lines, callers}}:
    its instructions counted by the innermost frame's file and file:line, and by the innermost frame
    outside the primitives (`_PRIMITIVES`) and the CUDA headers, each a collections.Counter. A static
    count: where the code is, not where the time goes (ncu's source page, benchmarks/ncu_source.py, says
    that)."""
    from collections import Counter

    out: dict[str, dict] = {}
    cur = None
    chain: list[tuple[str, int]] = []
    pending: list[tuple[str, int]] = []
    for raw in text.splitlines():
        m = _SASS_SECTION.match(raw)
        if m:
            cur = out.setdefault(m.group(1), dict(instructions=0, files=Counter(), lines=Counter(),
                                                  callers=Counter()))
            chain, pending = [], []
            continue
        if raw.lstrip().startswith(".section"):
            cur = None  # a data section after the code (its `.dword`s are no instructions)
            continue
        m = _SASS_FRAME.search(raw)
        if m:
            pending.append((Path(m.group(1)).name, int(m.group(2))))
            continue
        if cur is None or not _SASS_OP.search(raw):
            continue
        if pending:
            chain, pending = pending, []
        cur["instructions"] += 1
        if not chain:
            cur["files"]["(no line)"] += 1
            continue
        name, ln = chain[0]
        cur["files"][name] += 1
        cur["lines"][f"{name}:{ln}"] += 1
        caller = next((f"{f}:{n}" for f, n in chain if f not in _PRIMITIVES and not f.endswith(".hpp")),
                      f"{name}:{ln}")
        cur["callers"][caller] += 1
    return out


def source_lines(stats: dict[str, dict], top: int = 12) -> list[str]:
    """Per kernel: its instructions by file, then the `top` source lines holding the most and, where the
    kernel runs the per-task math's primitives, the `top` callers."""
    lines = []
    for mangled, st in stats.items():
        n = st["instructions"]
        if "_kernel" not in mangled or not n:
            continue
        files = ", ".join(f"{f} {c / n:.0%}" for f, c in st["files"].most_common(8))
        lines.append(f"{short_name(mangled):<40} {n:>6} instructions: {files}")
        lines.append("    lines: " + ", ".join(f"{k} {c}" for k, c in st["lines"].most_common(top)))
        if st["callers"] != st["lines"]:  # some code of the per-task math's primitives: who calls it
            lines.append("    callers: " + ", ".join(f"{k} {c}" for k, c in st["callers"].most_common(top)))
    return lines


def find_tool(name: str) -> str | None:
    """A CUDA binary tool (cuobjdump, nvdisasm): `$FASTMAML_<NAME>`, PATH, the nvidia-cuda-* wheels, the
    copy the triton wheel ships, or /usr/local/cuda/bin."""
    found = os.environ.get(f"FASTMAML_{name.upper()}") or shutil.which(name)
    if found:
        return found
    for base in map(Path, sys.path):
        for pattern in (f"nvidia/cu*/bin/{name}", f"triton/backends/nvidia/bin/{name}"):
            for cand in sorted(base.glob(pattern)):
                return str(cand)
    cand = Path("/usr/local/cuda/bin") / name
    return str(cand) if cand.exists() else None


def short_name(mangled: str) -> str:
    """`bwd_kernel<float>` from an Itanium-mangled CUDA kernel name; the name itself otherwise."""
    m = re.search(r"\d+([a-z_]+_kernel)I([df])(?:Li(\d+)E)?(?:Lb([01])E)?E", mangled)
    if m:
        # bwd_kernel<float, 4>: its min-blocks variant; 0 is the default (nvcc's own register count).
        # bwd_kernel<float, 3, timeline>: the barrier timeline's variant (csrc/cuda/timeline.h).
        blocks = f", {m.group(3)}" if m.group(3) not in (None, "0") or m.group(4) == "1" else ""
        timeline = ", timeline" if m.group(4) == "1" else ""
        return f"{m.group(1)}<{'float' if m.group(2) == 'f' else 'double'}{blocks}{timeline}>"
    m = re.search(r"\d+(lowrank_(?:add|pairs)_kernel)ILi(\d+)ELi(\d+)E([df])E", mangled)
    if m:  # the factored backend's CUDA lowrank_add, alone or as the sweep's pair: <dtype, elements a load in
        # its first and second pass>
        return f"{m.group(1)}<{'float' if m.group(4) == 'f' else 'double'}, loads {m.group(2)}/{m.group(3)}>"
    m = re.search(r"\d+onestep_kernelI([df])Lb([01])ELb([01])E", mangled)
    if m:  # the one-step kernel: <dtype, its shared-operand form, its tensor-core products> (onestep.cu)
        return (f"onestep_kernel<{'float' if m.group(1) == 'f' else 'double'}"
                f"{', shared' if m.group(2) == '1' else ''}{', mma' if m.group(3) == '1' else ''}>")
    m = re.search(r"\d+(team_tiles|task_backward|task_forward|block_sum)", mangled)
    return m.group(1) if m else mangled[:60]


def line(name: str, r: dict) -> str:
    return (f"{name:<40} {r.get('registers', '?'):>4} registers  spill stores {r.get('spill_stores', '?'):>5} B  "
            f"loads {r.get('spill_loads', '?'):>5} B  stack {r.get('stack', '?'):>5} B")


def cuda_report(arch: str, sass: bool = False, sources: bool = False) -> list[str]:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        return ["cuda: nvcc not found"]
    start = time.perf_counter()
    cu_files = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    cuobjdump = find_tool("cuobjdump") if sass or sources else None
    nvdisasm = find_tool("nvdisasm") if sources else None
    sass_stats: dict[str, dict] = {}
    source_stats: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:  # every file at once, as ninja builds them
        # -lineinfo (as the extension's build has) adds line tables only, for `sources`: the code is the same.
        lineinfo = ["-lineinfo"] if sources else []
        procs = [subprocess.Popen([nvcc, f"-arch=sm_{arch}", "-O3", *lineinfo, "-Xptxas", "-v", "-c", str(cu), "-I",
                                   str(ROOT / "csrc"), "-o", str(Path(tmp) / f"{cu.stem}.o")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cu in cu_files]
        outputs = [(cu, *proc.communicate(), proc.returncode) for cu, proc in zip(cu_files, procs)]
        objects = [obj for obj in (Path(tmp) / f"{cu.stem}.o" for cu, _, _, rc in outputs if rc == 0) if obj.exists()]
        for obj in objects if cuobjdump is not None else ():
            if sass:
                dump = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True)
                sass_stats.update(parse_sass(dump.stdout))
            if nvdisasm is not None:
                elf = obj.with_suffix(".elf")
                elf.mkdir()
                subprocess.run([cuobjdump, "-xelf", "all", str(obj)], cwd=elf, capture_output=True)
                for cubin in sorted(elf.glob("*.cubin")):
                    dis = subprocess.run([nvdisasm, "-gi", str(cubin)], capture_output=True, text=True)
                    source_stats.update(parse_sass_sources(dis.stdout))
    failed = [f"cuda: nvcc failed on {cu.name}:\n{err[-3000:]}" for cu, _, err, rc in outputs if rc != 0]
    if failed:
        return failed
    lines = [f"== CUDA kernels, nvcc -O3 sm_{arch}, {len(cu_files)} files in parallel "
             f"({time.perf_counter() - start:.0f} s)"]
    reports = {}
    for _, _, err, _ in outputs:
        reports.update(parse_ptxas(err))  # a kernel two files share (column_sum_kernel) is the same code
    for mangled, r in reports.items():
        if "_kernel" in mangled:
            lines.append(line(short_name(mangled), r))
    # block_sum is __noinline__ on purpose (csrc/cuda/kernels.cuh); anything else here fell off nvcc's
    # inlining (the reverse sweep did, with hundreds of bytes of spills).
    outlined = [m for m in reports if "_kernel" not in m and "block_sum" not in m]
    if outlined:
        lines.append(f"  (not inlined into their kernels: {sorted({short_name(m) for m in outlined})})")
    if sass:
        if cuobjdump is None:
            lines.append("sass: no cuobjdump (PATH, $FASTMAML_CUOBJDUMP, pip install nvidia-cuda-cuobjdump)")
        else:
            lines.append(f"== the kernels' innermost multiply-add loops (cuobjdump -sass, {cuobjdump})")
            lines.extend(sass_lines(sass_stats))
    if sources:
        if nvdisasm is None or cuobjdump is None:
            lines.append("sources: no nvdisasm or cuobjdump (PATH, $FASTMAML_NVDISASM, $FASTMAML_CUOBJDUMP)")
        else:
            lines.append(f"== the kernels' code by source line, innermost frame and caller (nvdisasm -gi, {nvdisasm})")
            lines.extend(source_lines(source_stats))
    return lines


def _triton_child(spec: dict) -> None:
    """Runs in a subprocess (TRITON_INTERPRET unset, the precision set before the kernels load)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from fastmaml.backends import _lowrank, _lowrank_backward, _lowrank_pairs, factored
    from fastmaml.backends import _triton_targets as targets
    from fastmaml.backends import _triton_onestep_call as onestep_call, triton_maml as tm

    if spec.get("factored"):
        # The low-rank products of the 1-W-W-1 net's middle layer, 10 + 10 points, at every factor count
        # the default form reaches (the layer turns dense after the last), at --warps or the backend's
        # (FASTMAML_FACTORED_WARPS); lowrank_backward (autograd's fused backward) within its bound, where
        # it runs in place of the other two's backward. The written-out sweep's groups of the weight
        # cotangent's pairs take lowrank_add up to MAX_TILES (eight pairs), the fused pair kernel
        # (FASTMAML_FACTORED_PAIRS=fused) up to its bound (five).
        width, warps = spec["dims"][1], spec["warps"] or _lowrank.WARPS
        steps = next(k for k in range(1, 64) if factored._dense_after(k, 10, width, width))
        for factors in range(1, max(steps, _lowrank.MAX_TILES // 256 + 1)):
            fused = factors * 16 * 16 <= _lowrank_backward._fused_max_tiles(torch.float32)
            kinds = ["add"]
            if factors < steps:  # autograd's backward reaches these factor counts
                kinds += ["grads", "backward"] if fused else ["grads"]
            if factors * 16 * 16 <= _lowrank_pairs.PAIRS_MAX_TILES[torch.float32]:
                kinds.append("pairs")
            for kind in kinds:
                start = time.perf_counter()
                kernel = _lowrank.compile_for_target(kind, torch.float32, 10, 10, width, width, factors,
                                                     arch=spec["arch"], num_warps=warps)
                _print_ptxas(kernel, spec["arch"], start, kind=f"lowrank_{kind} J={factors}", warps=warps)
        return
    # fwd and bwd with every gradient; train: the backward kernel as a training loop's call launches it
    # (triton_maml_train: the forward's outputs too, a float rate, no input gradients).
    for name, kind, options in (("fwd", "fwd", {}), ("bwd", "bwd", {}),
                                ("train", "bwd", dict(outputs=True, need_lr_grad=False, need_x_grad=False))):
        start = time.perf_counter()
        kernel, warps = targets.compile_for_target(kind, torch.float32, spec["dims"], 10, 10, 0, 0,
                                                   arch=spec["arch"], num_warps=spec["warps"], **options)
        _print_ptxas(kernel, spec["arch"], start, kind=f"{name} {tm.layout_for(spec['dims'])}", warps=warps)
    if max(spec["dims"]) <= onestep_call.ONESTEP_MAX_PADDED_WIDTH:  # the one-step kernel (FASTMAML_TRITON_ONESTEP=1)
        start = time.perf_counter()
        warps = spec["warps"] or 8
        kernel = targets.onestep_compile_for_target(torch.float32, spec["dims"], 10, 10, 0, 0, num_warps=warps,
                                                    arch=spec["arch"])
        chunk = onestep_call.chunk(spec["dims"], False)
        _print_ptxas(kernel, spec["arch"], start, kind=f"onestep {f'chunks of {chunk}' if chunk else 'registers'}",
                     warps=warps)


def _print_ptxas(kernel, arch: int, start: float, **fields) -> None:
    """ptxas -v of a compiled Triton kernel's PTX, as one JSON line."""
    ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        proc = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True)
    parsed = list(parse_ptxas(proc.stderr).values())
    print(json.dumps(dict(fields, seconds=round(time.perf_counter() - start), report=parsed[0] if parsed else {},
                          error=None if parsed else proc.stderr[-2000:])), flush=True)


def triton_report(widths: list[int], precisions: list[str], arch: int, warps: int = 0,
                  factored: bool = False) -> list[str]:
    """The fused Triton kernels at each precision and width, or (`factored`) the factored backend's
    low-rank product kernels at each width."""
    lines = []
    for precision in (["auto"] if factored else precisions):
        for width in widths:
            env = dict(os.environ, FASTMAML_TRITON_PRECISION=precision)  # auto: ieee / tf32x3 by layout
            env.pop("TRITON_INTERPRET", None)
            spec = dict(dims=[1, width, width, 1], arch=arch, warps=warps, factored=factored)
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                  capture_output=True, text=True)
            results = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
            if not results:
                lines.append(f"triton {precision} W={width}: failed:\n{proc.stderr[-2000:]}")
            for r in results:
                what = f"{r['kind']} W={width}" if factored else f"{r['kind']} W={width} {precision}"
                name = f"triton {what} {r['warps']}w ({r['seconds']} s)"
                lines.append(line(name, r["report"]) if r["error"] is None else f"{name}: {r['error']}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90", help="compute capability, digits only (90: H100/H200)")
    p.add_argument("--widths", type=int, nargs="+", default=[40])
    p.add_argument("--precisions", nargs="+", default=["auto"], choices=["auto", "ieee", "tf32x3"])
    p.add_argument("--warps", type=int, default=0, help="Triton warps per program (0: the backend's choice)")
    p.add_argument("--skip-cuda", action="store_true")
    p.add_argument("--skip-triton", action="store_true")
    p.add_argument("--sass", action="store_true", help="count the CUDA kernels' inner-loop instructions")
    p.add_argument("--sources", action="store_true",
                   help="count the CUDA kernels' instructions by source line and caller (-lineinfo, nvdisasm)")
    p.add_argument("--sass-from", metavar="FILE",
                   help="only summarise a `cuobjdump -sass` listing already made ('-': standard input)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sass_from:
        text = sys.stdin.read() if args.sass_from == "-" else Path(args.sass_from).read_text()
        print("== the CUDA kernels' innermost multiply-add loops (cuobjdump -sass)")
        print("\n".join(sass_lines(parse_sass(text))), flush=True)
        return 0
    if args.child:
        _triton_child(json.loads(args.child))
        return 0
    if not args.skip_cuda:
        print("\n".join(cuda_report(args.arch + ("a" if args.arch == "90" else ""), args.sass, args.sources)), flush=True)
    if not args.skip_triton:
        print(f"== Triton kernels, sm_{args.arch}, float32, 1-W-W-1, 10 + 10 points", flush=True)
        print("\n".join(triton_report(args.widths, args.precisions, int(args.arch), args.warps)), flush=True)
        print(f"== the factored backend's Triton kernels, sm_{args.arch}, float32, the W x W layer, 10 points",
              flush=True)
        print("\n".join(triton_report(args.widths, [], int(args.arch), factored=True)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
