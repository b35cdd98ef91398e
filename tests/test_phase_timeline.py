"""The barrier timeline's reader (benchmarks/phase_timeline.py) without a GPU: its names for the record
sites agree with what the CUDA kernel writes (csrc/cuda/timeline.h, compiled here by g++), every barrier
of the per-task math has a name, and the phases, shares and waits it reads from records are the ones
put into them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import phase_timeline as pt  # noqa: E402

HEADER = ROOT / "csrc" / "cuda" / "timeline.h"


def test_constants_match_the_header():
    text = HEADER.read_text()
    assert int(re.search(r"kTimelineWarps = (\d+);", text).group(1)) == pt.WARPS
    assert re.search(r"kTimelineWords = 2 \+ kTimelineWarps;", text) and pt.WORDS == 2 + pt.WARPS
    assert int(re.search(r"kTaskStart = (\d+);", text).group(1)) == pt.TASK_START
    assert int(re.search(r"kTasksEnd = (\d+);", text).group(1)) == pt.TASKS_END
    assert "<< 20" in text and "0xFFFFF" in text and pt.SITE_LINE_BITS == 20


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to compile timeline.h's file_tag")
def test_file_tags_match_the_kernel(tmp_path: Path):
    """The C++ file_tag and timeline_site (constant expressions) against the Python twins, on the names
    of every header the kernel's barriers are in and on paths as __builtin_FILE() may spell them."""
    names = ["drivers.h", "mlp.h", "kernels.cuh", "/abs/csrc/task/../task/drivers.h", "..\\task\\mlp.h", "x"]
    checks = [f'static_assert(file_tag("{n.replace(chr(92), chr(92) * 2)}") == {pt.file_tag(n)}u, "{n}");'
              for n in names]
    checks.append(f"static_assert(timeline_site(file_tag(\"mlp.h\"), 204) == "
                  f"{pt.site_of(pt.file_tag('mlp.h'), 204)}ll, \"site\");")
    src = tmp_path / "tags.cpp"
    src.write_text('#include "cuda/timeline.h"\nusing namespace fastmaml::cuda;\n' + "\n".join(checks) + "\n")
    proc = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-I", str(ROOT / "csrc"), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # The tag is of the last path component only: the same wherever the build found the file.
    assert pt.file_tag("/a/b/drivers.h") == pt.file_tag("drivers.h") != pt.file_tag("mlp.h")


def test_every_barrier_of_the_task_math_has_a_name():
    """Each line of csrc/task that calls a team's sync() or sum() resolves to its file, line and enclosing
    function; the reverse sweep's own barriers are named after task_backward or the passes it calls."""
    sites = pt.site_names()
    seen_functions = set()
    lines_found = 0
    for header in sorted((ROOT / "csrc" / "task").glob("*.h")):
        for line in pt.barrier_lines(header):
            site = sites[pt.site_of(pt.file_tag(header.name), line)]
            assert site.file == header.name and site.line == line
            assert re.search(r"\.(sync\(\)|sum\()", site.text), site
            assert site.function and site.function not in ("if", "for"), site
            seen_functions.add(site.function)
            lines_found += 1
    assert lines_found >= 15, lines_found
    assert {"task_backward", "forward", "backward"} <= seen_functions, seen_functions


# ---- reading records ---------------------------------------------------------------------------------

A = pt.site_of(pt.file_tag("drivers.h"), 38)
B = pt.site_of(pt.file_tag("mlp.h"), 204)


def record(site: int, depart: int, arrivals: list[int]) -> list[int]:
    row = [site, depart] + arrivals + [-1] * (pt.WARPS - len(arrivals))
    return row


def block(tasks: list[list[tuple[int, int, list[int]]]], start: int, capacity: int, warps: int,
          end: bool = True) -> np.ndarray:
    """A block's records: each task a start marker, then its barriers (site, work before it per warp,
    barrier latency); times built from `start`."""
    rows = []
    t = start
    for task in tasks:
        rows.append(record(pt.TASK_START, t, [t] * warps))
        for site, latency, works in task:
            arrivals = [t + w for w in works]
            t = max(arrivals) + latency
            rows.append(record(site, t, arrivals))
        t += 7  # the task's end: 7 cycles after its last barrier
    if end:
        rows.append(record(pt.TASKS_END, t, [t] * warps))
    out = np.full((capacity, pt.WORDS), -1, dtype=np.int64)
    rows = rows[:capacity]
    out[:len(rows)] = np.array(rows, dtype=np.int64)
    return out


def test_phases_and_shares_are_read_back():
    task1 = [(A, 10, [100, 60]), (B, 20, [30, 50]), (A, 10, [200, 100])]
    task2 = [(A, 12, [120, 80]), (B, 18, [40, 40]), (A, 10, [300, 150])]
    records = np.stack([block([task1, task2], 1000, 16, 2), block([task2], 50_000, 16, 2)])
    tl = pt.analyse(records)
    assert tl.tasks == 3 and tl.blocks == 2 and tl.truncated_blocks == 0 and tl.warps == 2
    # A task: its phases' cycles (the slowest warp's work plus the barrier) and the 7 cycles to its end.
    assert tl.cycles_per_task == [110 + 70 + 210 + 7, 132 + 58 + 310 + 7, 132 + 58 + 310 + 7]
    by = {s.site: s for s in tl.sites}
    assert by[A].per_task == 2 and by[B].per_task == 1 and by[pt.TASKS_END].per_task == 1
    total = sum(tl.cycles_per_task)
    assert by[A].cycles_per_task == pytest.approx((110 + 210 + 2 * (132 + 310)) / 3)
    assert by[A].share == pytest.approx((110 + 210 + 2 * (132 + 310)) / total)
    assert sum(s.share for s in tl.sites) == pytest.approx(1.0)
    assert by[B].slowest == pytest.approx((50 + 40 + 40) / 3) and by[B].fastest == pytest.approx((30 + 40 + 40) / 3)
    assert by[B].barrier == pytest.approx((20 + 18 + 18) / 3)
    assert by[A].cycles == pytest.approx((110 + 210 + 2 * (132 + 310)) / 6)
    assert by[A].name.startswith("drivers.h:38 ") and by[pt.TASKS_END].name == pt.TASK_END_NAME
    assert tl.sites[0].site == A  # sorted by share
    s = tl.summary()
    assert s["phases_per_task"] == pytest.approx(4)
    assert s["share_barrier"] == pytest.approx((10 + 20 + 10 + 2 * (12 + 18 + 10)) / total)
    assert s["share_fastest_warp_idle"] == pytest.approx((40 + 20 + 100 + 2 * (40 + 0 + 150)) / total)
    assert "drivers.h:38" in pt.report(tl, "test")


def test_a_block_cut_at_capacity_keeps_its_whole_tasks_only():
    task = [(A, 10, [100, 60, 70]), (B, 20, [30, 50, 10])]
    cut = block([task, task, task], 0, 8, 3)  # 1 + 3 + 1 + 3 = 8 records: the third task is lost
    tl = pt.analyse(cut[None])
    assert tl.truncated_blocks == 1 and tl.tasks == 2 and tl.warps == 3
    whole = pt.analyse(block([task, task], 0, 16, 3)[None])
    assert whole.truncated_blocks == 0 and whole.tasks == 2
    assert whole.cycles_per_task == tl.cycles_per_task
    # Full to the last record with the block's end marker: nothing was lost.
    exact = pt.analyse(block([task, task], 0, 9, 3)[None])  # 1 + 3 + 1 + 3 + 1 = 9 records
    assert exact.truncated_blocks == 0 and exact.tasks == 2
    # Blocks that wrote nothing (a grid smaller than the buffer) are not counted.
    spare = pt.analyse(np.stack([block([task], 0, 16, 3), np.full((16, pt.WORDS), -1, dtype=np.int64)]))
    assert spare.blocks == 1 and spare.tasks == 1


def test_malformed_records_are_refused():
    good = block([[(A, 10, [100])]], 0, 8, 1)
    with pytest.raises(ValueError, match="must be"):
        pt.analyse(good[:, :3])
    gap = good.copy()
    gap[1] = -1
    with pytest.raises(ValueError, match="gap"):
        pt.analyse(gap[None])
    orphan = good.copy()
    orphan[0] = record(A, 5, [5])  # a barrier before any task started
    with pytest.raises(ValueError, match="outside a task"):
        pt.analyse(orphan[None])
    empty = np.full((2, 8, pt.WORDS), -1, dtype=np.int64)
    assert pt.analyse(empty).tasks == 0


def test_unknown_sites_are_named_by_their_line():
    records = block([[(pt.site_of(pt.file_tag("nowhere.h"), 77), 5, [10])]], 0, 8, 1)[None]
    tl = pt.analyse(records)
    assert any("line 77 of an unknown file" in s.name for s in tl.sites)


def test_without_a_gpu_the_script_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run")
    assert pt.main(["--tasks", "25", "--steps", "1", "--width", "40"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_compare_gives_each_phase_full_card_over_few():
    few = pt.analyse(block([[(A, 10, [100, 90]), (B, 10, [40, 40])]], 0, 8, 2)[None])
    full = pt.analyse(block([[(A, 10, [290, 200]), (B, 10, [40, 30])]], 0, 8, 2)[None])
    text = pt.compare(few, full, "K=1 W=40")
    line_a = next(line for line in text.splitlines() if "drivers.h:38" in line)
    assert line_a.split()[1:4] == ["110", "300", "2.73"]
    line_b = next(line for line in text.splitlines() if "mlp.h:204" in line)
    assert line_b.split()[1:4] == ["50", "50", "1.00"]
    assert f"({(300 + 50 + 7) / (110 + 50 + 7):.2f}x)" in text


def test_the_script_end_to_end_with_the_gpu_stubbed(monkeypatch, tmp_path, capsys):
    """main() as the GPU check runs it, with the device calls stubbed (GPU time is scarce: a slip in the
    script's own flow should show here): each setting's report, the files, and the comparison of T."""
    import types

    import torch

    import _harness

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=2))
    real_workload = _harness.make_workload
    monkeypatch.setattr(_harness, "make_workload", lambda T, K, W, device: real_workload(T, K, W, device="cpu"))
    monkeypatch.setattr(_harness, "device_name", lambda d: "stub GPU")
    monkeypatch.setattr(_harness, "cuda_launch_note", lambda w: "launch: stub")
    monkeypatch.setattr(_harness, "release", lambda d: None)
    monkeypatch.setattr(_harness, "commit", lambda: "abc1234")
    calls = []

    def record_call(w, blocks, capacity):
        calls.append((w.T, w.K, w.width, blocks, capacity))
        slow = 3 if w.T > 25 else 1  # a full card: the first phase three times as long
        return np.stack([block([[(A, 10, [100 * slow, 90]), (B, 10, [40, 40])]], 0, capacity, 2)
                         for _ in range(blocks)])

    monkeypatch.setattr(pt, "record_call", record_call)
    rc = pt.main(["--tasks", "25", "300", "--steps", "2", "1", "--width", "40", "--capacity", "16", "--out",
                  str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    # Three blocks a multiprocessor record; setting by setting, in the order asked.
    assert calls == [(25, 2, 40, 6, 16), (300, 2, 40, 6, 16), (25, 1, 40, 6, 16), (300, 1, 40, 6, 16)]
    assert "== T=25 K=1 W=40 (stub GPU)" in out and "launch: stub" in out
    assert "== K=1 W=40: T=25 against T=300" in out
    lines = out.splitlines()
    # Each comparison as soon as its setting's two runs are done: a run cut short by its limit keeps it.
    assert lines.index("== K=2 W=40: T=25 against T=300") < lines.index("== T=25 K=1 W=40 (stub GPU)")
    line_a = next(line for line in lines[lines.index("== K=1 W=40: T=25 against T=300"):] if "drivers.h:38" in line)
    assert line_a.split()[1:4] == ["110", "310", "2.82"]
    for T in (25, 300):
        stem = tmp_path / f"timeline-T{T}-K1-W40"
        assert stem.with_suffix(".csv").is_file()
        meta = json.loads(stem.with_suffix(".json").read_text())
        assert meta["commit"] == "abc1234" and meta["tasks"] == 6 and meta["blocks"] == 6
