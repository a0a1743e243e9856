"""One argument order per op: python/gptcore/ops.py, the pybind11 bindings (gptcore._C, whose
names and order are those of csrc/core/ops.h) and python/gptcore/reference.py must name the same
arguments in the same order. Reordering or renaming an argument in one layer fails here.

The order (csrc/core/backend_ops.inc): inputs, parameters, scalar settings, accumulated
parameter gradients, outputs (``out=`` last). The tables below spell out every place where a
layer deliberately differs from ops.py; everything else must match name for name.
"""

from __future__ import annotations

import ast
import inspect

import pytest

from gptcore import _C, ops, reference

# ---- ops.py -> binding -------------------------------------------------------------------------
# For each public op: the binding it calls, and how ops.py's conveniences map onto the binding's
# arguments:
#   expand: one ops.py argument that stands for several binding arguments, in this order.
#           ``out=`` is one buffer or a tuple of buffers; the binding names each output buffer
#           after the output it receives. ``pos`` is an int or a position tensor; the binding
#           takes the int as ``pos`` and the tensor as ``pos_dev``.
#   fixed:  binding arguments that the wrapper sets itself (no ops.py argument): cross_entropy's
#           ``with_grad`` is chosen by which of the two wrappers is called, and the forward-only
#           wrapper passes grad_scale/inplace/dlogits as unused.
BINDINGS = {
    "embedding_forward": dict(c="embedding_forward", expand={"pos": ["pos", "pos_dev"],
                                                             "out": ["out"]}),
    "embedding_backward": dict(c="embedding_backward"),
    "layernorm_forward": dict(c="layernorm_forward", expand={"out": ["out", "mean", "rstd"]}),
    "layernorm_backward": dict(c="layernorm_backward", expand={"out": ["dx"]}),
    "residual_layernorm_forward": dict(c="residual_layernorm_forward",
                                       expand={"out": ["sum", "out", "mean", "rstd"]}),
    "residual_layernorm_backward": dict(c="residual_layernorm_backward", expand={"out": ["dx"]}),
    "linear_forward": dict(c="linear_forward", expand={"out": ["out", "pre"]}),
    "linear_backward": dict(c="linear_backward", expand={"out": ["dx"]}),
    "attention_forward": dict(c="attention_forward", expand={"out": ["out", "lse"]}),
    # attention_backward's buffer is dqkv= in Python too (``out`` is the forward output there)
    "attention_backward": dict(c="attention_backward"),
    "attention_kvcache": dict(c="attention_kvcache", expand={"pos": ["pos", "pos_dev"],
                                                             "out": ["out"]}),
    "dropout_forward": dict(c="dropout_forward"),
    "dropout_backward": dict(c="dropout_backward"),
    "cross_entropy_forward": dict(c="cross_entropy", expand={"out": ["losses"]},
                                  fixed={"with_grad", "grad_scale", "inplace", "dlogits"}),
    "cross_entropy_forward_backward": dict(c="cross_entropy",
                                           expand={"out": ["losses", "dlogits"]},
                                           fixed={"with_grad"}),
    "adamw_step": dict(c="adamw_step"),
    "global_norm": dict(c="global_norm"),
    "sample_tokens": dict(c="sample_tokens", expand={"out": ["tokens"]}),
}

# ---- ops.py -> reference.py --------------------------------------------------------------------
# The reference is pure: it returns parameter gradients instead of accumulating into buffers, so
# it leaves out the buffer arguments ("omit"), and it takes what the op learns from a buffer as a
# setting instead, in the buffer's place ("extra"). "rename": reference.adamw_step updates one
# tensor, so its arguments are singular.
OUT = {"out"}
REFERENCE = {
    "embedding_forward": dict(omit=OUT),
    "embedding_backward": dict(omit={"dwte", "dwpe"}, extra=["vocab_size", "max_positions"]),
    "layernorm_forward": dict(omit=OUT),
    "layernorm_backward": dict(omit={"dweight", "dbias"} | OUT),
    "residual_layernorm_forward": dict(omit=OUT),
    "residual_layernorm_backward": dict(omit={"dweight", "dbias"} | OUT),
    "linear_forward": dict(omit=OUT),
    # need_dx: the reference always returns dx; has_bias stands for dbias=None
    "linear_backward": dict(omit={"need_dx", "dweight", "dbias"} | OUT, extra=["has_bias"]),
    "attention_forward": dict(omit=OUT),
    "attention_backward": dict(omit={"dqkv"}),
    "attention_kvcache": dict(omit=OUT),
    # pure: no in-place variant
    "dropout_forward": dict(omit={"inplace"} | OUT),
    "dropout_backward": dict(omit={"inplace"} | OUT),
    "cross_entropy_forward": dict(omit=OUT),
    "cross_entropy_forward_backward": dict(omit={"inplace"} | OUT),
    # float64 has no master weights and no stochastic rounding (seed)
    "adamw_step": dict(omit={"master", "seed"}, rename={"param": "params", "grad": "grads"}),
    "global_norm": dict(),
    "sample_tokens": dict(omit=OUT),
}


def python_params(fn) -> list[tuple[str, str]]:
    """(name, kind) of a Python function's parameters, in order."""
    return [(p.name, p.kind.name) for p in inspect.signature(fn).parameters.values()]


def binding_params(fn) -> list[str]:
    """Argument names of a pybind11 function, in order, read from its docstring's signature line
    (``name(a: T, *, b: T = None) -> R``) with Python's own parser."""
    first = fn.__doc__.strip().splitlines()[0]
    name, _, rest = first.partition("(")
    assert name == fn.__name__, f"unexpected docstring for {fn.__name__}: {first!r}"
    args = rest.rpartition(") ->")[0] if ") ->" in rest else rest.rpartition(")")[0]
    tree = ast.parse(f"def f({args}): pass")
    a = tree.body[0].args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]


def test_every_op_is_covered():
    # A new op must be added to both tables (and so to every layer) to pass.
    assert set(ops.__all__) == set(BINDINGS) == set(REFERENCE)


@pytest.mark.parametrize("name", ops.__all__)
def test_binding_matches_ops_py(name):
    spec = BINDINGS[name]
    c_fn = getattr(_C, spec["c"])
    expand = spec.get("expand", {})
    want = [c for n, _ in python_params(getattr(ops, name)) for c in expand.get(n, [n])]
    got = [c for c in binding_params(c_fn) if c not in spec.get("fixed", set())]
    assert got == want, f"_C.{spec['c']} {got} vs ops.{name} {want}"
    assert not any(n.startswith("arg") and n[3:].isdigit() for n in binding_params(c_fn)), \
        f"_C.{spec['c']} has unnamed arguments (py::arg missing)"


@pytest.mark.parametrize("name", ops.__all__)
def test_reference_matches_ops_py(name):
    spec = REFERENCE[name]
    omit, extra, rename = spec.get("omit", set()), spec.get("extra", []), spec.get("rename", {})
    op = [(n, k) for n, k in python_params(getattr(ops, name)) if n not in omit]
    ref = [(rename.get(n, n), k) for n, k in python_params(getattr(reference, name))]
    assert [n for n, _ in ref if n in extra] == extra, f"reference.{name}: extras {extra} missing"
    ref = [(n, k) for n, k in ref if n not in extra]
    # same names, same order, and the same positional / keyword-only kind
    assert ref == op, f"reference.{name} {ref} vs ops.{name} {op}"


def test_checks_catch_a_reorder():
    # The comparisons above are only as good as the parsers: a swapped pair must show up in both.
    def swapped(dout, mean, x, rstd, *, dresidual=None, weight, dweight, dbias, out=None):
        pass

    ops_order = [n for n, _ in python_params(ops.layernorm_backward)]
    assert [n for n, _ in python_params(swapped)] != ops_order
    assert sorted(n for n, _ in python_params(swapped)) == sorted(ops_order)
    assert binding_params(_C.layernorm_backward) == [
        "dout", "x", "mean", "rstd", "dresidual", "weight", "dweight", "dbias", "dx"]
