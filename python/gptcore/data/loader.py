"""Random training batches and sequential evaluation batches over token shards."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from .shards import TokenData


class BatchLoader:
    """Random windows of ``seq_len + 1`` tokens: inputs x = w[:-1], targets y = w[1:].

    Batch number ``k`` depends only on (seed, k), so the loader's whole state is
    ``{"seed": seed, "step": k}``: a resumed run draws exactly the batches it would have.
    ``next()`` returns (x, y) as int32 arrays of shape (batch_size, seq_len).
    """

    def __init__(self, data: TokenData, batch_size: int, seq_len: int, seed: int = 0, step: int = 0):
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.data, self.batch_size, self.seq_len = data, int(batch_size), int(seq_len)
        self.seed, self.step = int(seed), int(step)
        avail = data.windows_available(self.seq_len)
        if avail.sum() <= 0:
            raise ValueError(f"data: no shard holds more than seq_len = {seq_len} tokens "
                             f"(largest has {int(data.sizes.max())}); use a shorter --seq-len or more text")
        self._cum = np.cumsum(avail)

    def batch(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Batch number k (does not move the loader)."""
        rng = np.random.default_rng([self.seed, int(k)])
        starts = rng.integers(0, int(self._cum[-1]), size=self.batch_size)
        T = self.seq_len
        x = np.empty((self.batch_size, T), np.int32)
        y = np.empty((self.batch_size, T), np.int32)
        shard_ids = np.searchsorted(self._cum, starts, side="right")
        for b, (s, start) in enumerate(zip(shard_ids, starts)):
            off = int(start - (self._cum[s - 1] if s else 0))
            w = np.asarray(self.data.shards[s][off: off + T + 1], dtype=np.int32)
            x[b], y[b] = w[:-1], w[1:]
        return x, y

    def next(self) -> Tuple[np.ndarray, np.ndarray]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_batches(data: TokenData, batch_size: int, seq_len: int, max_batches: int):
    """Deterministic validation batches: consecutive non-overlapping windows from the start."""
    T = seq_len
    rows_x, rows_y = [], []
    for shard in data.shards:
        n = (len(shard) - 1) // T
        for i in range(n):
            w = np.asarray(shard[i * T: i * T + T + 1], dtype=np.int32)
            rows_x.append(w[:-1])
            rows_y.append(w[1:])
            if len(rows_x) == batch_size:
                yield np.stack(rows_x), np.stack(rows_y)
                rows_x, rows_y = [], []
                max_batches -= 1
                if max_batches <= 0:
                    return
    if rows_x:
        yield np.stack(rows_x), np.stack(rows_y)

