"""Float32 matrix multiplication for the lean CPU forward, compiled by numba.

Why: a decode step multiplies a row per stream (1 to 64) by every weight matrix. OpenBLAS's sgemm is
built for large products: it repacks the weight into its micro-kernel's layout on every call, which at a
few rows costs more than the multiplication itself. Measured on an AVX2-only EPYC (two cores, 30 layers
of the demo model's projections, weights streamed from memory), ms per pass:

    rows        1       2       4       8       16      32      64      128
    OpenBLAS    16.1    35.4    35.7    30.8    41.9    62.4    101     180
    this        13.2    16.1    19.9    23.5    34.4    54.3    94.2    195

(The table predates the prefetch described below. The one-row figure is the 4x3 kernel's. With the output
layer, the one-row kernel below took 16.7 ms where OpenBLAS took 20.6, 32 against 26 GB/s.) Products of
more than `CHUNK_ROWS` rows (prefill) run in chunks of that many rows, each near OpenBLAS's speed at that
size, rather than handing them to OpenBLAS: after an OpenBLAS call its threads spin for ~0.1 s, and 40
one-row products on the same cores then took 102 ms instead of 12 (measured). One kernel family for every
product avoids that.

How: each output is a dot product of an input row and a weight row, both contiguous in PyTorch's
[out, in] layout, so the weight needs no repacking and no second copy. A block of 4 rows by 3 outputs
keeps 12 sums in vector registers and loads each weight and input vector once for 4 or 3 of them (other
blocks measured slower: 2x4 and 4x2 within 10 %, 3x4 and 4x4 register-spilled at 16 rows). A single row
(one stream decoding) takes 8 outputs at a time instead: 8 weight rows streamed at once keep more
memory requests in flight. The output blocks are split over the cores (numba's prange). fastmath's
reassociation and contraction let LLVM vectorise the sums with fused multiply-adds, so results differ
from OpenBLAS's only in the order of the additions (tested); no-NaN assumptions are not made, so a NaN
still propagates to the logits.

Prefetch: with several rows a block's weights come from memory during its first pass (4 rows) and from
L1 during the others, so memory sits idle for three passes in four, and the hardware prefetcher does not
make up for it: at 16 rows the 30 layers' projections ran at ~92 GFLOPS with the weights streamed from
memory and ~116 with one layer's weights resident in L3. Each pass therefore asks for its share of the
next block's cache lines (llvm.prefetch, which never faults). Measured over the 30 layers' projections,
with and without, in one run, ms: 2 rows 16.8 against 18.9, 4 rows 18.5 against 20.1, 8 rows 21.9
against 24.4, 16 rows 31.8 against 35.9, 32 rows 50.5 against 55.6, 64 rows 98.6 against 102. The block
after the current one, not two ahead: two ahead was slower at 16 rows and no better at 2. One row is at
memory bandwidth already (~30 GB/s) and does without.

Threads: numba's parallel layer runs `numba.set_num_threads` threads, which `cpu_kernels.use_threads`
sets on the engine thread. It must be OpenMP (libgomp) or TBB: numba's fallback work queue took
~100 us for a small product here, OpenMP ~5 us, so `available()` is False without them. It finds that
out without launching anything, because the first launch must come from the engine thread: OpenMP keeps
a team of workers per launching thread, and after one launch from the loading thread the engine
thread's launches ran a single stream at 26 tok/s instead of 47 (measured in one process, engine alone).
Launches are serialised in the process: two engines in one process (tests) must not launch at once,
and the cores are shared anyway.
"""

from __future__ import annotations

import functools
import importlib
import threading

import numpy as np

from wombat_core.engine import cpu_fused

numba = cpu_fused.numba

CHUNK_ROWS = 64  # larger products run in chunks of this many rows (x stays in the caches)

_launch = threading.Lock()


def available() -> bool:
    """Whether the compiled kernels can run here: numba importable, compiled kernels not turned off, and
    a threading layer with cheap launches (TBB or OpenMP, which numba prefers to its work queue)."""
    return cpu_fused.available() and _cheap_launches()


@functools.cache
def _cheap_launches() -> bool:
    """Whether numba's TBB or OpenMP layer loads (its library is installed), found without a launch."""
    for layer in ("numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool"):
        try:
            importlib.import_module(layer)
            return True
        except ImportError:
            continue
    return False


def set_threads(threads: int) -> None:
    """The threads the kernel splits over, for launches from the calling thread (numba's count is per
    thread), capped at the pool numba started with."""
    if numba is not None:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def matmul(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [rows, in] @ weight[out, in].T as a new [rows, out] float32 array; both inputs C-contiguous."""
    with _launch:
        if len(x) == 1:
            return _one_row(x, weight)
        if len(x) <= CHUNK_ROWS:
            return _rows(x, weight)
        return np.concatenate([_rows(x[i : i + CHUNK_ROWS], weight) for i in range(0, len(x), CHUNK_ROWS)])


if numba is not None:
    from llvmlite import ir as llvm_ir  # numba's own dependency
    from numba.core import cgutils
    from numba.core import types as numba_types
    from numba.extending import intrinsic

    _jit = numba.njit(
        parallel=True, nogil=True, boundscheck=False, cache=cpu_fused.cache, fastmath={"reassoc", "contract"}
    )

    @intrinsic
    def _prefetch(typingctx, array, row, column):
        """Ask for the cache line holding array[row, column] (a read, kept in every cache level)."""

        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            array_struct = context.make_array(array_type)(context, builder, args[0])
            pointer = cgutils.get_item_pointer(
                context,
                builder,
                array_type,
                array_struct,
                [args[1], args[2]],
                wraparound=False,
                boundscheck=False,
            )
            byte_pointer = builder.bitcast(pointer, llvm_ir.IntType(8).as_pointer())
            i32 = llvm_ir.IntType(32)
            function = cgutils.get_or_insert_function(
                builder.module,
                llvm_ir.FunctionType(llvm_ir.VoidType(), [byte_pointer.type, i32, i32, i32]),
                "llvm.prefetch.p0i8",
            )
            read, all_levels, data = (llvm_ir.Constant(i32, value) for value in (0, 3, 1))
            builder.call(function, [byte_pointer, read, all_levels, data])
            return context.get_dummy_value()

        return numba_types.void(array, row, column), codegen

    @numba.njit(inline="always", boundscheck=False)
    def _prefetch_share(weight, first, count, share, shares):  # pragma: no cover - compiled
        """Prefetch share `share` of `shares` of weight[first : first + count] (contiguous rows), a cache line
        (16 floats) at a time; nothing past the last row."""
        width = weight.shape[1]
        if first + count > weight.shape[0]:
            return
        lines = (count * width + 15) // 16
        per = (lines + shares - 1) // shares
        for line in range(share * per, min((share + 1) * per, lines)):
            element = line * 16
            _prefetch(weight, first + element // width, element % width)

    @_jit
    def _rows(x, weight):  # pragma: no cover - compiled
        rows, width = x.shape
        outputs = weight.shape[0]
        passes = rows // 4 + rows % 4  # over each block's weights: 4 rows at a time, then one at a time
        y = np.empty((rows, outputs), np.float32)
        for block in numba.prange((outputs + 2) // 3):
            o = block * 3
            if o + 3 > outputs:  # the last, partial block: one output at a time
                for p in range(o, outputs):
                    for r in range(rows):
                        s = np.float32(0)
                        for i in range(width):
                            s += x[r, i] * weight[p, i]
                        y[r, p] = s
                continue
            r = 0
            while r + 4 <= rows:
                _prefetch_share(weight, o + 3, 3, r // 4, passes)
                s00 = s01 = s02 = s10 = s11 = s12 = np.float32(0)
                s20 = s21 = s22 = s30 = s31 = s32 = np.float32(0)
                for i in range(width):
                    w0, w1, w2 = weight[o, i], weight[o + 1, i], weight[o + 2, i]
                    x0, x1, x2, x3 = x[r, i], x[r + 1, i], x[r + 2, i], x[r + 3, i]
                    s00, s01, s02 = s00 + x0 * w0, s01 + x0 * w1, s02 + x0 * w2
                    s10, s11, s12 = s10 + x1 * w0, s11 + x1 * w1, s12 + x1 * w2
                    s20, s21, s22 = s20 + x2 * w0, s21 + x2 * w1, s22 + x2 * w2
                    s30, s31, s32 = s30 + x3 * w0, s31 + x3 * w1, s32 + x3 * w2
                y[r, o], y[r, o + 1], y[r, o + 2] = s00, s01, s02
                y[r + 1, o], y[r + 1, o + 1], y[r + 1, o + 2] = s10, s11, s12
                y[r + 2, o], y[r + 2, o + 1], y[r + 2, o + 2] = s20, s21, s22
                y[r + 3, o], y[r + 3, o + 1], y[r + 3, o + 2] = s30, s31, s32
                r += 4
            while r < rows:  # the last rows, one at a time
                _prefetch_share(weight, o + 3, 3, rows // 4 + r % 4, passes)
                s00 = s01 = s02 = np.float32(0)
                for i in range(width):
                    x0 = x[r, i]
                    s00 += x0 * weight[o, i]
                    s01 += x0 * weight[o + 1, i]
                    s02 += x0 * weight[o + 2, i]
                y[r, o], y[r, o + 1], y[r, o + 2] = s00, s01, s02
                r += 1
        return y

    @_jit
    def _one_row(x, weight):  # pragma: no cover - compiled
        width = x.shape[1]
        outputs = weight.shape[0]
        y = np.empty((1, outputs), np.float32)
        for block in numba.prange((outputs + 7) // 8):
            o = block * 8
            if o + 8 > outputs:  # the last, partial block
                for p in range(o, outputs):
                    s = np.float32(0)
                    for i in range(width):
                        s += x[0, i] * weight[p, i]
                    y[0, p] = s
                continue
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0)
            for i in range(width):
                x0 = x[0, i]
                s0 += x0 * weight[o, i]
                s1 += x0 * weight[o + 1, i]
                s2 += x0 * weight[o + 2, i]
                s3 += x0 * weight[o + 3, i]
                s4 += x0 * weight[o + 4, i]
                s5 += x0 * weight[o + 5, i]
                s6 += x0 * weight[o + 6, i]
                s7 += x0 * weight[o + 7, i]
            y[0, o], y[0, o + 1], y[0, o + 2], y[0, o + 3] = s0, s1, s2, s3
            y[0, o + 4], y[0, o + 5], y[0, o + 6], y[0, o + 7] = s4, s5, s6, s7
        return y

else:  # pragma: no cover - numba not installed

    def _rows(x, weight):
        raise RuntimeError("the compiled matmul needs numba")

    _one_row = _rows
