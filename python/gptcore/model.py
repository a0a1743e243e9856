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

Memory: the ops return fresh output tensors (the op API has no ``out=`` buffers), so each
forward allocates its activations anew; the previous step's are released when the next
forward starts, and backward releases each block's as soon as it has passed it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from . import cuda as _cuda
from . import ops
from .config import GPTConfig
from .tensor import Tensor, _dtype_name, empty, from_numpy, zeros

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
        self._acts: Optional[dict] = None  # what the last forward kept for backward
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
        from .checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu", dtype="float32") -> "GPT":
        """Load a gptcore/transformers GPT-2 or GPT-1 directory, or an llm.c model .bin."""
        from .checkpoint import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype)

    def generate(self, idx, max_new_tokens, **kwargs):
        """KV-cache sampling with GPT-3's completion controls; see gptcore.sample.generate."""
        from .sample import generate

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

    def _lin(self, x, prefix, gelu=False):
        P = self._params
        b = P.get(prefix + ".bias")
        return ops.linear_forward(x, P[prefix + ".weight"], b, gelu=gelu)

    def _run(self, idx_t: Tensor, head: bool = True) -> dict:
        """Forward through the blocks (and the LM head); returns the kept activations."""
        cfg, P = self.config, self._params
        eps, H = cfg.ln_eps, cfg.n_head
        x0 = ops.embedding_forward(idx_t, P["wte"], P["wpe"])
        layers: List[dict] = []
        if cfg.prenorm:
            prev = None
            for i in range(cfg.n_layer):
                h = f"h.{i}"
                A = {}
                if prev is None:  # the residual stream entering block 0 is the embedding
                    A["res"] = x0
                    A["ln1"], A["m1"], A["r1"] = ops.layernorm_forward(
                        x0, P[h + ".ln_1.weight"], self._ln_bias(h + ".ln_1.bias"), eps)
                else:  # residual add of the previous MLP fused with this block's ln_1
                    A["res"], A["ln1"], A["m1"], A["r1"] = ops.residual_layernorm_forward(
                        prev["mlp"], prev["res_mid"], P[h + ".ln_1.weight"],
                        self._ln_bias(h + ".ln_1.bias"), eps)
                A["qkv"], _ = self._lin(A["ln1"], h + ".attn.c_attn")
                A["att"], A["lse"] = ops.attention_forward(A["qkv"], H, cfg.attn_window[i])
                proj, _ = self._lin(A["att"], h + ".attn.c_proj")
                A["res_mid"], A["ln2"], A["m2"], A["r2"] = ops.residual_layernorm_forward(
                    proj, A["res"], P[h + ".ln_2.weight"], self._ln_bias(h + ".ln_2.bias"), eps)
                A["fc"], A["fc_pre"] = self._lin(A["ln2"], h + ".mlp.c_fc", gelu=True)
                A["mlp"], _ = self._lin(A["fc"], h + ".mlp.c_proj")
                layers.append(A)
                prev = A
            res_f, xf, mf, rf = ops.residual_layernorm_forward(
                prev["mlp"], prev["res_mid"], P["ln_f.weight"], self._ln_bias("ln_f.bias"), eps)
            final = {"res": res_f, "x": xf, "m": mf, "r": rf}
        else:  # GPT-1: x = LN(x + attn(x)); x = LN(x + mlp(x)); no final LN
            x = x0
            for i in range(cfg.n_layer):
                h = f"h.{i}"
                A = {"x": x}
                A["qkv"], _ = self._lin(x, h + ".attn.c_attn")
                A["att"], A["lse"] = ops.attention_forward(A["qkv"], H, cfg.attn_window[i])
                proj, _ = self._lin(A["att"], h + ".attn.c_proj")
                A["s1"], A["n1"], A["m1"], A["r1"] = ops.residual_layernorm_forward(
                    proj, x, P[h + ".ln_1.weight"], self._ln_bias(h + ".ln_1.bias"), eps)
                A["fc"], A["fc_pre"] = self._lin(A["n1"], h + ".mlp.c_fc", gelu=True)
                mlp, _ = self._lin(A["fc"], h + ".mlp.c_proj")
                A["s2"], x, A["m2"], A["r2"] = ops.residual_layernorm_forward(
                    mlp, A["n1"], P[h + ".ln_2.weight"], self._ln_bias(h + ".ln_2.bias"), eps)
                layers.append(A)
            final = {"x": x}
        acts = {"idx": idx_t, "layers": layers, "final": final}
        if head:  # tied LM head: logits (B, T, Vp) = x @ wte^T
            acts["logits"], _ = ops.linear_forward(final["x"], P["wte"], None)
        return acts

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
            return self._logits_numpy(self._run(idx_t)["logits"])
        if not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale):
            raise ValueError(f"loss_scale: expected a finite number, got {loss_scale!r}")
        tgt, n_valid = self._prepare_targets(targets, tuple(idx_t.shape))
        self._acts = None  # drop the previous step's buffers before allocating new ones
        acts = self._run(idx_t)
        V = self.config.vocab_size
        if grad:
            scale = float(loss_scale) / n_valid if n_valid else 0.0
            losses, _ = ops.cross_entropy_forward_backward(acts["logits"], tgt, V, -1,
                                                           grad_scale=scale, inplace=True)
            acts["dlogits"] = acts.pop("logits")  # the buffer now holds the gradient
            self._acts = acts
        else:
            losses = ops.cross_entropy_forward(acts["logits"], tgt, V, -1)
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
            return self._logits_numpy(self._run(idx_t)["logits"])
        x = self._run(idx_t, head=False)["final"]["x"]
        B, T, C = x.shape
        if B == 1:  # the last row of a (T, C) view, on the device
            last = x.view([T, C]).narrow(T - 1, 1)
        else:  # (B, C): one row per sequence, gathered through the host
            last = _upload(np.ascontiguousarray(np.asarray(x.numpy())[:, -1, :]), self.device, self.dtype)
        out, _ = ops.linear_forward(last, self._params["wte"], None)
        return np.ascontiguousarray(np.asarray(out.numpy())[:, : self.config.vocab_size])

    def _logits_numpy(self, logits: Tensor) -> np.ndarray:
        arr = np.asarray(logits.numpy())
        return np.ascontiguousarray(arr[..., : self.config.vocab_size])

    def loss(self, idx, targets) -> float:
        """Mean cross-entropy without keeping anything for backward (for evaluation)."""
        return self.forward(idx, targets, grad=False)

    # ---- backward -----------------------------------------------------------------------

    def backward(self) -> None:
        """Accumulate the gradients of the last ``forward(idx, targets)`` into ``grads()``."""
        acts = self._acts
        if acts is None:
            raise RuntimeError("backward: call forward(idx, targets) first (and only once per forward)")
        self._acts = None
        cfg, P, G = self.config, self._params, self._grads
        H = cfg.n_head
        layers, final = acts["layers"], acts["final"]
        # tied LM head: its weight gradient lands in dwte together with the embedding's
        dx = ops.linear_backward(acts.pop("dlogits"), final["x"], P["wte"], G["wte"], None)

        def lin_back(dout, x, prefix, pre=None):
            return ops.linear_backward(dout, x, P[prefix + ".weight"], G[prefix + ".weight"],
                                       G.get(prefix + ".bias"), pre=pre)

        if cfg.prenorm:
            dres = ops.residual_layernorm_backward(dx, None, final["res"], P["ln_f.weight"],
                                                   final["m"], final["r"], G["ln_f.weight"],
                                                   self._dln_bias("ln_f.bias"))
            for i in reversed(range(cfg.n_layer)):
                h, A = f"h.{i}", layers[i]
                layers[i] = None  # free this block's activations as soon as we are done
                dfc = lin_back(dres, A["fc"], h + ".mlp.c_proj")
                dln2 = lin_back(dfc, A["ln2"], h + ".mlp.c_fc", pre=A["fc_pre"])
                dres_mid = ops.residual_layernorm_backward(
                    dln2, dres, A["res_mid"], P[h + ".ln_2.weight"], A["m2"], A["r2"],
                    G[h + ".ln_2.weight"], self._dln_bias(h + ".ln_2.bias"))
                datt = lin_back(dres_mid, A["att"], h + ".attn.c_proj")
                dqkv = ops.attention_backward(datt, A["qkv"], A["att"], A["lse"], H,
                                              cfg.attn_window[i])
                dln1 = lin_back(dqkv, A["ln1"], h + ".attn.c_attn")
                dres = ops.layernorm_backward(dln1, A["res"], P[h + ".ln_1.weight"], A["m1"],
                                              A["r1"], G[h + ".ln_1.weight"],
                                              self._dln_bias(h + ".ln_1.bias"), dresidual=dres_mid)
            self._embedding_backward(dres, acts["idx"])
        else:
            # The gradient reaching a block's output arrives as two parts (g_a + g_b): there is
            # no add op, and LayerNorm's backward is linear in dout, so LN'(g_a + g_b) is one
            # call for g_a and a second that adds LN'(g_b) via dresidual.
            g_a, g_b = dx, None
            for i in reversed(range(cfg.n_layer)):
                h, A = f"h.{i}", layers[i]
                layers[i] = None
                ds2 = self._ln_back_sum(g_a, g_b, A["s2"], h + ".ln_2", A["m2"], A["r2"])
                dfc = lin_back(ds2, A["fc"], h + ".mlp.c_proj")
                dn1 = lin_back(dfc, A["n1"], h + ".mlp.c_fc", pre=A["fc_pre"])
                # n1 fed both c_fc and the residual of s2
                ds1 = self._ln_back_sum(ds2, dn1, A["s1"], h + ".ln_1", A["m1"], A["r1"])
                datt = lin_back(ds1, A["att"], h + ".attn.c_proj")
                dqkv = ops.attention_backward(datt, A["qkv"], A["att"], A["lse"], H,
                                              cfg.attn_window[i])
                dx_in = lin_back(dqkv, A["x"], h + ".attn.c_attn")
                g_a, g_b = ds1, dx_in  # x fed both c_attn and the residual of s1
            self._embedding_backward(g_a, acts["idx"])
            self._embedding_backward(g_b, acts["idx"])

    def _ln_back_sum(self, g_a, g_b, x, prefix, mean, rstd):
        """LN backward for dout = g_a + g_b (g_b may be None), accumulating dweight/dbias."""
        P, G = self._params, self._grads
        w, dw, db = P[prefix + ".weight"], G[prefix + ".weight"], self._dln_bias(prefix + ".bias")
        d = ops.layernorm_backward(g_a, x, w, mean, rstd, dw, db)
        if g_b is None:
            return d
        return ops.layernorm_backward(g_b, x, w, mean, rstd, dw, db, dresidual=d)

    def _embedding_backward(self, dx: Tensor, idx_t: Tensor) -> None:
        if dx.dtype != "float32":  # gradients are float32 buffers; embedding wants dout alike
            dx = dx.to(dtype="float32")
        ops.embedding_backward(dx, idx_t, self._grads["wte"], self._grads["wpe"])

    def __repr__(self) -> str:
        c = self.config
        return (f"GPT(n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, "
                f"block_size={c.block_size}, vocab_size={c.vocab_size}, prenorm={c.prenorm}, "
                f"params={self.num_parameters():,}, device={self.device!r}, dtype={self.dtype!r})")
