"""When the `triton` backend runs the one-step kernel (`_triton_onestep.py`), and its launch: the switches, the
sizes it takes and why it refuses the others, its chunks and register cap.

The kernel keeps theta_1 low-rank and runs training calls with one inner step, a group of tasks a program
(docs/kernels.md). `TritonBackend.train` asks `settings` and `reason`, then hands `run` to `_onestep.maml`,
which builds the arguments and the autograd function around it.
"""

from __future__ import annotations

from typing import Optional

from .._validate import Problem
from . import _onestep
from .triton_maml import _device_guard, _kernels, _pad, max_registers, warps_switch

# The one-step kernel (`_triton_onestep.py`: theta_1 kept low-rank, a group of tasks a program): training
# calls with one inner step run it where `_onestep.reason` takes them, under FASTMAML_TRITON_ONESTEP=1; off
# by default until a GPU has measured it against the reverse sweep. FASTMAML_TRITON_ONESTEP_TASKS sets its
# tasks a program (1, 2 or 4), FASTMAML_TRITON_WARPS its warps (default 8). Compiled for sm_90 (ptxas -v,
# float32, ieee, the sinusoid net, second order, the blocks read back from the factor rows; launched with
# ptxas's cap at 255 registers, FASTMAML_TRITON_MAXNREG setting another): one task and 8 warps spills 156 /
# 232 B of stores / loads a thread (200 / 248 B before the layer-0 Gram took xs from registers, 2eca629; kept
# in registers instead: 1.6 / 2.0 KiB; tanh and cross-entropy 452 / 720 B); two tasks 5.0 / 5.9 KiB; 4 warps
# 2.2 / 3.3 KiB; tf32x3 (no cap) 1.5 / 2.2 KiB. Without the cap ptxas spilled more at one task and 8 warps
# (356 / 548 B) and gave two tasks, or 4 warps, 32 registers and 32-45 KiB. None: read on first use
# (`settings`; tests set them).
ONESTEP: Optional[bool] = None
ONESTEP_TASKS: Optional[int] = None
# Its products with the shared weights and its Gram matrices, where their operands are wide: read from the
# factor rows ONESTEP_CHUNK columns a step (`_triton_onestep_blocks._wprod`, `_gram`) instead of held whole in
# registers. FASTMAML_TRITON_ONESTEP_CHUNK: auto (the default: 16 where the widest padded layer is above
# ONESTEP_MAX_REGISTER_WIDTH, else 0), 0, 16 or 32. Compiled for sm_90 (ptxas -v, float32, ieee, 1-128-128-1,
# 10 + 10 points, second order, 8 warps, 255 registers): chunks of 16 spill 204 / 576 B a thread (212 / 580 B
# before the loops stopped at the real width, e143a24), of 32 992 / 2,024 B, with tf32x3 products 1,860 /
# 2,988 B (both measured before e143a24); the same net in registers 11.3 / 14.6 KiB (at 16 warps, the most
# that 128 registers a thread allow, 2.8 / 4.2 KiB). At the sinusoid width chunks of 16 no longer spill (48 /
# 112 B before e143a24) against the registers' 156 / 232 B: the A/B's tonestep_kc16. None: read on first use
# (`settings`; tests set it).
ONESTEP_CHUNK: Optional[str] = None
ONESTEP_MAX_REGISTER_WIDTH = 64


def settings() -> tuple[bool, int]:
    """(FASTMAML_TRITON_ONESTEP is on, its tasks a program), read once (see ONESTEP), and
    FASTMAML_TRITON_ONESTEP_CHUNK into ONESTEP_CHUNK (`chunk` applies it to a call's widths)."""
    global ONESTEP, ONESTEP_TASKS, ONESTEP_CHUNK
    from .._switches import env_choice

    if ONESTEP is None:
        ONESTEP = env_choice("FASTMAML_TRITON_ONESTEP", ("0", "1")) == "1"
    if ONESTEP_TASKS is None:
        ONESTEP_TASKS = int(env_choice("FASTMAML_TRITON_ONESTEP_TASKS", ("1", "2", "4")))
    if ONESTEP_CHUNK is None:
        ONESTEP_CHUNK = env_choice("FASTMAML_TRITON_ONESTEP_CHUNK", ("auto", "0", "16", "32"))
    return ONESTEP, ONESTEP_TASKS


# Widest padded layer the one-step kernel takes: up to ONESTEP_MAX_REGISTER_WIDTH its products may hold their
# operands in registers; above, up to 128, they read them from the factor rows in chunks (ONESTEP_CHUNK), which
# only a second-order call writes in full. A task's points (support or query, padded): 32 (20 points: 2.8 /
# 3.8 KiB of spills at the sinusoid widths), not 64 (50 points: 19 / 25 KiB, 138 s to compile; 100 points did
# not compile in 12 minutes).
ONESTEP_MAX_PADDED_WIDTH = 128
ONESTEP_MAX_PADDED_POINTS = 32


def chunk(dims: list[int], first_order: bool) -> int:
    """Columns a step of the Triton one-step kernel's chunked products for a call of these widths (0: the
    operands in registers): FASTMAML_TRITON_ONESTEP_CHUNK, by default 16 where the widest padded layer is
    above ONESTEP_MAX_REGISTER_WIDTH; 0 at first order (the rows then hold no support blocks to read)."""
    settings()  # reads the switch once
    if first_order:
        return 0
    if ONESTEP_CHUNK == "auto":
        return 16 if max(_pad(d) for d in dims) > ONESTEP_MAX_REGISTER_WIDTH else 0
    return int(ONESTEP_CHUNK)


def reason(problem: Problem, need_lr: bool, need_x: bool) -> Optional[str]:
    """Why the Triton one-step kernel does not take this training call (`_onestep.reason`, then its bounds on
    the padded width and points), or None."""
    why = _onestep.reason(problem, need_lr, need_x)
    widest = max(_pad(d) for d in problem.dims)
    if why is None and widest > ONESTEP_MAX_PADDED_WIDTH:
        why = (f"width {max(problem.dims)} (the Triton one-step kernel takes padded widths up to "
               f"{ONESTEP_MAX_PADDED_WIDTH})")
    if (why is None and widest > ONESTEP_MAX_REGISTER_WIDTH
            and chunk(problem.dims, problem.first_order) == 0):
        cause = "first order" if problem.first_order else "FASTMAML_TRITON_ONESTEP_CHUNK=0"
        why = (f"width {max(problem.dims)} with {cause} (the Triton one-step kernel's products hold their "
               f"operands in registers up to padded widths of {ONESTEP_MAX_REGISTER_WIDTH}; wider ones read them "
               "from a second-order call's factor rows in chunks)")
    if why is None and max(_pad(problem.n_support), _pad(problem.n_query)) > ONESTEP_MAX_PADDED_POINTS:
        why = (f"{max(problem.n_support, problem.n_query)} points a task (the Triton one-step kernel's products "
               f"are whole register tiles: up to {ONESTEP_MAX_PADDED_POINTS} support and query points)")
    return why


def register_cap(num_warps: int) -> int:
    """The one-step kernel's register cap a thread (Triton's `maxnreg`): FASTMAML_TRITON_MAXNREG, or 255, at most
    what a program of `num_warps` warps can have of a multiprocessor's 64 K registers (allocated in steps of 8).
    16 warps at 255 registers would need 130,560: the launch would fail for lack of registers."""
    fits = 65536 // (32 * num_warps) // 8 * 8
    return min(max_registers() or 255, fits, 255)


def run(theta, rates, *args):
    """`_onestep._Call.kernel` for Triton: one launch of `_triton_onestep.onestep_kernel` on theta's device
    (`args`: xs, ys, xq, yq, cot, g_pred, dims, activation, loss, first_order, factors)."""
    _, tasks = settings()
    kc = chunk(args[6], args[9])
    warps = warps_switch() or 8
    options = {"maxnreg": register_cap(warps)}
    if kc:
        # One stage: pipelined, the next chunks' loads were held beside this one's (sm_90, 1-128-128-1, spills a
        # thread: 504 / 1,220 B at Triton's default 3 stages, 380 / 860 B at 2, 212 / 580 B at 1).
        options["num_stages"] = 1
    with _device_guard(theta):
        return _kernels().onestep.launch(theta, rates, *args, tasks_per_program=tasks, num_warps=warps, chunk=kc,
                                         **options)
