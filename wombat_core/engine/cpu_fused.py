"""Fused float32 CPU kernels for the lean forward's small operations, compiled by numba.

Why: a decode step multiplies every weight matrix once, streaming ~0.5 GB of float32 weights (the demo
model) through the caches. Between those multiplications sit about twenty small PyTorch operations a layer
(norms, rotary, cache writes, the activation, residual adds). Each dispatches through several kilobytes of
PyTorch's code and data, and the weight stream has just evicted them: measured on an AVX2-only EPYC, a
norm of one 576-wide row took 20 us hot and 60 us right after the caches were flushed, and the small
operations took ~10 ms of a 32 ms single-stream step. One compiled loop per group of them replaces
several dispatches: these kernels cut that part to ~3.6 ms (measured the same way).

Each kernel computes what the PyTorch operations it replaces compute, in float32; only sums (of squares,
dot products, the softmax's) may add in another order, ~1e-7 relative (tested against the Hugging Face
modules and SDPA, and the whole forward against the model's own logits):

    add_rms_norm         x += delta, then LLaMA's RMSNorm of x (the residual add and the next norm)
    silu_mul             act(gate) * up over the packed [gate | up] product (SiLU only)
    rotary_write         rotary on q and k (rotate_half layout), k and v written into the cache columns
    decode_attention     a decode step's attention straight over the cache storage, between each row's
                         first and last column (no mask tensor, no views), GQA heads sharing each key

numba is optional: `available()` is False without it (or with WOMBAT_FUSED_KERNELS=0), and the lean
forward then runs the PyTorch operations. vLLM depends on numba too, so its environment has it as well.
Compiled code is cached next to this file where that is writable, else compiled at load (a few seconds).
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is an optional dependency: the PyTorch path is the fallback
    import numba
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None


def _cache_writable() -> bool:
    return os.access(os.path.join(os.path.dirname(__file__), "__pycache__"), os.W_OK) or os.access(
        os.path.dirname(__file__), os.W_OK
    )


cache = _cache_writable()  # numba's on-disk cache of compiled code, for this module and cpu_matmul


def available() -> bool:
    """Whether the fused kernels can run here (numba importable, not turned off)."""
    return numba is not None and os.environ.get("WOMBAT_FUSED_KERNELS", "1") != "0"


if numba is not None:
    # fastmath's reassociation only for the kernels with sums (of squares, dot products): it lets LLVM
    # vectorise them, changing only the order in which they add.
    _jit = numba.njit(cache=cache, nogil=True, boundscheck=False)
    _jit_sum = numba.njit(cache=cache, nogil=True, boundscheck=False, fastmath={"reassoc"})
    _jit_parallel = numba.njit(cache=cache, nogil=True, boundscheck=False, parallel=True)

    @_jit_sum
    def _add_rms_norm(x, delta, weight, eps, add):  # pragma: no cover - compiled
        rows, width = x.shape
        out = np.empty_like(x)
        for i in range(rows):
            total = np.float32(0.0)
            for j in range(width):
                value = x[i, j] + delta[i, j] if add else x[i, j]
                x[i, j] = value
                total += value * value
            scale = np.float32(1.0) / np.sqrt(total / np.float32(width) + np.float32(eps))
            for j in range(width):
                out[i, j] = weight[j] * (x[i, j] * scale)
        return out

    @_jit
    def _silu_mul(gate_up, intermediate):  # pragma: no cover - compiled
        rows = gate_up.shape[0]
        out = np.empty((rows, intermediate), dtype=gate_up.dtype)
        for i in range(rows):
            for j in range(intermediate):
                gate = gate_up[i, j]
                out[i, j] = gate / (np.float32(1.0) + np.exp(-gate)) * gate_up[i, intermediate + j]
        return out

    @_jit
    def _rotary_write(qkv, cos, sin, heads, kv_heads, keys, values, slots, columns):  # pragma: no cover
        tokens, head_dim = cos.shape
        half = head_dim // 2
        queries = np.empty((tokens, heads, head_dim), dtype=qkv.dtype)
        for t in range(tokens):
            for h in range(heads):
                base = h * head_dim
                for j in range(half):
                    a, b = qkv[t, base + j], qkv[t, base + half + j]
                    queries[t, h, j] = a * cos[t, j] - b * sin[t, j]
                    queries[t, h, half + j] = b * cos[t, half + j] + a * sin[t, half + j]
            slot, column = slots[t], columns[t]
            for h in range(kv_heads):
                base = (heads + h) * head_dim
                for j in range(half):
                    a, b = qkv[t, base + j], qkv[t, base + half + j]
                    keys[slot, h, column, j] = a * cos[t, j] - b * sin[t, j]
                    keys[slot, h, column, half + j] = b * cos[t, half + j] + a * sin[t, half + j]
                base = (heads + kv_heads + h) * head_dim
                for j in range(head_dim):
                    values[slot, h, column, j] = qkv[t, base + j]
        return queries

    @_jit_sum
    def _group_scores(
        queries, keys, slots, firsts, lasts, scale, t, g, scores
    ):  # pragma: no cover - compiled
        """Row t's scores for the query heads of key-value head g, minus each head's maximum."""
        head_dim, group = queries.shape[2], queries.shape[1] // keys.shape[1]
        slot, first, count = slots[t], firsts[t], lasts[t] - firsts[t] + 1
        for c in range(count):  # each key once for the query heads that share it (GQA)
            for i in range(group):
                h = g * group + i
                dot = np.float32(0.0)
                for j in range(head_dim):
                    dot += queries[t, h, j] * keys[slot, g, first + c, j]
                scores[t, h, c] = dot * scale
        for h in range(g * group, (g + 1) * group):  # minus the maximum, so that exp cannot overflow
            top = scores[t, h, 0]
            for c in range(1, count):
                top = max(top, scores[t, h, c])
            for c in range(count):
                scores[t, h, c] -= top

    @_jit_sum
    def _head_values(weights, values, slots, firsts, lasts, t, h, out):  # pragma: no cover - compiled
        """Row t's output for query head h: its softmax weights times the values."""
        head_dim, group = values.shape[3], weights.shape[1] // values.shape[1]
        slot, first, count, g = slots[t], firsts[t], lasts[t] - firsts[t] + 1, h // group
        total = np.float32(0.0)
        for c in range(count):
            total += weights[t, h, c]
        inverse = np.float32(1.0) / total
        row = out[t, h * head_dim : (h + 1) * head_dim]
        row[:] = 0
        for c in range(count):
            weight = weights[t, h, c] * inverse
            for j in range(head_dim):
                row[j] += weight * values[slot, g, first + c, j]

    # The loops over rows and heads twice: on the calling thread, and split over the cores (from
    # SPLIT_ATTENTION_MIN_ROWS rows; below, a launch costs more than it saves). Two functions rather than
    # one compiled twice: numba's cache does not tell a parallel compilation from a serial one.
    @_jit
    def _scores_alone(queries, keys, slots, firsts, lasts, scale):  # pragma: no cover - compiled
        kv_heads = keys.shape[1]
        scores = np.full((len(queries), queries.shape[1], np.max(lasts - firsts) + 1), -np.inf, np.float32)
        for tg in range(len(queries) * kv_heads):
            _group_scores(queries, keys, slots, firsts, lasts, scale, tg // kv_heads, tg % kv_heads, scores)
        return scores

    @_jit_parallel
    def _scores_split(queries, keys, slots, firsts, lasts, scale):  # pragma: no cover - compiled
        kv_heads = keys.shape[1]
        scores = np.full((len(queries), queries.shape[1], np.max(lasts - firsts) + 1), -np.inf, np.float32)
        for tg in numba.prange(len(queries) * kv_heads):
            _group_scores(queries, keys, slots, firsts, lasts, scale, tg // kv_heads, tg % kv_heads, scores)
        return scores

    @_jit
    def _values_alone(weights, values, slots, firsts, lasts):  # pragma: no cover - compiled
        heads = weights.shape[1]
        out = np.empty((len(weights), heads * values.shape[3]), np.float32)
        for th in range(len(weights) * heads):
            _head_values(weights, values, slots, firsts, lasts, th // heads, th % heads, out)
        return out

    @_jit_parallel
    def _values_split(weights, values, slots, firsts, lasts):  # pragma: no cover - compiled
        heads = weights.shape[1]
        out = np.empty((len(weights), heads * values.shape[3]), np.float32)
        for th in numba.prange(len(weights) * heads):
            _head_values(weights, values, slots, firsts, lasts, th // heads, th % heads, out)
        return out


SPLIT_ATTENTION_MIN_ROWS = 4


def add_rms_norm(x: np.ndarray, delta: np.ndarray | None, weight: np.ndarray, eps: float) -> np.ndarray:
    """x += delta (in place, when given), then RMSNorm(x) * weight as a new [rows, width] array."""
    return _add_rms_norm(x, x if delta is None else delta, weight, eps, delta is not None)


def silu_mul(gate_up: np.ndarray, intermediate: int) -> np.ndarray:
    """silu(gate) * up, gate and up the two halves of the packed product [rows, 2 * intermediate]."""
    return _silu_mul(gate_up, intermediate)


def decode_attention(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, slots: np.ndarray,
                     firsts: np.ndarray, lasts: np.ndarray, scale: float) -> np.ndarray:  # fmt: skip
    """Attention of one query token per row over the cache storage: row t's queries [heads, head_dim] attend
    to columns firsts[t]..lasts[t] (inclusive) of slot slots[t], the query heads of a group sharing their
    key-value head (GQA); softmax in float32, as SDPA's. Returns [tokens, heads * head_dim]."""
    # In three passes: the scores minus each row's maximum, their exp by numpy (vectorised; numba's exp
    # calls libm a value at a time), then the weighted sum of the values, one query head's row at a time;
    # the first and last split over the cores from SPLIT_ATTENTION_MIN_ROWS rows. A 16-row step's
    # attention (~50 columns a row) took 4.4-5.5 ms split, against 7.3 for the one-pass serial kernel this
    # replaced and 7.6 for these passes serial; a 16-row call over 300 columns 390-520 us split, 690
    # serial. At one row the launches cost more than they save (1.25 ms a step split, 0.8 serial).
    split = len(queries) >= SPLIT_ATTENTION_MIN_ROWS
    scores = (_scores_split if split else _scores_alone)(
        queries, keys, slots, firsts, lasts, np.float32(scale)
    )
    np.exp(scores, out=scores)
    return (_values_split if split else _values_alone)(scores, values, slots, firsts, lasts)


def rotary_write(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, heads: int, kv_heads: int,
                 keys: np.ndarray, values: np.ndarray, slots: np.ndarray, columns: np.ndarray) -> np.ndarray:  # fmt: skip
    """Rotary embedding of the q and k heads of each token's packed [q | k | v] row (cos, sin: [tokens,
    head_dim]); writes token t's k and v into the cache storage at (slots[t], :, columns[t]); returns the
    rotated queries [tokens, heads, head_dim]."""
    return _rotary_write(qkv, cos, sin, heads, kv_heads, keys, values, slots, columns)
