"""GPT: a decoder-only transformer assembled from gptcore.ops, forward and backward by hand.

There is no autograd. ``forward`` runs the ops in order and keeps what each backward needs;
``backward`` walks the same ops in reverse, llm.c style. The layout (pre-LN GPT-2/3):

    x = wte[idx] + wpe                                    embedding_forward
    for each block:
        ln1 = LN(x)            (fused with the residual add of the previous block's MLP)
        qkv = ln1 @ c_attn;  att = attention(qkv);  x = x + att @ c_proj
        ln2 = LN(x)            (fused with that residual add: residual_layernorm_forward)
        x = x + gelu(ln2 @ c_fc) @ c_proj                (GELU fused into the c_fc GEMM)
    logits = LN_f(x) @ wte^T                              (tied head, padded vocabulary)
    loss, dlogits = cross_entropy(logits)                 (fused, dlogits overwrite logits)

GPT-1 (``prenorm=False``) normalises after each residual add instead and has no final LN.

Parameters live on ``device`` in ``dtype`` (float32, or bfloat16 on CUDA). Their gradients are
always float32 (the ops accumulate parameter gradients in float32 on CUDA), so an optimiser can
keep float32 master weights next to bfloat16 parameters.

Memory: activations live in a workspace allocated once per (batch, sequence) shape and reused
by every step (the ops write into it through ``out=``), llm.c style. Backward needs only a few
activation-gradient buffers of its own, shared by all blocks. The two most recently used shapes
keep their workspaces (a training shape and an evaluation shape); others are released.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from .. import cuda as _cuda
from .. import ops
from .config import GPTConfig
from ..tensor import Tensor, _dtype_name, empty, from_numpy, zeros

__all__ = ["GPT"]


def _check_device(device) -> str:
    if not isinstance(device, str):
        raise TypeError(f"device: expected a string like 'cpu' or 'cuda:0', got {type(device).__name__}")
    d = device.strip().lower()
    if d == "cpu":
        return d
    if d == "cuda" or d.startswith("cuda:"):
        if d != "cuda":
            idx = d[5:]
            if not idx.isdigit():
                raise ValueError(f"device: malformed CUDA device {device!r} (expected 'cuda' or 'cuda:N')")
        if not _cuda.is_compiled():
            raise ValueError(f"device: {device!r} requested but this gptcore build has no CUDA support")
        if not _cuda.is_available():
            raise ValueError(f"device: {device!r} requested but no CUDA GPU is available")
        return d
    raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _check_dtype(dtype, device: str) -> str:
    name = _dtype_name(dtype)
    if name not in ("float32", "bfloat16"):
        raise TypeError(f"dtype: a model's parameters are float32 or bfloat16, got {name}")
    if name == "bfloat16" and device == "cpu":
        raise TypeError("dtype: bfloat16 models run on CUDA; the CPU kernels compute in float32")
    return name


def _upload(arr: np.ndarray, device: str, dtype: str) -> Tensor:
    """A fresh gptcore-allocated tensor on ``device`` holding ``arr`` (float32) as ``dtype``."""
    host = from_numpy(np.ascontiguousarray(arr, dtype=np.float32), "param")
    if device == "cpu" and dtype == "float32":
        out = empty(list(arr.shape), "float32", "cpu")
        out.copy_(host)
        return out
    return host.to(device=device, dtype=dtype)


class GPT:
    """A GPT-1/2/3 model on gptcore kernels.

    >>> cfg = GPTConfig.preset("tiny")
    >>> model = GPT(cfg, seed=0)
    >>> loss = model.forward(x, y); model.backward()    # x, y (B, T) integer arrays

    ``parameters()`` and ``grads()`` return name -> Tensor dicts with GPT-2-style names
    (``wte``, ``wpe``, ``h.0.ln_1.weight``, ``h.0.attn.c_attn.weight``, ... ``ln_f.bias``);
    linear weights are stored (out_features, in_features). ``wte`` holds
    ``config.padded_vocab_size`` rows whose padding rows are zero and stay zero (they get no
    gradient); ``state_dict()`` gives the unpadded (vocab_size, C) view users expect.
    """

    def __init__(self, config: GPTConfig, device: str = "cpu", dtype="float32", seed: int = 0,
                 init: bool = True):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.config = config
        self.device = _check_device(device)
        self.dtype = _check_dtype(dtype, self.device)
        self.seed = int(seed)
        self._params: Dict[str, Tensor] = {}
        self._grads: Dict[str, Tensor] = {}
        self._acts: Optional[_Workspace] = None  # the workspace a pending backward reads
        self._workspaces: Dict[tuple, _Workspace] = {}  # (B, T) -> activation buffers
        # init=False allocates zeroed parameters (a checkpoint load then fills them) and skips
        # drawing ~all parameters from the random generator.
        self._init_params(np.random.default_rng(self.seed) if init else None)
        C = config.n_embd
        # Bias-free configs still feed the LayerNorm op a bias: a constant zero vector, with a
        # scratch gradient that nobody reads.
        self._zero_bias = None if config.bias else zeros([C], self.dtype, self.device)
        self._scratch_dbias = None if config.bias else zeros([C], "float32", self.device)

    # ---- parameters ---------------------------------------------------------------------

    def _param_specs(self):
        """(name, shape, init) in a fixed order; init is 'normal', 'resid', 'ones' or 'zeros'."""
        cfg = self.config
        C, Vp = cfg.n_embd, cfg.padded_vocab_size
        specs = [("wte", (Vp, C), "normal"), ("wpe", (cfg.block_size, C), "normal")]

        def ln(prefix):
            specs.append((prefix + ".weight", (C,), "ones"))
            if cfg.bias:
                specs.append((prefix + ".bias", (C,), "zeros"))

        def lin(prefix, out_f, in_f, init):
            specs.append((prefix + ".weight", (out_f, in_f), init))
            if cfg.bias:
                specs.append((prefix + ".bias", (out_f,), "zeros"))

        for i in range(cfg.n_layer):
            h = f"h.{i}"
            ln(h + ".ln_1")
            lin(h + ".attn.c_attn", 3 * C, C, "normal")
            lin(h + ".attn.c_proj", C, C, "resid")
            ln(h + ".ln_2")
            lin(h + ".mlp.c_fc", 4 * C, C, "normal")
            lin(h + ".mlp.c_proj", C, 4 * C, "resid")
        if cfg.prenorm:
            ln("ln_f")
        return specs

    def _init_params(self, rng: Optional[np.random.Generator]) -> None:
        cfg = self.config
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, shape, init in self._param_specs():
            if init == "ones":
                arr = np.ones(shape, np.float32)
            elif init == "zeros" or rng is None:
                arr = np.zeros(shape, np.float32)
            else:
                std = 0.02 if init == "normal" else resid_std
                arr = rng.standard_normal(shape, dtype=np.float32)
                arr *= np.float32(std)
            if name == "wte":
                arr[cfg.vocab_size:] = 0.0  # padding rows: never indexed, never a real logit
            self._params[name] = _upload(arr, self.device, self.dtype)
            self._grads[name] = zeros(list(shape), "float32", self.device)

    # ---- checkpoints and generation (see checkpoint.py and sample.py) ----------------------

    def save_pretrained(self, path, **kwargs) -> None:
        """Save in transformers' GPT-2 (or GPT-1) layout; see gptcore.checkpoint.save_pretrained."""
        from ..io.pretrained import save_pretrained

        save_pretrained(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu", dtype="float32") -> "GPT":
        """Load a gptcore/transformers GPT-2 or GPT-1 directory, or an llm.c model .bin."""
        from ..io.pretrained import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype)

    def generate(self, idx, max_new_tokens, **kwargs):
        """KV-cache sampling with GPT-3's completion controls; see gptcore.sample.generate."""
        from ..generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    def parameters(self) -> Dict[str, Tensor]:
        """name -> parameter Tensor (the live storage; wte includes the padding rows)."""
        return dict(self._params)

    def grads(self) -> Dict[str, Tensor]:
        """name -> float32 gradient Tensor, accumulated by backward() until zero_grad()."""
        return dict(self._grads)

    def num_parameters(self) -> int:
        """Parameter count without the vocabulary padding (as the papers count)."""
        return self.config.num_parameters()

    def zero_grad(self) -> None:
        for g in self._grads.values():
            g.zero_()

    def state_dict(self) -> Dict[str, np.ndarray]:
        """name -> float32 NumPy copy of every parameter, wte unpadded (vocab_size, C)."""
        out = {}
        for name, p in self._params.items():
            arr = np.array(p.numpy(), dtype=np.float32, copy=True)
            if name == "wte":
                arr = np.ascontiguousarray(arr[: self.config.vocab_size])
            out[name] = arr
        return out

    def load_state_dict(self, state: Dict[str, np.ndarray], strict: bool = True) -> None:
        """Copy parameters in from NumPy arrays (or anything np.asarray takes).

        ``wte`` may be (vocab_size, C) or padded (padded_vocab_size, C); padding rows become 0.
        With ``strict`` every parameter must be present and nothing else.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict of arrays, got {type(state).__name__}")
        if strict:
            missing = sorted(set(self._params) - set(state))
            extra = sorted(set(state) - set(self._params))
            if missing or extra:
                raise ValueError(f"state: missing {missing or 'nothing'}; unexpected {extra or 'nothing'}")
        V = self.config.vocab_size
        staged = {}
        for name, value in state.items():
            if name not in self._params:
                continue
            arr = np.asarray(value)
            if not np.issubdtype(arr.dtype, np.floating):
                raise TypeError(f"state[{name!r}]: expected floating-point values, got {arr.dtype}")
            want = tuple(self._params[name].shape)
            if name == "wte" and arr.shape == (V, want[1]):
                full = np.zeros(want, np.float32)
                full[:V] = arr
                arr = full
            elif arr.shape != want:
                raise ValueError(f"state[{name!r}]: expected shape {want}, got {arr.shape}")
            else:
                arr = np.array(arr, dtype=np.float32)
                if name == "wte":
                    arr[V:] = 0.0
            staged[name] = arr
        for name, arr in staged.items():  # all validated: now write
            self._params[name].copy_(_upload(arr, self.device, self.dtype))

    # ---- input checks -------------------------------------------------------------------

    def _ids_to_numpy(self, x, name: str) -> np.ndarray:
        if isinstance(x, Tensor):
            if x.dtype not in ("int32", "int64", "uint16"):
                raise TypeError(f"{name}: expected integer token ids, got a {x.dtype} tensor")
            arr = x.numpy()
        else:
            if isinstance(x, (list, tuple)):
                x = np.array(x)
            if not hasattr(x, "dtype") and not hasattr(x, "__array__"):
                raise TypeError(f"{name}: expected a (B, T) integer array, got {type(x).__name__}")
            arr = np.asarray(x)
            if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"{name}: expected integer token ids, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (batch, sequence) array, got shape {tuple(arr.shape)}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"{name}: empty batch, shape {tuple(arr.shape)}")
        return arr

    def _prepare_idx(self, idx) -> Tensor:
        arr = self._ids_to_numpy(idx, "idx")
        cfg = self.config
        T = arr.shape[1]
        if T > cfg.block_size:
            raise ValueError(f"idx: sequence length {T} exceeds block_size {cfg.block_size}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"idx: token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        return self._to_device_ids(arr)

    def _prepare_targets(self, targets, shape):
        arr = self._ids_to_numpy(targets, "targets")
        if arr.shape != shape:
            raise ValueError(f"targets: expected shape {shape} (like idx), got {tuple(arr.shape)}")
        arr = arr.astype(np.int64, copy=False)
        if int(arr.max()) >= self.config.vocab_size:
            raise ValueError(f"targets: id {int(arr.max())} is outside the vocabulary "
                             f"[0, {self.config.vocab_size}) (negative targets are ignored)")
        arr = np.where(arr < 0, -1, arr)  # every negative target means "ignore"
        n_valid = int((arr >= 0).sum())
        return self._to_device_ids(arr), n_valid

    def _to_device_ids(self, arr: np.ndarray) -> Tensor:
        host = from_numpy(np.ascontiguousarray(arr, dtype=np.int32), "idx")
        if self.device == "cpu":
            return host
        return host.to(device=self.device)

    # ---- forward ------------------------------------------------------------------------

    def _ln_bias(self, name: str) -> Tensor:
        return self._params[name] if self.config.bias else self._zero_bias

    def _dln_bias(self, name: str) -> Tensor:
        return self._grads[name] if self.config.bias else self._scratch_dbias

    def _workspace(self, B: int, T: int) -> "_Workspace":
        """The activation buffers for a (B, T) batch, allocated on first use and kept (the two
        most recently used shapes, so a training shape and an evaluation shape coexist)."""
        key = (B, T)
        ws = self._workspaces.pop(key, None)
        if ws is None:
            ws = _Workspace(self, B, T)
            while len(self._workspaces) >= 2:
                self._workspaces.pop(next(iter(self._workspaces)))
        self._workspaces[key] = ws  # most recent last
        return ws

    def _run(self, idx_t: Tensor, head: bool = True) -> "_Workspace":
        """Forward through the blocks (and the LM head) into the (B, T) workspace."""
        self._acts = None  # the workspace is about to be overwritten: no pending backward
        cfg, P = self.config, self._params
        eps, H = cfg.ln_eps, cfg.n_head
        ws = self._workspace(*idx_t.shape)
        ws.idx = idx_t
        x0 = ops.embedding_forward(idx_t, P["wte"], P["wpe"], out=ws.x0)
        scratch = ws.scratch  # c_proj outputs, consumed by the next fused residual+LN

        def lin(x, prefix, out, gelu=False):
            return ops.linear_forward(x, P[prefix + ".weight"], P.get(prefix + ".bias"),
                                      gelu=gelu, out=out)

        if cfg.prenorm:
            for i, A in enumerate(ws.layers):
                h = f"h.{i}"
                w1, b1 = P[h + ".ln_1.weight"], self._ln_bias(h + ".ln_1.bias")
                if i == 0:  # the residual stream entering block 0 is the embedding
                    A["res"] = x0
                    ops.layernorm_forward(x0, w1, b1, eps, out=(A["ln1"], A["m1"], A["r1"]))
                else:  # residual add of the previous MLP fused with this block's ln_1
                    ops.residual_layernorm_forward(scratch, ws.layers[i - 1]["res_mid"], w1, b1, eps,
                                                   out=(A["res"], A["ln1"], A["m1"], A["r1"]))
                lin(A["ln1"], h + ".attn.c_attn", A["qkv"])
                ops.attention_forward(A["qkv"], H, cfg.attn_window[i], out=(A["att"], A["lse"]))
                lin(A["att"], h + ".attn.c_proj", scratch)
                ops.residual_layernorm_forward(
                    scratch, A["res"], P[h + ".ln_2.weight"], self._ln_bias(h + ".ln_2.bias"), eps,
                    out=(A["res_mid"], A["ln2"], A["m2"], A["r2"]))
                lin(A["ln2"], h + ".mlp.c_fc", (A["fc"], A["fc_pre"]), gelu=True)
                lin(A["fc"], h + ".mlp.c_proj", scratch)
            F = ws.final
            ops.residual_layernorm_forward(scratch, ws.layers[-1]["res_mid"], P["ln_f.weight"],
                                           self._ln_bias("ln_f.bias"), eps,
                                           out=(F["res"], F["x"], F["m"], F["r"]))
        else:  # GPT-1: x = LN(x + attn(x)); x = LN(x + mlp(x)); no final LN
            x = x0
            for i, A in enumerate(ws.layers):
                h = f"h.{i}"
                A["x"] = x
                lin(x, h + ".attn.c_attn", A["qkv"])
                ops.attention_forward(A["qkv"], H, cfg.attn_window[i], out=(A["att"], A["lse"]))
                lin(A["att"], h + ".attn.c_proj", scratch)
                ops.residual_layernorm_forward(
                    scratch, x, P[h + ".ln_1.weight"], self._ln_bias(h + ".ln_1.bias"), eps,
                    out=(A["s1"], A["n1"], A["m1"], A["r1"]))
                lin(A["n1"], h + ".mlp.c_fc", (A["fc"], A["fc_pre"]), gelu=True)
                lin(A["fc"], h + ".mlp.c_proj", scratch)
                ops.residual_layernorm_forward(
                    scratch, A["n1"], P[h + ".ln_2.weight"], self._ln_bias(h + ".ln_2.bias"), eps,
                    out=(A["s2"], A["out"], A["m2"], A["r2"]))
                x = A["out"]
            ws.final["x"] = x
        if head:  # tied LM head: logits (B, T, Vp) = x @ wte^T
            ops.linear_forward(ws.final["x"], P["wte"], None, out=ws.logits())
        return ws

    def forward(self, idx, targets=None, *, loss_scale: float = 1.0, grad: bool = True):
        """Run the model.

        Without ``targets``: returns the logits as a float32 NumPy array (B, T, vocab_size).
        With ``targets`` (B, T) (negative entries ignored): returns the mean cross-entropy over
        the non-ignored positions as a Python float and, when ``grad`` is True, keeps what
        :meth:`backward` needs. The logits' gradient is computed in the same fused pass; it is
        the gradient of ``loss_scale * mean_loss`` (use ``1 / grad_accum`` when accumulating
        micro-batches).
        """
        idx_t = self._prepare_idx(idx)
        if targets is None:
            return self._logits_numpy(self._run(idx_t).logits())
        if not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale):
            raise ValueError(f"loss_scale: expected a finite number, got {loss_scale!r}")
        tgt, n_valid = self._prepare_targets(targets, tuple(idx_t.shape))
        ws = self._run(idx_t)
        V = self.config.vocab_size
        if grad:
            scale = float(loss_scale) / n_valid if n_valid else 0.0
            # the logits buffer now holds their gradient
            losses, _ = ops.cross_entropy_forward_backward(ws.logits(), tgt, V, -1,
                                                           grad_scale=scale, inplace=True,
                                                           out=(ws.losses, None))
            self._acts = ws
        else:
            losses = ops.cross_entropy_forward(ws.logits(), tgt, V, -1, out=ws.losses)
        if n_valid == 0:
            return float("nan")
        return float(np.asarray(losses.numpy(), dtype=np.float64).sum() / n_valid)

    def __call__(self, idx) -> np.ndarray:
        """``model(idx)``: float32 NumPy logits (B, T, vocab_size) for (B, T) token ids."""
        return self.logits(idx)

    def logits(self, idx, last_only: bool = False) -> np.ndarray:
        """float32 NumPy logits (B, T, vocab_size), or (B, vocab_size) with ``last_only``.

        ``last_only`` runs the LM head on the last position only (what a sampler needs).
        """
        idx_t = self._prepare_idx(idx)
        if not last_only:
            return self._logits_numpy(self._run(idx_t).logits())
        x = self._run(idx_t, head=False).final["x"]
        B, T, C = x.shape
        if B == 1:  # the last row of a (T, C) view, on the device
            last = x.view([T, C]).narrow(T - 1, 1)
        else:  # (B, C): one row per sequence, gathered through the host
            last = _upload(np.ascontiguousarray(np.asarray(x.numpy())[:, -1, :]), self.device, self.dtype)
        out, _ = ops.linear_forward(last, self._params["wte"], None)
        return self._logits_numpy(out)

    def _logits_numpy(self, logits: Tensor) -> np.ndarray:
        arr = np.asarray(logits.numpy())  # may view the workspace: always copy out
        return np.array(arr[..., : self.config.vocab_size], dtype=np.float32, order="C", copy=True)

    def loss(self, idx, targets) -> float:
        """Mean cross-entropy without keeping anything for backward (for evaluation)."""
        return self.forward(idx, targets, grad=False)

    # ---- backward -----------------------------------------------------------------------

    def backward(self) -> None:
        """Accumulate the gradients of the last ``forward(idx, targets)`` into ``grads()``."""
        ws = self._acts
        if ws is None:
            raise RuntimeError("backward: call forward(idx, targets) first (and only once per "
                               "forward, with no other forward or logits call in between)")
        self._acts = None
        cfg, P, G = self.config, self._params, self._grads
        H = cfg.n_head
        grab = ws.grad_buffers()  # grab(*live) -> a (B, T, C) gradient buffer not in `live`
        dfc, dqkv = ws.dfc, ws.dqkv

        def lin_back(dout, x, prefix, out, pre=None):
            return ops.linear_backward(dout, x, P[prefix + ".weight"], G[prefix + ".weight"],
                                       G.get(prefix + ".bias"), pre=pre, out=out)

        def ln_back(dout, x, prefix, mean, rstd, out, dresidual=None):
            return ops.layernorm_backward(dout, x, P[prefix + ".weight"], mean, rstd,
                                          G[prefix + ".weight"], self._dln_bias(prefix + ".bias"),
                                          dresidual=dresidual, out=out)

        # tied LM head: its weight gradient lands in dwte together with the embedding's
        F = ws.final
        dx = ops.linear_backward(ws.logits(), F["x"], P["wte"], G["wte"], None, out=grab())
        if cfg.prenorm:
            dres = ln_back(dx, F["res"], "ln_f", F["m"], F["r"], out=grab(dx))
            for i in reversed(range(cfg.n_layer)):
                h, A = f"h.{i}", ws.layers[i]
                lin_back(dres, A["fc"], h + ".mlp.c_proj", dfc)
                dln2 = lin_back(dfc, A["ln2"], h + ".mlp.c_fc", grab(dres), pre=A["fc_pre"])
                dres_mid = ln_back(dln2, A["res_mid"], h + ".ln_2", A["m2"], A["r2"],
                                   out=grab(dres, dln2), dresidual=dres)
                datt = lin_back(dres_mid, A["att"], h + ".attn.c_proj", grab(dres_mid))
                ops.attention_backward(datt, A["qkv"], A["att"], A["lse"], H, cfg.attn_window[i],
                                       dqkv=dqkv)
                dln1 = lin_back(dqkv, A["ln1"], h + ".attn.c_attn", grab(dres_mid))
                dres = ln_back(dln1, A["res"], h + ".ln_1", A["m1"], A["r1"],
                               out=grab(dres_mid, dln1), dresidual=dres_mid)
            self._embedding_backward(dres, ws.idx)
        else:
            # The gradient reaching a block's output arrives as two parts (g_a + g_b): there is
            # no add op, and LayerNorm's backward is linear in dout, so LN'(g_a + g_b) is one
            # call for g_a and a second that adds LN'(g_b) via dresidual.
            g_a, g_b = dx, None
            for i in reversed(range(cfg.n_layer)):
                h, A = f"h.{i}", ws.layers[i]
                ds2 = self._ln_back_sum(g_a, g_b, A["s2"], h + ".ln_2", A["m2"], A["r2"], grab)
                lin_back(ds2, A["fc"], h + ".mlp.c_proj", dfc)
                dn1 = lin_back(dfc, A["n1"], h + ".mlp.c_fc", grab(ds2), pre=A["fc_pre"])
                # n1 fed both c_fc and the residual of s2
                ds1 = self._ln_back_sum(ds2, dn1, A["s1"], h + ".ln_1", A["m1"], A["r1"], grab)
                datt = lin_back(ds1, A["att"], h + ".attn.c_proj", grab(ds1))
                ops.attention_backward(datt, A["qkv"], A["att"], A["lse"], H, cfg.attn_window[i],
                                       dqkv=dqkv)
                dx_in = lin_back(dqkv, A["x"], h + ".attn.c_attn", grab(ds1))
                g_a, g_b = ds1, dx_in  # x fed both c_attn and the residual of s1
            self._embedding_backward(g_a, ws.idx)
            self._embedding_backward(g_b, ws.idx)

    def _ln_back_sum(self, g_a, g_b, x, prefix, mean, rstd, grab):
        """LN backward for dout = g_a + g_b (g_b may be None), accumulating dweight/dbias."""
        P, G = self._params, self._grads
        w, dw, db = P[prefix + ".weight"], G[prefix + ".weight"], self._dln_bias(prefix + ".bias")
        live = (g_a,) if g_b is None else (g_a, g_b)
        d = ops.layernorm_backward(g_a, x, w, mean, rstd, dw, db, out=grab(*live))
        if g_b is None:
            return d
        return ops.layernorm_backward(g_b, x, w, mean, rstd, dw, db, dresidual=d,
                                      out=grab(*live, d))

    def _embedding_backward(self, dx: Tensor, idx_t: Tensor) -> None:
        if dx.dtype != "float32":  # gradients are float32 buffers; embedding wants dout alike
            dx = dx.to(dtype="float32")
        ops.embedding_backward(dx, idx_t, self._grads["wte"], self._grads["wpe"])

    def __repr__(self) -> str:
        c = self.config
        return (f"GPT(n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, "
                f"block_size={c.block_size}, vocab_size={c.vocab_size}, prenorm={c.prenorm}, "
                f"params={self.num_parameters():,}, device={self.device!r}, dtype={self.dtype!r})")


class _Workspace:
    """Activation buffers for one (B, T) shape: what forward writes and backward reads.

    Per block (pre-LN): res, ln1, m1, r1, qkv, att, lse, res_mid, ln2, m2, r2, fc, fc_pre; GPT-1
    keeps x, s1, n1, s2, out instead of res/ln1/res_mid/ln2. One (B, T, C) ``scratch`` carries each
    c_proj output to the fused residual+LayerNorm that consumes it. The logits and the backward
    buffers are allocated when first needed (sampling and evaluation never need the latter).
    """

    def __init__(self, model: "GPT", B: int, T: int):
        cfg, dev, dt = model.config, model.device, model.dtype
        C, H = cfg.n_embd, cfg.n_head
        self.model, self.B, self.T = model, B, T
        self.idx: Optional[Tensor] = None

        def act(*shape):
            return empty([B, T, *shape], dt, dev)

        def stat(*shape):
            return empty([B, *shape], "float32", dev)

        self.x0 = act(C)
        self.scratch = act(C)
        self.losses = empty([B, T], "float32", dev)
        names = (("res", "ln1", "res_mid", "ln2") if cfg.prenorm else ("s1", "n1", "s2", "out"))
        self.layers: List[dict] = []
        for _ in range(cfg.n_layer):
            A = {n: act(C) for n in names}
            A.update(qkv=act(3 * C), att=act(C), fc=act(4 * C), fc_pre=act(4 * C),
                     lse=stat(H, T), m1=stat(T), r1=stat(T), m2=stat(T), r2=stat(T))
            self.layers.append(A)
        self.final = ({"res": act(C), "x": act(C), "m": stat(T), "r": stat(T)}
                      if cfg.prenorm else {})
        self._logits: Optional[Tensor] = None
        self._grad: Optional[List[Tensor]] = None
        self.dfc = self.dqkv = None

    def logits(self) -> Tensor:
        if self._logits is None:
            cfg = self.model.config
            self._logits = empty([self.B, self.T, cfg.padded_vocab_size], self.model.dtype,
                                 self.model.device)
        return self._logits

    def grad_buffers(self):
        """Allocate backward's buffers once; returns grab(*live): a (B, T, C) buffer that is
        none of the live ones (four rotate through every block)."""
        if self._grad is None:
            C = self.model.config.n_embd
            mk = lambda *s: empty([self.B, self.T, *s], self.model.dtype, self.model.device)
            self._grad = [mk(C) for _ in range(4)]
            self.dfc, self.dqkv = mk(4 * C), mk(3 * C)

        def grab(*live):
            taken = {t.data_ptr() for t in live}
            for buf in self._grad:
                if buf.data_ptr() not in taken:
                    return buf
            raise AssertionError("backward needs more than four (B, T, C) buffers")

        return grab
