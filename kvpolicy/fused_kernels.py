"""Triton kernels of the fused decode executor (imported only where Triton is installed).

``packed_decode`` computes one decode step's attention over a slice of the packed tokens of
one (batch row, KV head); ``merge_splits`` combines the slices by log-sum-exp. See
:func:`kvpolicy.fused.packed_decode_attention` for the shapes.

Codes are packed in planes (:func:`kvpolicy.quantizers.pack_codes`): the ``i``-th code of
the ``W`` bytes of a token row holds channels ``i*W .. (i+1)*W - 1``. A tile of bytes
``[BLOCK_N, W]`` is read once and yields ``8 // bits`` tiles of codes, each a contiguous
slice of channels, so nothing is reshaped or reordered in registers.
"""

import triton
import triton.language as tl


@triton.jit
def plane(codes, i: tl.constexpr, BITS: tl.constexpr):
    """Codes of plane ``i`` of a byte tile, as float16 (exact: codes are small integers).

    The code is placed in the mantissa of 1024.0 (float16 bits ``0x6400 | c`` are
    ``1024 + c``) and 1024 is subtracted, which is exact; measured 8-11% faster than a plain
    integer-to-float cast at large batches (``benchmarks/NOTES.md``, v10).
    """
    bits = ((codes.to(tl.int16) >> (i * BITS)) & ((1 << BITS) - 1)) | 0x6400
    return bits.to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def key_plane_scores(
    kb, q_row, G_LIVE, KS, KZ, group_row, block_live, j, scaling,
    i: tl.constexpr, KW: tl.constexpr, KBITS: tl.constexpr,
):  # fmt: skip
    """Scores of channels ``i*KW + j`` with the per-channel scale folded into the query,
    ``q.(c*s + z) = (q*s).c + q.z``: ``((q*s).c [BLOCK_G, BLOCK_N], q*z [BLOCK_G, KW])``; the
    caller sums the zero terms of all planes once."""
    q = tl.load(q_row + i * KW + j[None, :], mask=G_LIVE, other=0.0).to(tl.float32) * scaling
    ks = tl.load(KS + group_row + i * KW + j, mask=block_live, other=0.0).to(tl.float32)
    kz = tl.load(KZ + group_row + i * KW + j, mask=block_live, other=0.0).to(tl.float32)
    qs = (q * ks[None, :]).to(tl.float16)
    return tl.dot(qs, tl.trans(plane(kb, i, KBITS))), q * kz[None, :]


@triton.jit
def value_plane(
    acc, vb, p, VS, VZ, token_row, j, live,
    i: tl.constexpr, VW: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """``acc + p @ v`` for channels ``i*VW + j``: ``[BLOCK_G, VW]``.

    When the plane lies inside one value group (``VG % VW == 0``) the per-token scale is
    folded into the probabilities (``p.(c*s + z) = (p*s).c + (p*z).1``); otherwise the plane
    is dequantized with each channel's group scale.
    """
    if VG % VW == 0:
        group = (i * VW) // VG
        vs = tl.load(VS + token_row * (D // VG) + group, mask=live, other=0.0).to(tl.float32)
        vz = tl.load(VZ + token_row * (D // VG) + group, mask=live, other=0.0).to(tl.float32)
        # the zero term sum_n p*z is the same for every channel: a product with ones keeps it on
        # the matrix units instead of a cross-warp reduction
        out = tl.dot((p * vs[None, :]).to(tl.float16), plane(vb, i, VBITS), acc)
        out = tl.dot((p * vz[None, :]).to(tl.float16), tl.full(vb.shape, 1.0, tl.float16), out)
    else:
        groups = token_row[:, None] * (D // VG) + (i * VW + j[None, :]) // VG
        vs = tl.load(VS + groups, mask=live[:, None], other=0.0).to(tl.float32)
        vz = tl.load(VZ + groups, mask=live[:, None], other=0.0).to(tl.float32)
        v = plane(vb, i, VBITS).to(tl.float32) * vs + vz
        out = tl.dot(p.to(tl.float16), v.to(tl.float16), acc)
    return out


@triton.jit
def packed_decode(
    Q, KC, KS, KZ, VC, VS, VZ, BIAS, OUT, LSE,
    N, HKV, G, scaling, tokens_per_split,
    D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """One program: one (batch row, KV head) and tokens ``[start, start + tokens_per_split)``.

    Blocks of ``BLOCK_N`` tokens (one key group, so one key scale row per block) keep an
    online softmax for the ``G`` query heads that share the KV head.
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // HKV
    KW: tl.constexpr = D * KBITS // 8
    VW: tl.constexpr = D * VBITS // 8
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    kj = tl.arange(0, KW)
    vj = tl.arange(0, VW)
    g_live = offs_g[:, None] < G
    q_row = Q + (bh * G + offs_g[:, None]) * D
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G, 16], tl.float32)
    acc0 = tl.zeros([BLOCK_G, VW], tl.float32)
    acc1 = tl.zeros([BLOCK_G, VW], tl.float32)
    acc2 = tl.zeros([BLOCK_G, VW], tl.float32)
    acc3 = tl.zeros([BLOCK_G, VW], tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for step in range(0, tokens_per_split, BLOCK_N):
        first = start + step  # a multiple of BLOCK_N
        n = first + offs_n
        live = n < end
        token_row = bh * N + n
        kb = tl.load(KC + token_row[:, None] * KW + kj[None, :], mask=live[:, None], other=0)
        group_row = (bh * (N // BLOCK_N) + first // BLOCK_N) * D
        block_live = first < end  # the last split may end past the region: read no scale row there
        s, z = key_plane_scores(kb, q_row, g_live, KS, KZ, group_row, block_live, kj, scaling, 0, KW, KBITS)
        if KBITS < 8:
            s1, z1 = key_plane_scores(kb, q_row, g_live, KS, KZ, group_row, block_live, kj, scaling, 1, KW, KBITS)
            s += s1
            z += z1
        if KBITS < 4:
            s2, z2 = key_plane_scores(kb, q_row, g_live, KS, KZ, group_row, block_live, kj, scaling, 2, KW, KBITS)
            s3, z3 = key_plane_scores(kb, q_row, g_live, KS, KZ, group_row, block_live, kj, scaling, 3, KW, KBITS)
            s += s2 + s3
            z += z2 + z3
        s += tl.sum(z, 1)[:, None]
        if HAS_BIAS:
            s += tl.load(BIAS + b * N + n, mask=live, other=float("-inf"))[None, :]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        # the softmax denominator, on the matrix units: every column of p @ 1 is sum_n p
        denom = tl.dot(p.to(tl.float16), tl.full([BLOCK_N, 16], 1.0, tl.float16), denom * alpha[:, None])
        vb = tl.load(VC + token_row[:, None] * VW + vj[None, :], mask=live[:, None], other=0)
        acc0 = value_plane(acc0 * alpha[:, None], vb, p, VS, VZ, token_row, vj, live, 0, VW, VBITS, VG, D)
        if VBITS < 8:
            acc1 = value_plane(acc1 * alpha[:, None], vb, p, VS, VZ, token_row, vj, live, 1, VW, VBITS, VG, D)
        if VBITS < 4:
            acc2 = value_plane(acc2 * alpha[:, None], vb, p, VS, VZ, token_row, vj, live, 2, VW, VBITS, VG, D)
            acc3 = value_plane(acc3 * alpha[:, None], vb, p, VS, VZ, token_row, vj, live, 3, VW, VBITS, VG, D)
        m = m_new
    total = tl.max(denom, 1)
    safe = tl.where(total > 0, total, 1.0)
    row = (bh * splits + split) * G + offs_g
    out = OUT + row[:, None] * D + vj[None, :]
    tl.store(out, acc0 / safe[:, None], mask=g_live)
    if VBITS < 8:
        tl.store(out + VW, acc1 / safe[:, None], mask=g_live)
    if VBITS < 4:
        tl.store(out + 2 * VW, acc2 / safe[:, None], mask=g_live)
        tl.store(out + 3 * VW, acc3 / safe[:, None], mask=g_live)
    tl.store(LSE + row, tl.where(total > 0, m + tl.log(safe), float("-inf")), mask=offs_g < G)


@triton.jit
def merge_splits(OUT, LSE, MERGED, TOTAL, S, G, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """Log-sum-exp merge of the ``S`` splits of one (batch row, KV head): ``[S, G, D] -> [G, D]``."""
    bh = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    g_live = offs_g < G
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        live = (s < S)[:, None] & g_live[None, :]
        lse = tl.load(LSE + (bh * S + s[:, None]) * G + offs_g[None, :], mask=live, other=float("-inf"))
        top = tl.maximum(top, tl.max(lse, 0))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weight_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for s in range(0, S):
        lse = tl.load(LSE + (bh * S + s) * G + offs_g, mask=g_live, other=float("-inf"))
        w = tl.exp(lse - top_safe)
        acc += w[:, None] * tl.load(
            OUT + ((bh * S + s) * G + offs_g[:, None]) * D + offs_d[None, :], mask=g_live[:, None]
        )
        weight_sum += w
    safe = tl.where(weight_sum > 0, weight_sum, 1.0)
    tl.store(MERGED + (bh * G + offs_g[:, None]) * D + offs_d[None, :], acc / safe[:, None], mask=g_live[:, None])
    tl.store(TOTAL + bh * G + offs_g, tl.where(weight_sum > 0, top_safe + tl.log(safe), float("-inf")), mask=g_live)
