"""GPT: a decoder-only transformer assembled from gptcore.ops, forward and backward by hand.

There is no autograd. ``forward`` runs the ops in order and keeps what each backward needs;
``backward`` walks the same ops in reverse, llm.c style. The layout (pre-LN GPT-2/3):

    x = wte[idx] + wpe                                    embedding_forward
    for each block:
        ln1 = LN(x)            (fused with the residual add of the previous block's MLP)
        qkv = ln1 @ c_attn;  att = attention(qkv);  x = x + att @ c_proj
        ln2 = LN(x)            (fused with that residual add: residual_layernorm_forward)
        x = x + gelu(ln2 @ c_fc) @ c_proj                (GELU fused into the c_fc GEMM)
    h = LN_f(x)                                           the trunk's output: hidden states
    logits = h @ wte^T                                    (tied LM head, padded vocabulary)
    loss, dlogits = cross_entropy(logits)                 (fused, dlogits overwrite logits)

GPT-1 (``prenorm=False``) normalises after each residual add instead and has no final LN.

Trunk and heads. The blocks are written once (:meth:`GPT._trunk_forward`) and serve a full
sequence (training, scoring: every layer's activations kept for backward) and cached decoding
(a :class:`gptcore.models.kvcache.KVCache` passed in: keys and values appended to the cache,
one set of buffers shared by all layers, positions possibly held on the device). The trunk ends
at the final hidden states; :meth:`GPT.backward` starts from a gradient on them (``dh``), from the
LM head's fused cross-entropy, or both, so task heads (:mod:`gptcore.models.heads`) and combined
losses are built outside the trunk.

Dropout (``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop``) runs in training mode only
(:meth:`GPT.train` / :meth:`GPT.eval`). Masks come from a counter-based generator keyed by
(seed, step, layer, site, element) (see :func:`gptcore.ops.dropout_forward`), so backward
regenerates them instead of storing them. Every forward mask is fused into a kernel that already
touches the data: embedding dropout into ``embedding_forward``, residual dropout on each
sub-block's output into the ``residual_layernorm_forward`` that adds it to the stream, and
attention-probability dropout into the attention kernels; backward applies the regenerated masks
with ``dropout_backward`` (and inside attention's backward). With every probability 0 (or in
eval mode) the dropout-free kernels run.

Parameters live on ``device`` in ``dtype`` (float32, or bfloat16 on CUDA). Their gradients are
always float32 (the ops accumulate parameter gradients in float32 on CUDA), so an optimiser can
keep float32 master weights next to bfloat16 parameters.

Memory: activations live in a workspace allocated once per (batch, sequence) shape and reused
by every step (the ops write into it through ``out=``), llm.c style. Backward needs only a few
activation-gradient buffers of its own, shared by all blocks. The two most recently used shapes
keep their workspaces (a training shape and an evaluation shape); others are released.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Dict, List, Optional

import numpy as np

from .. import cuda as _cuda
from .. import ops
from ..tensor import Tensor, _dtype_name, empty, float_input, from_numpy, upload, zeros
from . import schema
from .config import GPTConfig

__all__ = ["GPT", "training_memory"]


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


def _exclusive(method):
    """Runs a method that reads or writes the model's shared state (workspaces, parameters,
    gradients) under the model's lock: calls from several threads take turns instead of
    overwriting each other's activations."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


# Dropout sites inside one forward. The generator's stream for a site is
# (step << 12) | (layer * 4 + site), with the embedding as layer n_layer (so up to 1023 layers).
_SITE_ATTN, _SITE_RESID_ATTN, _SITE_RESID_MLP = 0, 1, 2
_STREAM_LAYER_BITS = 12


class GPT:
    """A GPT-1/2/3 model on gptcore kernels.

    >>> cfg = GPTConfig.preset("tiny")
    >>> model = GPT(cfg, seed=0)
    >>> loss = model.forward(x, y); model.backward()    # x, y (B, T) integer arrays

    ``parameters()`` and ``grads()`` return name -> Tensor dicts with GPT-2-style names
    (``wte``, ``wpe``, ``h.0.ln_1.weight``, ``h.0.attn.c_attn.weight``, ... ``ln_f.bias``; the
    list is :func:`gptcore.models.schema.parameters`) followed by the parameters of any head added
    with :meth:`add_head`. Linear weights are stored (out_features, in_features). ``wte`` holds
    ``config.padded_vocab_size`` rows whose padding rows are zero and stay zero (they get no
    gradient); ``state_dict()`` gives the unpadded (vocab_size, C) view users expect.

    A new model is in training mode (dropout active when the config asks for it); models
    loaded with :meth:`from_pretrained` start in evaluation mode, as transformers' do.

    Threads: the methods that use the shared activation workspaces, parameters or gradients
    (forward, logits, hidden_states, backward, load_state_dict, zero_grad) take turns on a
    per-model lock, so concurrent ``model(idx)`` calls each get their own right answer. A
    pending backward belongs to the latest forward (whichever thread ran it): a thread that
    trains should hold its own lock across forward and backward. Decoders (generation) have
    their own buffers and only read the parameters.
    """

    def __init__(self, config: GPTConfig, device: str = "cpu", dtype="float32", seed: int = 0,
                 init: bool = True):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        if config.n_layer * 4 + 3 >= 1 << _STREAM_LAYER_BITS:  # dropout streams (see above)
            most = ((1 << _STREAM_LAYER_BITS) - 4) // 4
            raise ValueError(f"config.n_layer: {config.n_layer} layers exceed the {most} that "
                             "dropout's generator streams address")
        self.config = config
        self._lock = threading.RLock()  # see _exclusive
        self.device = _check_device(device)
        self.dtype = _check_dtype(dtype, self.device)
        self.seed = int(seed)
        self.training = True
        # Forward passes run with dropout so far; keys the next one's masks (saved by trainers so
        # a resumed run draws the same masks).
        self.dropout_step = 0
        self._params: Dict[str, Tensor] = {}
        self._grads: Dict[str, Tensor] = {}
        self.heads: Dict[str, "object"] = {}
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

    def _init_params(self, rng: Optional[np.random.Generator]) -> None:
        cfg = self.config
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for p in schema.parameters(cfg):
            shape = (cfg.padded_vocab_size, cfg.n_embd) if p.name == "wte" else p.shape
            if p.init == "ones":
                arr = np.ones(shape, np.float32)
            elif p.init == "zeros" or rng is None:
                arr = np.zeros(shape, np.float32)
            else:
                std = 0.02 if p.init == "normal" else resid_std
                arr = rng.standard_normal(shape, dtype=np.float32)
                arr *= np.float32(std)
            if p.name == "wte":
                arr[cfg.vocab_size:] = 0.0  # padding rows: never indexed, never a real logit
            self._params[p.name] = upload(arr, self.device, self.dtype)
            self._grads[p.name] = zeros(list(shape), "float32", self.device)

    def add_head(self, head) -> None:
        """Attach a task head (:mod:`gptcore.models.heads`): its parameters then appear in
        :meth:`parameters` / :meth:`grads` under ``head.name + '.'`` (so an optimiser built
        afterwards trains them) and in checkpoints. The head must live on the model's device."""
        name = getattr(head, "name", None)
        if not isinstance(name, str) or not hasattr(head, "parameters") or not hasattr(head, "grads"):
            raise TypeError(f"head: expected a gptcore head (name, parameters(), grads()), "
                            f"got {type(head).__name__}")
        if name in self.heads or any(k.startswith(name + ".") for k in self._params):
            raise ValueError(f"head: the name {name!r} is already taken")
        if getattr(head, "device", self.device) != self.device:
            raise ValueError(f"head: lives on {head.device!r}, the model on {self.device!r}")
        self.heads[name] = head

    # ---- checkpoints and generation (gptcore.io and gptcore.generate) ---------------------

    def save_pretrained(self, path, **kwargs) -> None:
        """Save in transformers' GPT-2 (or GPT-1) layout; see gptcore.io.save_pretrained."""
        from ..io.pretrained import save_pretrained

        save_pretrained(self, path, **kwargs)

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu", dtype="float32") -> "GPT":
        """Load a gptcore/transformers GPT-2 or GPT-1 directory, or an llm.c model .bin (in
        evaluation mode; call ``train()`` to fine-tune with the checkpoint's dropout)."""
        from ..io.pretrained import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype)

    def generate(self, idx, max_new_tokens, **kwargs):
        """KV-cache sampling with GPT-3's completion controls; see gptcore.generate.generate."""
        from ..generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    def parameters(self) -> Dict[str, Tensor]:
        """name -> parameter Tensor (the live storage; wte includes the padding rows)."""
        out = dict(self._params)
        for name, head in self.heads.items():
            out.update((f"{name}.{k}", v) for k, v in head.parameters().items())
        return out

    def grads(self) -> Dict[str, Tensor]:
        """name -> float32 gradient Tensor, accumulated by backward() until zero_grad()."""
        out = dict(self._grads)
        for name, head in self.heads.items():
            out.update((f"{name}.{k}", v) for k, v in head.grads().items())
        return out

    def num_parameters(self) -> int:
        """Parameter count without the vocabulary padding (as the papers count), heads excluded."""
        return self.config.num_parameters()

    @_exclusive
    def zero_grad(self) -> None:
        for g in self.grads().values():
            g.zero_()

    def train(self, mode: bool = True) -> "GPT":
        """Training mode: dropout as the config says (and in attached heads). Returns the model."""
        self.training = bool(mode)
        for head in self.heads.values():
            if hasattr(head, "train"):
                head.train(self.training)
        return self

    def eval(self) -> "GPT":
        """Evaluation mode: no dropout. Returns the model."""
        return self.train(False)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """name -> float32 NumPy copy of every parameter, wte unpadded (vocab_size, C)."""
        out = {}
        for name, p in self.parameters().items():
            arr = np.array(p.numpy(), dtype=np.float32, copy=True)
            if name == "wte":
                arr = np.ascontiguousarray(arr[: self.config.vocab_size])
            out[name] = arr
        return out

    @_exclusive
    def load_state_dict(self, state: Dict[str, np.ndarray], strict: bool = True) -> None:
        """Copy parameters in from NumPy arrays (or anything np.asarray takes).

        ``wte`` may be (vocab_size, C) or padded (padded_vocab_size, C); padding rows become 0.
        With ``strict`` every parameter must be present and nothing else.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict of arrays, got {type(state).__name__}")
        params = self.parameters()
        if strict:
            missing = sorted(set(params) - set(state))
            extra = sorted(set(state) - set(params))
            if missing or extra:
                raise ValueError(f"state: missing {missing or 'nothing'}; unexpected {extra or 'nothing'}")
        V = self.config.vocab_size
        staged = {}
        for name, value in state.items():
            if name not in params:
                continue
            arr = np.asarray(value)
            if not np.issubdtype(arr.dtype, np.floating):
                raise TypeError(f"state[{name!r}]: expected floating-point values, got {arr.dtype}")
            want = tuple(params[name].shape)
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
            params[name].copy_(upload(arr, self.device, self.dtype))

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

    def check_ids(self, idx, name: str = "idx", max_len: Optional[int] = None) -> np.ndarray:
        """(B, T) host token ids, validated against the vocabulary and ``max_len`` (default the
        block size), as int32."""
        arr = self._ids_to_numpy(idx, name)
        cfg = self.config
        T = arr.shape[1]
        limit = cfg.block_size if max_len is None else max_len
        if T > limit:
            raise ValueError(f"{name}: sequence length {T} exceeds "
                             f"{'block_size' if max_len is None else 'the room left'} {limit}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        return arr.astype(np.int32, copy=False)

    def _prepare_idx(self, idx) -> Tensor:
        return self._to_device_ids(self.check_ids(idx))

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

    # ---- the trunk: one forward for full sequences and cached decoding ---------------------

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

    def _dropout_on(self) -> bool:
        c = self.config
        return self.training and (c.embd_pdrop > 0 or c.attn_pdrop > 0 or c.resid_pdrop > 0)

    def _dropout_kw(self, step: Optional[int], p: float, layer: int, site: int) -> dict:
        """The dropout keywords of one site of the forward run at dropout ``step`` (none when
        that forward had no dropout or the site's probability is 0)."""
        if step is None or p == 0:
            return {}
        return dict(dropout_p=p, seed=self.seed,
                    stream=(step << _STREAM_LAYER_BITS) | (layer * 4 + site))

    def _trunk_forward(self, idx_t: Tensor, ws: "_Workspace", cache=None, pos=None,
                       final_ln: bool = True) -> Tensor:
        """The blocks, written once. Runs (B, T) ids through the model into ``ws`` and returns
        the final hidden states (B, T, C).

        Full sequence (``cache`` None): causal attention over the T positions, every layer's
        activations in its own buffers of ``ws`` for backward; dropout when ``ws.drop_step`` is
        set. Cached decoding (``cache`` a KVCache): the T new positions start at ``pos`` (an int,
        or a 1-element int32 device tensor read by the kernels, for CUDA graphs, or a (B,) one:
        row b's positions start at pos[b], for rows decoded at different positions), attention
        reads and extends the cache, all layers share one set of buffers, never dropout.
        ``final_ln`` False skips the last LayerNorm (a prefill that feeds no head)."""
        cfg, P = self.config, self._params
        eps, H = cfg.ln_eps, cfg.n_head
        step = ws.drop_step  # None: no dropout in this pass
        # embedding dropout, fused into the embedding kernel
        x0 = ops.embedding_forward(idx_t, P["wte"], P["wpe"], pos=pos, out=ws.x0,
                                   **self._dropout_kw(step, cfg.embd_pdrop, cfg.n_layer, 0))
        # Each sub-block's output, consumed (through its residual dropout) by the next residual add.
        scratch = ws.scratch

        def lin(x, prefix, out, gelu=False):
            return ops.linear_forward(x, P[prefix + ".weight"], P.get(prefix + ".bias"),
                                      gelu=gelu, out=out)

        def attend(A, i, x_in):  # attention sub-block: its output lands in scratch
            h = f"h.{i}.attn"
            lin(x_in, h + ".c_attn", A["qkv"])
            if cache is None:
                ops.attention_forward(A["qkv"], H, cfg.attn_window[i], out=(A["att"], A["lse"]),
                                      **self._dropout_kw(step, cfg.attn_pdrop, i, _SITE_ATTN))
            else:
                ops.attention_kvcache(A["qkv"], cache.k[i], cache.v[i], pos, H, cfg.attn_window[i],
                                      out=A["att"])
            lin(A["att"], h + ".c_proj", scratch)

        def mlp(A, i, x_in):  # MLP sub-block: its output lands in scratch
            h = f"h.{i}.mlp"
            lin(x_in, h + ".c_fc", (A["fc"], A["fc_pre"]), gelu=True)
            lin(A["fc"], h + ".c_proj", scratch)

        def res_ln(x, residual, prefix, A, names, drop):
            """sum = dropout(x) + residual; out = LN(sum). x is a sub-block output (scratch) and
            drop = (layer, site) names its residual-dropout stream."""
            ops.residual_layernorm_forward(x, residual, P[prefix + ".weight"],
                                           self._ln_bias(prefix + ".bias"), eps,
                                           out=tuple([A[n] for n in names]),
                                           **self._dropout_kw(step, cfg.resid_pdrop, *drop))

        F = ws.final
        if cfg.prenorm:  # GPT-2/3: each residual add fused with the next LayerNorm
            for i in range(cfg.n_layer):
                A, h = ws.layer(i), f"h.{i}"
                if i == 0:  # the residual stream entering block 0 is the embedding
                    ops.layernorm_forward(x0, P[h + ".ln_1.weight"], self._ln_bias(h + ".ln_1.bias"),
                                          eps, out=(A["ln1"], A["m1"], A["r1"]))
                else:  # the previous layer's MLP output joins the stream here
                    res_ln(scratch, ws.layer(i - 1)["res_mid"], h + ".ln_1", A,
                           ("res", "ln1", "m1", "r1"), (i - 1, _SITE_RESID_MLP))
                attend(A, i, A["ln1"])
                res_ln(scratch, x0 if i == 0 else A["res"], h + ".ln_2", A,
                       ("res_mid", "ln2", "m2", "r2"), (i, _SITE_RESID_ATTN))
                mlp(A, i, A["ln2"])
            if not final_ln:
                return None
            L = cfg.n_layer - 1  # the last MLP output joins the stream at ln_f
            res_ln(scratch, ws.layer(L)["res_mid"], "ln_f", F, ("res", "x", "m", "r"),
                   (L, _SITE_RESID_MLP))
            return F["x"]
        # GPT-1: x = LN(x + attn(x)); x = LN(x + mlp(x)); no final LN
        x = x0
        for i in range(cfg.n_layer):
            A, h = ws.layer(i), f"h.{i}"
            attend(A, i, x)
            res_ln(scratch, x, h + ".ln_1", A, ("s1", "n1", "m1", "r1"), (i, _SITE_RESID_ATTN))
            mlp(A, i, A["n1"])
            res_ln(scratch, A["n1"], h + ".ln_2", A, ("s2", "out", "m2", "r2"), (i, _SITE_RESID_MLP))
            x = A["out"]
        F["x"] = x
        return x

    def _run(self, idx_t: Tensor, head: bool = True) -> "_Workspace":
        """A full-sequence forward into the (B, T) workspace (with the LM head's logits)."""
        self._acts = None  # the workspace is about to be overwritten: no pending backward
        ws = self._workspace(*idx_t.shape)
        ws.idx = idx_t
        ws.drop_step = None
        if self._dropout_on():
            ws.drop_step = self.dropout_step
            self.dropout_step += 1
        ws.lm_pending = False
        h = self._trunk_forward(idx_t, ws)
        if head:  # tied LM head: logits (B, T, Vp) = h @ wte^T
            ops.linear_forward(h, self._params["wte"], None, out=ws.logits())
        return ws

    @_exclusive
    def hidden_states(self, idx) -> Tensor:
        """The final hidden states (B, T, C) of (B, T) ids: the trunk's output, what every head
        reads (after GPT-2's final LayerNorm; GPT-1's last block output).

        Returns the workspace's buffer itself (valid until the next forward; copy with
        ``np.array(h)`` to keep it) and keeps what :meth:`backward` needs, so a head's gradient
        can be sent back with ``backward(dh=...)``. Dropout applies in training mode."""
        ws = self._run(self._prepare_idx(idx), head=False)
        self._acts = ws
        return ws.final["x"]

    @_exclusive
    def forward(self, idx, targets=None, *, loss_scale: float = 1.0, grad: bool = True):
        """Run the model with its LM head.

        Without ``targets``: returns the logits as a float32 NumPy array (B, T, vocab_size).
        With ``targets`` (B, T) (negative entries ignored): returns the mean cross-entropy over
        the non-ignored positions as a Python float and, when ``grad`` is True, keeps what
        :meth:`backward` needs. The logits' gradient is computed in the same fused pass; it is
        the gradient of ``loss_scale * mean_loss`` (use ``1 / grad_accum`` when accumulating
        micro-batches, or the LM weight of a combined loss). The final hidden states stay
        readable through :attr:`last_hidden_states` for heads that share this forward.
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
            ws.lm_pending = True
            self._acts = ws
        else:
            losses = ops.cross_entropy_forward(ws.logits(), tgt, V, -1, out=ws.losses)
        if n_valid == 0:
            return float("nan")
        return float(np.asarray(losses.numpy(), dtype=np.float64).sum() / n_valid)

    @property
    def last_hidden_states(self) -> Tensor:
        """The final hidden states of the forward whose backward is pending (see forward())."""
        if self._acts is None:
            raise RuntimeError("last_hidden_states: no forward is pending a backward")
        return self._acts.final["x"]

    def __call__(self, idx) -> np.ndarray:
        """``model(idx)``: float32 NumPy logits (B, T, vocab_size) for (B, T) token ids."""
        return self.logits(idx)

    @_exclusive
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
            last = upload(np.ascontiguousarray(np.asarray(x.numpy())[:, -1, :]), self.device, self.dtype)
        out, _ = ops.linear_forward(last, self._params["wte"], None)
        return self._logits_numpy(out)

    def _logits_numpy(self, logits: Tensor) -> np.ndarray:
        arr = np.asarray(logits.numpy())  # may view the workspace: always copy out
        return np.array(arr[..., : self.config.vocab_size], dtype=np.float32, order="C", copy=True)

    def loss(self, idx, targets) -> float:
        """Mean cross-entropy without keeping anything for backward (for evaluation)."""
        return self.forward(idx, targets, grad=False)

    # ---- backward -----------------------------------------------------------------------

    @_exclusive
    def backward(self, dh=None) -> None:
        """Accumulate parameter gradients into ``grads()`` from the pending forward.

        After ``forward(idx, targets)`` the LM head's gradient is sent back; ``dh`` (B, T, C),
        a gradient on the final hidden states from other heads (NumPy array or Tensor), is
        added to it. After ``hidden_states(idx)`` ``dh`` is required and is all there is.
        """
        ws = self._acts
        if ws is None:
            raise RuntimeError("backward: call forward(idx, targets) or hidden_states(idx) first "
                               "(and only once per forward, with no other forward or logits call "
                               "in between)")
        if dh is None and not ws.lm_pending:
            raise ValueError("dh: hidden_states() has no loss of its own; pass the gradient of "
                             "your loss with respect to the hidden states")
        grab = ws.grad_buffers()
        if ws.lm_pending:  # tied LM head: its weight gradient lands in dwte with the embedding's
            g = ops.linear_backward(ws.logits(), ws.final["x"], weight=self._params["wte"],
                                    dweight=self._grads["wte"], out=grab())
            if dh is not None:
                _add_into(g, self._check_dh(dh, ws))
        else:
            g = grab()
            g.copy_(self._check_dh(dh, ws))
        self._acts = None
        self._trunk_backward(ws, g, grab)

    def backward_hidden(self, dh) -> None:
        """Back-propagate a gradient ``dh`` (B, T, C) on the final hidden states (see
        :meth:`hidden_states`); the same as ``backward(dh=dh)``."""
        if dh is None:
            raise ValueError("dh: expected a (B, T, C) gradient, got None")
        self.backward(dh=dh)

    def _check_dh(self, dh, ws) -> Tensor:
        want = (ws.B, ws.T, self.config.n_embd)
        t = float_input(dh, "dh", self.device, self.dtype)
        if tuple(t.shape) != want:
            raise ValueError(f"dh: expected shape {want} (like the hidden states), got {tuple(t.shape)}")
        return t

    def _trunk_backward(self, ws: "_Workspace", dh: Tensor, grab) -> None:
        """Backward through the blocks from ``dh`` (a grab() buffer holding the gradient on the
        final hidden states) to the embeddings, in reverse order of :meth:`_trunk_forward`."""
        cfg, P, G = self.config, self._params, self._grads
        H = cfg.n_head
        dfc, dqkv = ws.dfc, ws.dqkv
        step = ws.drop_step

        def lin_back(dout, x, prefix, out, pre=None):
            return ops.linear_backward(dout, x, pre=pre, weight=P[prefix + ".weight"],
                                       dweight=G[prefix + ".weight"], dbias=G.get(prefix + ".bias"),
                                       out=out)

        def ln_back(dout, x, prefix, mean, rstd, out, dresidual=None):
            return ops.layernorm_backward(dout, x, mean=mean, rstd=rstd, dresidual=dresidual,
                                          weight=P[prefix + ".weight"], dweight=G[prefix + ".weight"],
                                          dbias=self._dln_bias(prefix + ".bias"), out=out)

        def drop_back(g, p, layer, site, *live):  # g through one site's mask (regenerated)
            kw = self._dropout_kw(step, p, layer, site)  # live: buffers still to be read
            if not kw:
                return g
            return ops.dropout_backward(g, p, kw["seed"], kw["stream"], out=grab(g, *live))

        def resid_drop_back(g, i, site, *live):  # gradient into a sub-block's (dropped) output
            return drop_back(g, cfg.resid_pdrop, i, site, *live)

        def attn_back(datt, A, i):
            ops.attention_backward(datt, A["qkv"], A["att"], A["lse"], H, cfg.attn_window[i],
                                   dqkv=dqkv, **self._dropout_kw(step, cfg.attn_pdrop, i, _SITE_ATTN))

        def embedding_back(g, *live):
            g = drop_back(g, cfg.embd_pdrop, cfg.n_layer, 0, *live)
            if g.dtype != "float32":  # gradients are float32 buffers; embedding wants dout alike
                g = g.to(dtype="float32")
            ops.embedding_backward(g, ws.idx, G["wte"], G["wpe"])

        if cfg.prenorm:
            F = ws.final
            dres = ln_back(dh, F["res"], "ln_f", F["m"], F["r"], out=grab(dh))
            for i in reversed(range(cfg.n_layer)):
                h, A = f"h.{i}", ws.layer(i)
                lin_back(resid_drop_back(dres, i, _SITE_RESID_MLP), A["fc"], h + ".mlp.c_proj", dfc)
                dln2 = lin_back(dfc, A["ln2"], h + ".mlp.c_fc", grab(dres), pre=A["fc_pre"])
                res_in = ws.x0 if i == 0 else A["res"]
                dres_mid = ln_back(dln2, A["res_mid"], h + ".ln_2", A["m2"], A["r2"],
                                   out=grab(dres, dln2), dresidual=dres)
                dproj = resid_drop_back(dres_mid, i, _SITE_RESID_ATTN)  # its own buffer with dropout
                datt = lin_back(dproj, A["att"], h + ".attn.c_proj", grab(dres_mid, dproj))
                attn_back(datt, A, i)
                dln1 = lin_back(dqkv, A["ln1"], h + ".attn.c_attn", grab(dres_mid))
                dres = ln_back(dln1, res_in, h + ".ln_1", A["m1"], A["r1"],
                               out=grab(dres_mid, dln1), dresidual=dres_mid)
            embedding_back(dres)
            return
        # GPT-1. The gradient reaching a block's output arrives as two parts (g_a + g_b): there
        # is no add op, and LayerNorm's backward is linear in dout, so LN'(g_a + g_b) is one call
        # for g_a and a second that adds LN'(g_b) via dresidual.
        g_a, g_b = dh, None
        for i in reversed(range(cfg.n_layer)):
            h, A = f"h.{i}", ws.layer(i)
            x_in = ws.x0 if i == 0 else ws.layer(i - 1)["out"]
            ds2 = self._ln_back_sum(g_a, g_b, A["s2"], h + ".ln_2", A["m2"], A["r2"], grab)
            lin_back(resid_drop_back(ds2, i, _SITE_RESID_MLP), A["fc"], h + ".mlp.c_proj", dfc)
            dn1 = lin_back(dfc, A["n1"], h + ".mlp.c_fc", grab(ds2), pre=A["fc_pre"])
            # n1 fed both c_fc and the residual of s2
            ds1 = self._ln_back_sum(ds2, dn1, A["s1"], h + ".ln_1", A["m1"], A["r1"], grab)
            dproj = resid_drop_back(ds1, i, _SITE_RESID_ATTN)  # its own buffer with dropout
            datt = lin_back(dproj, A["att"], h + ".attn.c_proj", grab(ds1, dproj))
            attn_back(datt, A, i)
            dx_in = lin_back(dqkv, x_in, h + ".attn.c_attn", grab(ds1))
            g_a, g_b = ds1, dx_in  # x fed both c_attn and the residual of s1
        embedding_back(g_a, g_b)
        embedding_back(g_b)

    def _ln_back_sum(self, g_a, g_b, x, prefix, mean, rstd, grab):
        """LN backward for dout = g_a + g_b (g_b may be None), accumulating dweight/dbias."""
        P, G = self._params, self._grads
        w, dw, db = P[prefix + ".weight"], G[prefix + ".weight"], self._dln_bias(prefix + ".bias")
        live = (g_a,) if g_b is None else (g_a, g_b)
        d = ops.layernorm_backward(g_a, x, mean=mean, rstd=rstd, weight=w, dweight=dw, dbias=db,
                                   out=grab(*live))
        if g_b is None:
            return d
        return ops.layernorm_backward(g_b, x, mean=mean, rstd=rstd, dresidual=d, weight=w,
                                      dweight=dw, dbias=db, out=grab(*live, d))

    @_exclusive
    def find_non_finite(self) -> Optional[str]:
        """Where the first NaN or inf is, in the order a training step makes them: a parameter,
        else an activation of the last forward (embedding, then each block's buffers in the
        order the block writes them, then the logits), else a parameter gradient; None when all
        are finite. For the message of a training run that diverged; it reads every buffer."""
        def bad(t: Optional[Tensor]) -> bool:
            return t is not None and not np.isfinite(np.asarray(t.numpy(), np.float32)).all()

        for name, p in self.parameters().items():
            if bad(p):
                return f"parameter {name!r}"
        ws = self._acts
        if ws is not None:
            order = (("ln1", "qkv", "att", "res_mid", "ln2", "fc_pre", "fc") if self.config.prenorm
                     else ("qkv", "att", "s1", "n1", "fc_pre", "fc", "s2", "out"))
            if bad(ws.x0):
                return "the embedding output (wte[idx] + wpe)"
            for i in range(self.config.n_layer):
                for name in order:
                    if bad(ws.layer(i)[name]):
                        return f"block {i}'s activation {name!r} in the forward pass"
            if ws.final and bad(ws.final["x"]):
                return "the final LayerNorm's output"
            if ws._logits is not None and not ws.lm_pending and bad(ws._logits):
                return "the logits"
        for name, g in self.grads().items():
            if bad(g):
                return f"the gradient of {name!r}"
        return None

    def __repr__(self) -> str:
        c = self.config
        heads = f", heads={list(self.heads)}" if self.heads else ""
        return (f"GPT(n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, "
                f"block_size={c.block_size}, vocab_size={c.vocab_size}, prenorm={c.prenorm}, "
                f"params={self.num_parameters():,}, device={self.device!r}, dtype={self.dtype!r}"
                f"{heads})")


def _add_into(dst: Tensor, src: Tensor) -> None:
    """dst += src for two same-shape tensors on one device. On the CPU both are float32 host
    memory and NumPy adds in place; on CUDA it goes through the host (no add op yet)."""
    if dst.device == "cpu":
        d = np.asarray(dst.numpy())
        d += np.asarray(src.numpy())
        return
    total = np.asarray(dst.numpy(), np.float32) + np.asarray(src.numpy(), np.float32)
    dst.copy_(upload(total, dst.device, dst.dtype))


def training_memory(config: GPTConfig, batch_size: int, seq_len: int, dtype: str = "float32",
                    master_weights: Optional[bool] = None) -> Dict[str, int]:
    """Bytes a training step of :class:`GPT` with AdamW holds, from the buffers it allocates:
    ``params`` (in ``dtype``), ``grads`` (float32), ``optimizer`` (AdamW's m and v, plus float32
    master weights for bfloat16 parameters), ``activations`` (the (batch, seq_len) workspace,
    logits and backward buffers) and their ``total``. An estimate to refuse a run that cannot
    fit before allocating anything (it leaves out allocator overhead and the data)."""
    cfg, B, T = config, int(batch_size), int(seq_len)
    s = 2 if _dtype_name(dtype) == "bfloat16" else 4
    n = cfg.num_parameters(padded=True)
    master = (s == 2) if master_weights is None else master_weights
    C, H, L = cfg.n_embd, cfg.n_head, cfg.n_layer
    # per block: four (B,T,C) streams, qkv 3C, att C, fc and fc_pre 4C each; LN stats and lse
    per_layer = B * T * (16 * C) * s + B * T * (4 + H) * 4
    final = B * T * (2 * C * s + 2 * 4) if cfg.prenorm else 0  # final LN: res, x, mean, rstd
    acts = (L * per_layer + B * T * 2 * C * s + final  # + x0, scratch
            + B * T * cfg.padded_vocab_size * s + B * T * 4  # logits, per-token losses
            + B * T * 12 * C * s)                      # backward: five (B,T,C), dfc, dqkv
    out = {"params": n * s, "grads": n * 4, "optimizer": n * 4 * (3 if master else 2),
           "activations": acts}
    out["total"] = sum(out.values())
    return out


class _Workspace:
    """Activation buffers for one (B, T) shape: what a forward writes and backward reads.

    Per block (pre-LN): ln1, m1, r1, qkv, att, lse, res_mid, ln2, m2, r2, fc, fc_pre, and res
    (the residual stream entering the block; block 0's is ``x0``); GPT-1 keeps s1, n1, s2, out
    instead of res/ln1/res_mid/ln2. One (B, T, C) ``scratch`` carries each sub-block's output to
    the fused residual+LayerNorm that consumes it. ``shared`` (cached decoding: nothing is kept
    for backward) gives every layer the same set, where the residual stream alternates between
    ``res`` and ``res_mid`` (a fused residual+LayerNorm may not write its own input). The logits
    and the backward buffers are allocated when first needed.
    """

    def __init__(self, model: "GPT", B: int, T: int, shared: bool = False):
        cfg, dev, dt = model.config, model.device, model.dtype
        C, H = cfg.n_embd, cfg.n_head
        self.model, self.B, self.T = model, B, T
        self.idx: Optional[Tensor] = None
        self.drop_step: Optional[int] = None  # the dropout step of the forward that filled it
        self.lm_pending = False  # the logits buffer holds the LM loss's gradient

        def act(*shape):
            return empty([B, T, *shape], dt, dev)

        def stat(*shape):
            return empty([B, *shape], "float32", dev)

        self.x0 = act(C)
        self.scratch = act(C)
        self.losses = empty([B, T], "float32", dev)
        names = (("res", "ln1", "res_mid", "ln2") if cfg.prenorm else ("s1", "n1", "s2", "out"))

        def layer():
            A = {n: act(C) for n in names}
            A.update(qkv=act(3 * C), att=act(C), fc=act(4 * C), fc_pre=act(4 * C),
                     m1=stat(T), r1=stat(T), m2=stat(T), r2=stat(T))
            if not shared:
                A["lse"] = stat(H, T)
            return A

        one = layer() if shared else None
        self.layers: List[dict] = [one if shared else layer() for _ in range(cfg.n_layer)]
        self.final = ({"res": act(C), "x": act(C), "m": stat(T), "r": stat(T)}
                      if cfg.prenorm else {})
        self._logits: Optional[Tensor] = None
        self._grad: Optional[List[Tensor]] = None
        self.dfc = self.dqkv = None

    def layer(self, i: int) -> dict:
        return self.layers[i]

    def logits(self) -> Tensor:
        if self._logits is None:
            cfg = self.model.config
            self._logits = empty([self.B, self.T, cfg.padded_vocab_size], self.model.dtype,
                                 self.model.device)
        return self._logits

    def grad_buffers(self):
        """Allocate backward's buffers once; returns grab(*live): a (B, T, C) buffer that is
        none of the live ones (five rotate through every block)."""
        if self._grad is None:
            C = self.model.config.n_embd
            mk = lambda *s: empty([self.B, self.T, *s], self.model.dtype, self.model.device)
            self._grad = [mk(C) for _ in range(5)]
            self.dfc, self.dqkv = mk(4 * C), mk(3 * C)

        def grab(*live):
            taken = {t.data_ptr() for t in live}
            for buf in self._grad:
                if buf.data_ptr() not in taken:
                    return buf
            raise AssertionError("backward needs more than five (B, T, C) buffers")

        return grab
