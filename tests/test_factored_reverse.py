"""The factored backend's written-out meta-gradient (`_factored_reverse`): every option against the float64
reference with the layers in each form (factors, dense, turning dense), every input's gradient including
float targets and the step weights, against autograd through the inner loop (its switch's other side) at
the sinusoid size, in chunks, differentiated again, and through the Triton kernels in the interpreter."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastmaml
from fastmaml.backends import _factored_reverse, _lowrank_pairs, factored
from _reference_loop import assert_close, gradients, make_case
from test_backends import FACTORED_DEPTH_GRID, OPTION_GRID, _case_id, check_maml

F64 = torch.float64


@pytest.fixture
def sweeps(monkeypatch):
    """Counts the written-out sweeps run (so that a test of it cannot pass on autograd's path)."""
    count = [0]
    real = _factored_reverse._Sweep.run_all

    def spy(self, *args):
        count[0] += 1
        return real(self, *args)

    monkeypatch.setattr(_factored_reverse, "MODE", "hand")
    monkeypatch.setattr(_factored_reverse._Sweep, "run_all", spy)
    return count


GRID = [o for o in OPTION_GRID + FACTORED_DEPTH_GRID if o["lr_form"] != "per_parameter"]


@pytest.mark.parametrize("dense", ["auto", "never", "always"])
@pytest.mark.parametrize("options", [{**o, "seed": i} for i, o in enumerate(GRID)], ids=_case_id)
def test_sweep_matches_the_reference(monkeypatch, sweeps, dense, options):
    """Every option of test_backends (per-tensor rates) in float64, with the layers factored at every
    step, dense from the first, or as `auto` picks (the small nets here: dense from the first step):
    outputs and every gradient, with and without a cotangent on the query outputs."""
    monkeypatch.setattr(factored, "DENSE", dense)
    check_maml("factored", options, F64)
    assert sweeps[0] == 2


@pytest.mark.parametrize("options", [
    dict(inner_steps=2, lr_form="per_step", grad_inputs=False),
    dict(inner_steps=3, lr_form="per_layer", grad_inputs=False, activation="tanh", query_loss_weights=True),
    dict(dims=(2, 11, 11, 11, 3), inner_steps=2, lr_form="float", grad_inputs=False, loss="cross_entropy"),
], ids=_case_id)
@pytest.mark.parametrize("dense", ["auto", "never"])
def test_sweep_without_input_gradients(monkeypatch, sweeps, dense, options):
    """Only params and rates require grad: the sweep skips the inputs' gradients, not what the layers
    below need (a mutant that drops the first hidden layer's update cotangent with them fails here)."""
    monkeypatch.setattr(factored, "DENSE", dense)
    check_maml("factored", {**options, "tasks": 4, "seed": 71}, F64)
    assert sweeps[0] == 2


@pytest.mark.parametrize("dense", ["auto", "never"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("first_order", [False, True], ids=["so", "fo"])
def test_targets_and_step_weights_get_their_gradients(monkeypatch, sweeps, dense, activation, first_order):
    """Float targets (mse) and the multi-step weights requiring grad: their gradients are the reference's,
    along with every other input's."""
    monkeypatch.setattr(factored, "DENSE", dense)
    case = make_case(dims=(2, 9, 6, 3), tasks=5, inner_steps=3, lr_form="per_layer", query_loss_weights=True,
                     grad_weights=True, activation=activation, first_order=first_order, seed=72)
    case.y_support.requires_grad_(True)
    case.y_query.requires_grad_(True)
    leaves = {**case.leaves(), "y_support": case.y_support, "y_query": case.y_query}
    assert "query_loss_weights" in leaves
    got = {}
    for backend in ("reference", "factored"):
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend=backend, **case.kwargs())
        objective = (out.task_losses * torch.linspace(0.5, 1.5, 5, dtype=F64)).sum() + out.query_preds.sin().sum()
        got[backend] = gradients(objective, leaves)
    assert sweeps[0] == 1
    for name in ("y_support", "query_loss_weights", "y_query"):
        if name == "y_support" and first_order:
            continue  # FOMAML: the support targets only reach the outputs through the detached inner gradient
        assert got["reference"][name].abs().max() > 0, f"a test that cannot fail ({name})"
    assert_close(got["factored"], got["reference"], 1e-9, "grad")


@pytest.mark.parametrize("options", [
    dict(inner_steps=5, lr_form="per_layer", activation="tanh"),
    dict(inner_steps=5, lr_form="float", query_loss_weights=True),
    dict(inner_steps=1, lr_form="per_step", loss="cross_entropy"),
], ids=_case_id)
def test_sweep_and_autograd_agree_at_the_sinusoid_size(monkeypatch, options):
    """1-40-40-1 (1-40-40-5 for cross-entropy), 10 + 10 points, float32, as `auto` forms the layers (the
    middle one in factors for two steps, then dense): the sweep's gradients are autograd's through the
    inner loop (`FASTMAML_FACTORED_REVERSE=autograd`) to float32 rounding."""
    dims = (1, 40, 40, 5 if options.get("loss") == "cross_entropy" else 1)
    case = make_case(dims=dims, tasks=6, n_support=10, n_query=10, lr_scale=0.2, seed=73, **options)
    case = case.to(torch.float32)
    got = {}
    for mode in ("hand", "autograd"):
        monkeypatch.setattr(_factored_reverse, "MODE", mode)
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend="factored", **case.kwargs())
        assert (type(out.task_losses.grad_fn).__name__ == "_ReverseBackward") == (mode == "hand")
        got[mode] = gradients(out.loss + out.query_preds.square().mean(), case.leaves())
    assert_close(got["hand"], got["autograd"], 1e-5, "grad")


@pytest.mark.parametrize("dense", ["auto", "never"])
def test_differentiated_again_recomputes_through_autograd(monkeypatch, sweeps, dense):
    """create_graph through the sweep's node: the gradient of the meta-gradient is the reference's (the
    node recomputes the call with autograd), and a plain gradient of the same call still takes the sweep."""
    monkeypatch.setattr(factored, "DENSE", dense)
    case = make_case(inner_steps=2, lr_form="per_step", activation="tanh", query_loss_weights=True, seed=74)
    grads = {}
    for backend in ("reference", "factored"):
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend=backend, **case.kwargs())
        first = out.loss + out.query_preds.square().sum()
        (g,) = torch.autograd.grad(first, case.params[2], create_graph=True, retain_graph=True)
        grads[backend] = gradients((g * g).sum(), case.leaves(), retain_graph=True)
        grads[backend + "-plain"] = gradients(first, case.leaves())
    # The plain gradient, and the second derivative's path through the query outputs (the first's
    # cotangent on them is 2 query_preds); the create_graph gradient itself recomputed.
    assert sweeps[0] == 2
    assert grads["reference"]["params[0]"].abs().max() > 0, "a test that cannot fail"
    assert_close(grads["factored"], grads["reference"], 1e-9, "grad of the meta-gradient")
    assert_close(grads["factored-plain"], grads["reference-plain"], 1e-9, "grad")


@pytest.mark.parametrize("what", ["loss", "outputs", "again"])
@pytest.mark.parametrize("options", ["so-qlw-tanh", "fo-ce"])
def test_sweep_in_chunks(monkeypatch, sweeps, options, what):
    """The chunked path (`_factored_chunks.Chunked`) with the sweep in each chunk, its layers in factors: the unchunked
    result (test_factored's check)."""
    from test_factored import test_chunks_give_the_unchunked_result as check

    monkeypatch.setattr(factored, "DENSE", "never")
    check(monkeypatch, options, what)
    assert sweeps[0] > 0


def test_sweep_with_one_tensor_passed_twice(monkeypatch, sweeps):
    """x_query the same tensor as x_support, with the sweep (each use's gradient once) and differentiated
    again (test_factored's check)."""
    from test_factored import test_chunks_with_one_tensor_passed_twice as check

    monkeypatch.setattr(factored, "DENSE", "never")
    check(monkeypatch)
    case = make_case(dims=(3, 9, 6, 4), tasks=4, seed=75, inner_steps=2, lr_form="per_step")
    x = case.x_support
    got = {}
    for backend in ("reference", "factored"):
        out = fastmaml.maml(case.params, x, case.y_support, x, case.y_support, backend=backend, **case.kwargs())
        got[backend] = gradients(out.loss, {"x": x, **case.leaves()})
    assert_close(got["factored"], got["reference"], 1e-9, "grad")
    assert sweeps[0] > 0


@pytest.mark.parametrize("pairs", ["two", "fused"])
@pytest.mark.parametrize("max_tiles", [None, 64], ids=["groups", "one-pair-a-group"])
@pytest.mark.parametrize("options", [
    dict(inner_steps=3, lr_form="per_layer", activation="tanh", query_loss_weights=True),
    dict(inner_steps=2, lr_form="per_step", loss="cross_entropy", first_order=True),
    dict(inner_steps=2, lr_form="float", grad_inputs=False),
], ids=_case_id)
def test_sweep_through_the_kernels(kernels, monkeypatch, sweeps, options, max_tiles, pairs):
    """Every low-rank product through the Triton kernels (interpreter; factors kept at every step), bar W's
    two products by two lowrank_add launches or the fused kernel (`FASTMAML_FACTORED_PAIRS`): the
    reference's results, with the pairs grouped by their rows (5 support and 6 query points) and cut into
    groups the kernels keep in registers (64 padded elements: one pair a group)."""
    monkeypatch.setattr(factored, "DENSE", "never")
    monkeypatch.setattr(_lowrank_pairs, "FUSED", pairs == "fused")
    launches = []
    real = _lowrank_pairs.lr._module
    monkeypatch.setattr(_lowrank_pairs.lr, "_module", lambda: launches.append(1) or real())
    if max_tiles is not None:
        monkeypatch.setattr(_lowrank_pairs, "max_tiles", lambda dtype: max_tiles)
    check_maml("factored", {"dims": (3, 9, 6, 4), "tasks": 3, "seed": 76, **options}, torch.float32)
    assert sweeps[0] == 2 and launches


@pytest.mark.parametrize("dtype,rtol", [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sizes", [(3, 10, 10, 40, 40, 3), (2, 7, 5, 1, 45, 2), (2, 17, 9, 33, 1, 1)],
                         ids=["w40-J3", "in1", "out1"])
def test_fused_pairs_kernel_matches_the_batched_products(kernels, monkeypatch, sizes, dtype, rtol):
    """`lowrank_pairs_kernel` (interpreter) against the two batched products, with and without bases and
    scales, with and without v."""
    T, N, S, I, O, J = sizes
    g = torch.Generator().manual_seed(79)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=F64) * 2 - 1).to(dtype)

    monkeypatch.setattr(_lowrank_pairs, "FUSED", True)
    h, d, base_u, base_v = rand(T, N, I), rand(T, N, O), rand(T, N, O), rand(T, N, I)
    fa, fb = [rand(T, S, O) for _ in range(J)], [rand(T, S, I) for _ in range(J)]
    scales = rand(J)
    calls = []
    real = _lowrank_pairs.lr._module
    monkeypatch.setattr(_lowrank_pairs.lr, "_module", lambda: calls.append(1) or real())
    for bu, bv, sc, want_v in itertools.product((None, base_u), (None, base_v), (None, scales), (True, False)):
        u, v = _lowrank_pairs.pair_products(bu, bv, h, d, fa, fb, sc, want_v)
        s = [1.0] * J if sc is None else sc
        want_u = sum(s[j] * torch.bmm(torch.bmm(h, fb[j].transpose(1, 2)), fa[j]) for j in range(J))
        want_u = want_u if bu is None else want_u + bu
        assert_close(u, want_u, rtol, "u")
        if want_v:
            want = sum(s[j] * torch.bmm(torch.bmm(d, fa[j].transpose(1, 2)), fb[j]) for j in range(J))
            assert_close(v, want if bv is None else want + bv, rtol, "v")
        else:
            assert v is None
    assert len(calls) == 16, "the kernel ran"


def test_pair_products_group_and_chain(monkeypatch):
    """`_pair_products` gives both products over every pair whatever the grouping (pairs of two row
    counts, groups of one), with bases and a scale, and v only where asked (batched products on the CPU,
    by two lowrank_add calls or the fused path's fallback)."""
    g = torch.Generator().manual_seed(77)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=F64) * 2 - 1

    h, d, base = rand(3, 7, 5), rand(3, 7, 2), rand(3, 7, 2)
    rows = (4, 6, 4, 4, 6)
    fa = [rand(3, n, 2) for n in rows]
    fb = [rand(3, n, 5) for n in rows]
    scale = torch.tensor([-0.3], dtype=F64)
    want_u = base - 0.3 * sum(torch.bmm(torch.bmm(h, b.transpose(1, 2)), a) for a, b in zip(fa, fb))
    want_v = -0.3 * sum(torch.bmm(torch.bmm(d, a.transpose(1, 2)), b) for a, b in zip(fa, fb))
    for tiles, fused in itertools.product((2048, 64, 1), (False, True)):
        monkeypatch.setattr(_lowrank_pairs, "FUSED", fused)
        monkeypatch.setattr(_lowrank_pairs, "max_tiles", lambda dtype: tiles)
        u, v = _factored_reverse._pair_products(h, d, fa, fb, scale, base, True)
        assert_close({"u": u, "v": v}, {"u": want_u, "v": want_v}, 1e-12, f"MAX_TILES={tiles}")
        u, v = _factored_reverse._pair_products(h, d, fa, fb, scale, base, True, 2 * h)
        assert_close(v, want_v + 2 * h, 1e-12, f"MAX_TILES={tiles}, v with a base")
        u, v = _factored_reverse._pair_products(h, d, fa, fb, scale, base, False)
        assert v is None
        assert_close(u, want_u, 1e-12, f"MAX_TILES={tiles}, u only")


def test_reverse_switch_and_where_the_sweep_runs(monkeypatch):
    """FASTMAML_FACTORED_REVERSE picks the sweep or autograd (read at import; a bad value is refused by
    name); without a gradient wanted the call keeps no sweep."""
    monkeypatch.delenv("FASTMAML_FACTORED_REVERSE", raising=False)
    assert _factored_reverse.env_choice("FASTMAML_FACTORED_REVERSE", ("hand", "autograd")) == "hand"
    monkeypatch.setenv("FASTMAML_FACTORED_REVERSE", "sideways")
    with pytest.raises(ValueError, match="FASTMAML_FACTORED_REVERSE"):
        _factored_reverse.env_choice("FASTMAML_FACTORED_REVERSE", ("hand", "autograd"))
    t = torch.ones(2, requires_grad=True)
    monkeypatch.setattr(_factored_reverse, "MODE", "hand")
    assert _factored_reverse.reason([None, t]) is None
    assert "no gradient" in _factored_reverse.reason([None, t.detach()])
    with torch.no_grad():
        assert "no gradient" in _factored_reverse.reason([t])
    monkeypatch.setattr(_factored_reverse, "MODE", "autograd")
    assert "FASTMAML_FACTORED_REVERSE=autograd" in _factored_reverse.reason([t])
    case = make_case(inner_steps=2, seed=78)
    with torch.no_grad():
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend="factored", **case.kwargs())
    assert out.loss.grad_fn is None


def test_grid_is_not_empty():
    """The grid above covers each loss, activation, order and rate form (a filter that emptied it would
    pass as no tests)."""
    seen = {(o["loss"], o["activation"], o.get("first_order", False), o["lr_form"]) for o in GRID}
    want = set(itertools.product(["mse", "cross_entropy"], ["relu", "tanh"], [False, True],
                                 ["float", "per_step", "per_layer"]))
    assert want <= seen


@pytest.mark.parametrize("qw", [False, True], ids=["last-step", "step-weights"])
def test_the_sweep_frees_what_it_keeps(monkeypatch, qw):
    """After the backward the call's outputs are freed with the last reference to them (no cycle through
    the node: its tensors go through save_for_backward), and the node holds none of the forward's tensors
    (a training loop's memory stays flat)."""
    import gc
    import weakref

    monkeypatch.setattr(_factored_reverse, "MODE", "hand")
    case = make_case(dims=(3, 7, 5, 2), tasks=3, inner_steps=2, lr_form="per_step", query_loss_weights=qw, seed=80)
    out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                        backend="factored", **case.kwargs())
    node = out.task_losses.grad_fn
    assert type(node).__name__ == "_ReverseBackward"
    out.loss.backward()
    run = node.run
    held = [h[k] if isinstance(h, (list, dict)) else getattr(h, k) for h, k in run._slots()]
    assert len(held) > 10 and all(t is None for t in held)
    preds = weakref.ref(out.query_preds)
    del out, node
    gc.collect()
    assert preds() is None


def test_checkpoint_recomputes_the_sweep_node(monkeypatch, sweeps):
    """Under torch.utils.checkpoint (non-reentrant) the sweep's saved tensors are dropped and recomputed
    like any other: the same gradients as without."""
    from torch.utils.checkpoint import checkpoint

    case = make_case(dims=(3, 7, 5, 2), tasks=4, inner_steps=2, lr_form="per_layer", activation="tanh", seed=81)

    def loss(*params):
        return fastmaml.maml(list(params), case.x_support, case.y_support, case.x_query, case.y_query,
                             backend="factored", **case.kwargs()).loss

    plain = gradients(loss(*case.params), case.leaves())
    kept = gradients(checkpoint(loss, *case.params, use_reentrant=False), case.leaves())
    assert sweeps[0] == 2
    assert_close(kept, plain, 1e-12, "grad")


def test_forward_mode_and_torch_func_keep_autograd(monkeypatch, sweeps):
    """Forward-mode AD and torch.func transforms take autograd's form (the sweep is a reverse-mode
    Function without setup_context): their results are autograd's, and the sweep did not run."""
    from torch.autograd import forward_ad as fwAD

    case = make_case(dims=(1, 16, 16, 1), tasks=3, inner_steps=2, lr_form="float", n_support=4, n_query=4, seed=82)
    rest = case.params[1:]

    def loss(p0):
        return fastmaml.maml([p0, *rest], case.x_support, case.y_support, case.x_query, case.y_query,
                             backend="factored", **case.kwargs()).loss

    tangent = torch.linspace(-1, 1, case.params[0].numel(), dtype=F64).view_as(case.params[0])
    results = {}
    for mode in ("hand", "autograd"):
        monkeypatch.setattr(_factored_reverse, "MODE", mode)
        with fwAD.dual_level():
            jvp = fwAD.unpack_dual(loss(fwAD.make_dual(case.params[0].detach(), tangent))).tangent
        results[mode] = {"jvp": jvp, "grad": torch.func.grad(loss)(case.params[0].detach())}
    assert sweeps[0] == 0
    assert results["autograd"]["grad"].abs().max() > 0, "a test that cannot fail"
    assert_close(results["hand"], results["autograd"], 1e-12, "")


def test_autocast_is_refused():
    """Under autocast the model multiplies by its adapted weights in bfloat16, which the factored form never
    makes (its loss moved by 3e-4 on a case like this one): an explicit request raises, and `auto`, which took
    `factored` there (the cpu kernel refuses autocast), takes the reference."""
    case = make_case(dims=(1, 40, 40, 1), tasks=7, n_support=10, n_query=10, inner_steps=2, lr_form="float",
                     lr_scale=0.1, seed=83).to(torch.float32)
    args = (case.params, case.x_support, case.y_support, case.x_query, case.y_query)
    with torch.autocast("cpu", torch.bfloat16):
        assert fastmaml.maml(*args, **case.kwargs()).backend == "reference"
        with pytest.raises(ValueError, match="autocast"):
            fastmaml.maml(*args, backend="factored", **case.kwargs())


@pytest.mark.parametrize("path", ["chunks", "chunks-again", "again"])
def test_backward_under_autocast_recomputes_without_it(monkeypatch, sweeps, path):
    """A forward outside autocast and its backward inside it, where the backward recomputes the forward:
    the chunks' backward (with and without create_graph) and the sweep's create_graph. The recomputed
    chunk and its gradients run without autocast, so they are the gradients outside it (under autocast
    the recomputation took autograd's form in bfloat16: off by about 1e-2). A gradient taken with
    create_graph is then differentiated outside autocast."""
    case = make_case(dims=(1, 16, 16, 1), tasks=5, inner_steps=2, lr_form="per_step", n_support=4, n_query=4,
                     seed=86).to(torch.float32)
    if path.startswith("chunks"):
        problem = fastmaml._validate.make_problem(case.params, case.x_support, case.y_support, case.x_query,
                                                  case.y_query, **case.kwargs())
        monkeypatch.setattr(factored, "MAX_CHUNK_BYTES", factored.saved_bytes_per_task(problem) * 2)
    got = {}
    for cast in (False, True):
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend="factored", **case.kwargs())
        assert (type(out.loss.grad_fn).__name__ == "ChunkedBackward") == path.startswith("chunks")
        objective = (out.task_losses * torch.linspace(0.5, 1.5, 5)).sum()
        with torch.autocast("cpu", torch.bfloat16, enabled=cast):
            if not path.endswith("again"):
                got[cast] = gradients(objective, case.leaves())
                continue
            (g,) = torch.autograd.grad(objective, case.params[2], create_graph=True)
        # Outside autocast: the graph of g is autograd's, and its own backward under autocast would compute
        # in bfloat16 on any path (the reference's too).
        got[cast] = gradients((g * g).sum(), case.leaves())
    assert got[False]["params[0]"].abs().max() > 0, "a test that cannot fail"
    assert_close(got[True], got[False], 1e-6, "grad under autocast")


def test_backward_under_autocast(monkeypatch, sweeps):
    """A forward outside autocast and its backward inside it (the sweep's products in the autocast dtype
    failed on its float32 tensors: "mat1 and mat2 must have the same dtype"): the sweep runs in the
    forward's dtype, so its gradients are autograd's outside autocast (autograd's own backward under
    autocast computes its products in bfloat16: within bfloat16's rounding of them)."""
    case = make_case(dims=(1, 16, 16, 1), tasks=3, inner_steps=2, lr_form="per_step", n_support=4, n_query=4,
                     seed=84).to(torch.float32)
    got = {}
    for mode, cast in (("hand", True), ("autograd", False), ("autograd-cast", True)):
        monkeypatch.setattr(_factored_reverse, "MODE", mode.split("-")[0])
        out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                            backend="factored", **case.kwargs())
        with torch.autocast("cpu", torch.bfloat16, enabled=cast):
            got[mode] = gradients(out.loss, case.leaves())
    assert sweeps[0] == 1
    assert_close(got["hand"], got["autograd"], 1e-5, "grad")
    assert_close(got["hand"], got["autograd-cast"], 3e-2, "grad against autograd's bfloat16 backward")


def test_each_kept_tensor_saved_once(monkeypatch):
    """The run holds the inputs again and each factor in every later layer's lists: save_for_backward
    gets each tensor once (a saved-tensor hook such as save_on_cpu would copy every repeat), and the
    gradients under save_on_cpu are autograd's."""
    case = make_case(dims=(1, 40, 40, 1), tasks=4, n_support=5, n_query=5, inner_steps=3, lr_form="float",
                     lr_scale=0.2, seed=85)
    monkeypatch.setattr(factored, "DENSE", "never")
    got = {}
    for mode in ("hand", "autograd"):
        monkeypatch.setattr(_factored_reverse, "MODE", mode)
        packed = []

        def pack(t, packed=packed):
            packed.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                                backend="factored", **case.kwargs())
        if mode == "hand":
            ids = [id(t) for t in packed]
            assert len(ids) == len(set(ids)), "a tensor saved twice"
        with torch.autograd.graph.save_on_cpu():
            out = fastmaml.maml(case.params, case.x_support, case.y_support, case.x_query, case.y_query,
                                backend="factored", **case.kwargs())
        got[mode] = gradients(out.loss + out.query_preds.square().sum(), case.leaves())
    assert_close(got["hand"], got["autograd"], 1e-10, "grad")
