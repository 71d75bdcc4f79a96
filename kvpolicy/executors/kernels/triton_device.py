"""Triton kernels of the fused decode executor (imported only where Triton is installed).

``packed_decode`` computes one decode step's attention over a slice of the packed tokens of
one (batch row, KV head). ``finish_decode`` attends the full-precision tokens (kept, staged
and new, read in place) and merges them with the slices by log-sum-exp into the step's
output (:func:`kvpolicy.executors.kernels.decode_attention`); ``merge_splits`` merges the slices alone
(:func:`kvpolicy.executors.kernels.packed_decode_attention`, the packed region's ``(o, lse)``).

Codes are packed in planes (:func:`kvpolicy.quantizers.native.pack_codes`): the ``i``-th code of
the ``W`` bytes of a token row holds channels ``i*W .. (i+1)*W - 1``. A tile of bytes
``[BLOCK_N, W]`` is read once and yields ``8 // bits`` tiles of codes, each a contiguous
slice of channels, so nothing is reshaped or reordered in registers. 3-bit codes are a 2-bit
plane and a 1-bit plane: two tiles, whose codes of the same channels are added
(:func:`codes_plane`; the 1-bit plane's two halves are set side by side).
"""

import triton
import triton.language as tl

from kvpolicy.executors.kernels.common import plane_bytes

LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in base 2: exp2 is one instruction
LN2 = tl.constexpr(0.6931471805599453)


@triton.constexpr_function
def unpack_ptx(i, bits):
    """PTX turning 4 packed bytes (``$2``) into the float16 codes of plane ``i``, two per register.

    The bytes are permuted to ``(b0, b2, b1, b3)`` so that each 16-bit lane holds one byte of
    each output pair. The plane's bits, masked in place, are set into the mantissa of 1024.0
    (``0x6400 | c << i*bits`` is ``1024 + c * 2**(i*bits)``), and one fused multiply-add
    per pair, ``x * 2**-(i*bits) - 1024 * 2**-(i*bits)``, gives ``c`` exactly.
    """
    shift = i * bits
    mask = ((1 << bits) - 1) << shift
    # float16 bit patterns, twice per register: 2**-shift (biased exponent 15 - shift) and
    # -1024 * 2**-shift (sign bit, biased exponent 25 - shift)
    scale2 = ((15 - shift) << 10) * 0x10001
    offset2 = (0x8000 | (25 - shift) << 10) * 0x10001
    return f"""{{
    .reg .b32 t, u, a, b, m, o, s, z;
    mov.b32 m, {mask * 0x10001:#010x};
    mov.b32 o, 0x64006400;
    mov.b32 s, {scale2:#010x};
    mov.b32 z, {offset2:#010x};
    prmt.b32 t, $2, $2, 0x3120;
    shr.u32 u, t, 8;
    lop3.b32 a, t, m, o, 0xEA;
    lop3.b32 b, u, m, o, 0xEA;
    fma.rn.f16x2 $0, a, s, z;
    fma.rn.f16x2 $1, b, s, z;
    }}"""


@triton.jit
def plane(codes, i: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr):
    """Codes of plane ``i`` of a byte tile, as float16 (exact: codes are small integers).

    A code placed in the mantissa of 1024.0 (float16 bits ``0x6400 | c`` are ``1024 + c``)
    becomes a float16 with one subtraction. ``FAST`` does it for 4 bytes at a time in PTX
    (:func:`unpack_ptx`, CUDA only); otherwise in Triton (also runs in the interpreter).
    """
    if FAST:
        out = tl.inline_asm_elementwise(unpack_ptx(i, BITS), "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
    else:
        bits = ((codes.to(tl.int16) >> (i * BITS)) & ((1 << BITS) - 1)) | 0x6400
        out = bits.to(tl.float16, bitcast=True) - 1024.0
    return out


#: bytes of a token row's codes one plane tile covers (3 bits: the 2-bit plane's; the 1-bit plane follows)
plane_width = triton.constexpr_function(plane_bytes)


@triton.jit
def side_by_side(a, b):
    """Tiles ``[N, W]`` ``a`` and ``b`` as one ``[N, 2W]`` (``a``'s columns first)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def codes_plane(lo, hi, i: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr):
    """Codes of channels ``i*W .. (i+1)*W - 1`` as float16: plane ``i`` of the byte tile ``lo``;
    for 3-bit codes, the 2-bit plane ``i`` of ``lo`` plus 4 times the high bits of the same
    channels, the 1-bit planes ``2i`` and ``2i+1`` of ``hi`` (exact: codes are at most 7)."""
    if BITS == 3:
        high = side_by_side(plane(hi, 2 * i, 1, FAST), plane(hi, 2 * i + 1, 1, FAST))
        out = plane(lo, i, 2, FAST) + 4.0 * high
    else:
        out = plane(lo, i, BITS, FAST)
    return out


@triton.jit
def key_plane_scores(
    kb, kh, q_row, row_live, KS, KZ, group_row, group_live, j, scaling,
    i: tl.constexpr, KW: tl.constexpr, KBITS: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """Scores of channels ``i*KW + j`` with the per-channel scale folded into the query,
    ``q.(c*s + z) = (q*s).c + q.z``: ``((q*s).c [BLOCK_G, BLOCK_N], q*z [BLOCK_G, KW])``. Each
    row carries the scales of its own key group (``group_row`` ``[BLOCK_G]``); the caller sums
    the zero terms of all planes once."""
    q = tl.load(q_row + i * KW + j[None, :], mask=row_live, other=0.0).to(tl.float32) * scaling
    at = group_row[:, None] + i * KW + j[None, :]
    ks = tl.load(KS + at, mask=group_live[:, None], other=0.0).to(tl.float32)
    kz = tl.load(KZ + at, mask=group_live[:, None], other=0.0).to(tl.float32)
    return tl.dot((q * ks).to(tl.float16), tl.trans(codes_plane(kb, kh, i, KBITS, FAST))), q * kz


@triton.jit
def block_scores(
    kb, kh, q_row, row_live, KS, KZ, group_row, group_live, j, scaling,
    KW: tl.constexpr, KBITS: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """Scores ``[BLOCK_G, BLOCK_N]`` of every token of the block, each row with the scales of
    its key group (all planes, zero terms included); ``kh``: the 1-bit plane's tile of 3-bit
    codes (else not read)."""
    s, z = key_plane_scores(kb, kh, q_row, row_live, KS, KZ, group_row, group_live, j, scaling, 0, KW, KBITS, FAST)
    if KBITS < 8:
        s1, z1 = key_plane_scores(
            kb, kh, q_row, row_live, KS, KZ, group_row, group_live, j, scaling, 1, KW, KBITS, FAST
        )
        s += s1
        z += z1
    if KBITS < 4:
        s2, z2 = key_plane_scores(
            kb, kh, q_row, row_live, KS, KZ, group_row, group_live, j, scaling, 2, KW, KBITS, FAST
        )
        s3, z3 = key_plane_scores(
            kb, kh, q_row, row_live, KS, KZ, group_row, group_live, j, scaling, 3, KW, KBITS, FAST
        )
        s += s2 + s3
        z += z2 + z3
    return s + tl.sum(z, 1)[:, None]


@triton.jit
def scaled_probs(p, VS, token_row, live, group, VG: tl.constexpr, D: tl.constexpr):
    """``p * s`` with the per-token scale of value group ``group``, float16 ``[BLOCK_G, BLOCK_N]``."""
    vs = tl.load(VS + token_row * (D // VG) + group, mask=live, other=0.0).to(tl.float32)
    return (p * vs[None, :]).to(tl.float16)


@triton.jit
def plane_probs(probs, p, VS, token_row, live, i: tl.constexpr, VW: tl.constexpr, VG: tl.constexpr, D: tl.constexpr):
    """The float16 probabilities plane ``i`` multiplies: when value scales are folded
    (``VG % VW == 0``), ``p`` times the scale of the plane's value group, computed afresh only
    where the plane starts a group and otherwise the previous plane's ``probs``."""
    if VG % VW == 0 and (i * VW) % VG == 0:
        probs = scaled_probs(p, VS, token_row, live, (i * VW) // VG, VG, D)
    return probs


@triton.jit
def value_plane(
    acc, vb, vh, probs, VS, VZ, token_row, j, live,
    i: tl.constexpr, VW: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr, D: tl.constexpr,
    FAST: tl.constexpr,
):  # fmt: skip
    """``acc + p @ v`` for channels ``i*VW + j``: ``[BLOCK_G, VW]``.

    When the plane lies inside one value group (``VG % VW == 0``), ``probs`` already carry the
    group's per-token scale (:func:`scaled_probs`) and the codes go to the matrix units as
    they are (``p.(c*s + z) = (p*s).c + p.z``, the zero term is summed by the caller).
    Otherwise ``probs`` is ``p`` and the plane is dequantized with each channel's group scale.
    """
    if VG % VW == 0:
        out = tl.dot(probs, codes_plane(vb, vh, i, VBITS, FAST), acc)
    else:
        groups = token_row[:, None] * (D // VG) + (i * VW + j[None, :]) // VG
        vs = tl.load(VS + groups, mask=live[:, None], other=0.0).to(tl.float32)
        vz = tl.load(VZ + groups, mask=live[:, None], other=0.0).to(tl.float32)
        v = codes_plane(vb, vh, i, VBITS, FAST).to(tl.float32) * vs + vz
        out = tl.dot(probs, v.to(tl.float16), acc)
    return out


@triton.constexpr_function
def sums_width(d, vg, vw):
    """Columns of the running sums: the softmax denominator, then (when value scales are
    folded, ``vg % vw == 0``) one zero term per value group; a power of two, at least 16."""
    needed = 1 + (d // vg if vg % vw == 0 else 0)
    return max(16, 1 << (needed - 1).bit_length())


@triton.jit
def finish_plane(acc, sums, cols, safe, i: tl.constexpr, VW: tl.constexpr, VG: tl.constexpr):
    """Normalised output of plane ``i``: ``(acc + zero term of its group) / denominator``."""
    if VG % VW == 0:
        acc += tl.sum(tl.where(cols[None, :] == 1 + (i * VW) // VG, sums, 0.0), 1)[:, None]
    return acc / safe[:, None]


@triton.jit
def packed_decode(
    Q, KC, KS, KZ, VC, VS, VZ, VROWS, BIAS, OUT, LSE,
    N, NV, HKV, G, scaling_log2, tokens_per_split,
    D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr,
    KG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HAS_BIAS: tl.constexpr,
    GATHER: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """One program: one (batch row, KV head) and tokens ``[start, start + tokens_per_split)``.

    Blocks of ``BLOCK_N`` tokens hold ``R = BLOCK_N // KG`` key groups, and the ``BLOCK_G``
    rows of the matrix-unit tiles hold ``R`` copies of the ``G`` query heads that share the
    KV head (row ``r``: head ``r % (BLOCK_G // R)``, key group ``r // (BLOCK_G // R)``). A row
    multiplies its query by its own group's key scales and sees only that group's tokens, so
    one product per plane serves the block's ``R`` groups, and each row keeps its own online
    softmax: the kernel writes ``R`` partial results per split (``OUT`` ``[B*H_kv, S*R, G, D]``),
    merged later like splits. Scores are in base 2 (``scaling_log2`` is the softmax scale
    times log2(e)); ``LSE`` is written in base e.
    ``GATHER``: packed key ``n`` pairs with value row ``VROWS[n]`` of ``NV`` (a key with row
    ``-1`` is left out); otherwise with value row ``n``.
    ``FAST``: unpack codes in PTX (CUDA) rather than in Triton (also the interpreter).
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // HKV
    KW: tl.constexpr = plane_width(D, KBITS)  # bytes of a plane tile (3 bits: the 2-bit plane's)
    VW: tl.constexpr = plane_width(D, VBITS)
    KROW: tl.constexpr = D * KBITS // 8  # bytes of a token row
    VROW: tl.constexpr = D * VBITS // 8
    R: tl.constexpr = BLOCK_N // KG
    GP: tl.constexpr = BLOCK_G // R  # rows per key group
    offs_r = tl.arange(0, BLOCK_G)
    head = offs_r % GP
    slot = offs_r // GP  # the row's key group in the block
    offs_n = tl.arange(0, BLOCK_N)
    kj = tl.arange(0, KW)
    vj = tl.arange(0, VW)
    hj = tl.arange(0, D // 8)  # the 1-bit plane of 3-bit codes
    row_live = (head < G)[:, None]
    q_row = Q + (bh * G + head[:, None]) * D
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    SW: tl.constexpr = sums_width(D, VG, VW)
    cols = tl.arange(0, SW)
    sums = tl.zeros([BLOCK_G, SW], tl.float32)  # see below: denominator, then zero terms
    acc0 = tl.zeros([BLOCK_G, VW], tl.float32)
    acc1 = tl.zeros([BLOCK_G, VW], tl.float32)
    acc2 = tl.zeros([BLOCK_G, VW], tl.float32)
    acc3 = tl.zeros([BLOCK_G, VW], tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    mine = (offs_n[None, :] // KG == slot[:, None]) & row_live  # [BLOCK_G, BLOCK_N]
    for step in range(0, tokens_per_split, BLOCK_N):
        first = start + step  # a multiple of BLOCK_N
        n = first + offs_n
        live = n < end
        token_row = bh * N + n
        if GATHER:  # values are per-token rows, so each key's may be read from anywhere
            value_row = tl.load(VROWS + n, mask=live, other=-1)
            live = value_row >= 0
            value_row = bh * NV + tl.where(live, value_row, 0)
        else:
            value_row = token_row
        kb = tl.load(KC + token_row[:, None] * KROW + kj[None, :], mask=live[:, None], other=0)
        kh = kb
        if KBITS == 3:
            kh = tl.load(KC + token_row[:, None] * KROW + KW + hj[None, :], mask=live[:, None], other=0)
        group_row = (bh * (N // KG) + first // KG + slot) * D
        # the last split may end past the region: read no scale row there
        s = block_scores(
            kb, kh, q_row, row_live, KS, KZ, group_row, first + slot * KG < end, kj, scaling_log2, KW, KBITS, FAST
        )
        if HAS_BIAS:
            s += tl.load(BIAS + b * N + n, mask=live, other=float("-inf"))[None, :] * LOG2E
        s = tl.where(mine & live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # rescale the running sums only in blocks that raise some row's maximum (rare once a
        # few blocks are seen); p <= 1 either way
        if tl.max((m_new > m).to(tl.int32), 0) > 0:
            alpha = tl.exp2(m - tl.where(m_new == float("-inf"), 0.0, m_new))[:, None]
            sums *= alpha
            acc0 *= alpha
            acc1 *= alpha
            acc2 *= alpha
            acc3 *= alpha
            m = m_new
        p = tl.exp2(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
        p16 = p.to(tl.float16)
        # one product on the matrix units gives the softmax denominator (column 0) and, when
        # value scales are folded, each value group's zero term sum_n p*z (column 1 + group)
        if VG % VW == 0:
            zeros = tl.load(
                VZ + value_row[:, None] * (D // VG) + cols[None, :] - 1,
                mask=live[:, None] & (cols[None, :] >= 1) & (cols[None, :] <= D // VG),
                other=0.0,
            ).to(tl.float32)
        else:
            zeros = tl.zeros([BLOCK_N, SW], tl.float32)
        sums = tl.dot(p16, tl.where(cols[None, :] == 0, 1.0, zeros).to(tl.float16), sums)
        vb = tl.load(VC + value_row[:, None] * VROW + vj[None, :], mask=live[:, None], other=0)
        vh = vb
        if VBITS == 3:
            vh = tl.load(VC + value_row[:, None] * VROW + VW + hj[None, :], mask=live[:, None], other=0)
        probs = plane_probs(p16, p, VS, value_row, live, 0, VW, VG, D)
        acc0 = value_plane(acc0, vb, vh, probs, VS, VZ, value_row, vj, live, 0, VW, VBITS, VG, D, FAST)
        if VBITS < 8:
            probs = plane_probs(probs, p, VS, value_row, live, 1, VW, VG, D)
            acc1 = value_plane(acc1, vb, vh, probs, VS, VZ, value_row, vj, live, 1, VW, VBITS, VG, D, FAST)
        if VBITS < 4:
            probs = plane_probs(probs, p, VS, value_row, live, 2, VW, VG, D)
            acc2 = value_plane(acc2, vb, vh, probs, VS, VZ, value_row, vj, live, 2, VW, VBITS, VG, D, FAST)
            probs = plane_probs(probs, p, VS, value_row, live, 3, VW, VG, D)
            acc3 = value_plane(acc3, vb, vh, probs, VS, VZ, value_row, vj, live, 3, VW, VBITS, VG, D, FAST)
    total = tl.sum(tl.where(cols[None, :] == 0, sums, 0.0), 1)
    safe = tl.where(total > 0, total, 1.0)
    row = ((bh * splits + split) * R + slot) * G + head
    out = OUT + row[:, None] * D + vj[None, :]
    tl.store(out, finish_plane(acc0, sums, cols, safe, 0, VW, VG), mask=row_live)
    if VBITS < 8:
        tl.store(out + VW, finish_plane(acc1, sums, cols, safe, 1, VW, VG), mask=row_live)
    if VBITS < 4:
        tl.store(out + 2 * VW, finish_plane(acc2, sums, cols, safe, 2, VW, VG), mask=row_live)
        tl.store(out + 3 * VW, finish_plane(acc3, sums, cols, safe, 3, VW, VG), mask=row_live)
    tl.store(LSE + row, tl.where(total > 0, (m + tl.log2(safe)) * LN2, float("-inf")), mask=head < G)


@triton.jit
def merge_partials(
    lse0, out0, OUT, LSE, bh, S, G, offs_g, offs_d, g_live,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Log-sum-exp merge of one partial result (``lse0`` ``[BLOCK_G]`` in base e, normalised
    ``out0`` ``[BLOCK_G, D]``; ``-inf`` and zeros for none) with the ``S`` splits of (batch row,
    KV head) ``bh`` in ``OUT``/``LSE``: ``(out [BLOCK_G, D], lse [BLOCK_G])``."""
    offs_s = tl.arange(0, BLOCK_S)
    top = lse0
    for s0 in range(0, S, BLOCK_S):
        s = s0 + offs_s
        live = (s < S)[:, None] & g_live[None, :]
        lse = tl.load(LSE + (bh * S + s[:, None]) * G + offs_g[None, :], mask=live, other=float("-inf"))
        top = tl.maximum(top, tl.max(lse, 0))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weight_sum = tl.exp(lse0 - top_safe)
    acc = out0 * weight_sum[:, None]
    for s in range(0, S):
        lse = tl.load(LSE + (bh * S + s) * G + offs_g, mask=g_live, other=float("-inf"))
        w = tl.exp(lse - top_safe)
        acc += w[:, None] * tl.load(
            OUT + ((bh * S + s) * G + offs_g[:, None]) * D + offs_d[None, :], mask=g_live[:, None]
        )
        weight_sum += w
    safe = tl.where(weight_sum > 0, weight_sum, 1.0)
    return acc / safe[:, None], tl.where(weight_sum > 0, top_safe + tl.log(safe), float("-inf"))


@triton.jit
def merge_splits(OUT, LSE, MERGED, TOTAL, S, G, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    """Log-sum-exp merge of the ``S`` splits of one (batch row, KV head): ``[S, G, D] -> [G, D]``."""
    bh = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_live = offs_g < G
    none = tl.full([BLOCK_G], float("-inf"), tl.float32)
    merged, total = merge_partials(
        none, tl.zeros([BLOCK_G, D], tl.float32), OUT, LSE, bh, S, G, offs_g, offs_d, g_live, D, BLOCK_G, BLOCK_S
    )
    tl.store(MERGED + (bh * G + offs_g[:, None]) * D + offs_d[None, :], merged, mask=g_live[:, None])
    tl.store(TOTAL + bh * G + offs_g, total, mask=g_live)


@triton.jit
def full_precision_segment(
    m, total, acc, q, K, V, n, stride_b, stride_h, stride_t, b, h, bias_row, scaling_log2,
    D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Online softmax over ``n`` full-precision tokens of a ``[B, H_kv, n, D]`` pair ``K``/``V``
    (same strides, channels contiguous) for batch row ``b`` and KV head ``h``, in float32:
    ``(max, denominator, acc)``. ``bias_row`` points at these tokens' additive biases."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    for t0 in range(0, n, BLOCK_T):
        t = t0 + offs_t
        live = t < n
        rows = b * stride_b + h * stride_h + t[:, None] * stride_t + offs_d[None, :]
        k = tl.load(K + rows, mask=live[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling_log2
        if HAS_BIAS:
            s += tl.load(bias_row + t, mask=live, other=float("-inf"))[None, :] * LOG2E
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        v = tl.load(V + rows, mask=live[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        total = total * alpha + tl.sum(p, 1)
        m = m_new
    return m, total, acc


# sizes and batch/head strides change from step to step: one compiled variant serves them all
@triton.jit(do_not_specialize=["NF", "FB", "FH", "NS", "SB", "SH", "NN", "NB", "NH", "S"])
def finish_decode(
    Q, FK, FV, NF, FB, FH, FT, SK, SV, NS, SB, SH, ST, NK, NV, NN, NB, NH, NT,
    BIAS, OUT, LSE, S, HKV, G, scaling_log2, OUTPUT,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """One program per (batch row, KV head): attention over the full-precision tokens (three
    ``[B, H_kv, n, D]`` segments with their batch, head and token strides: kept ``NF``, staged
    ``NS`` and new ``NN`` tokens), merged by log-sum-exp with the ``S`` splits of the packed region (``OUT``
    ``[B*H_kv, S, G, D]``, ``LSE`` in base e), written to ``OUTPUT`` ``[B, H_kv*G, D]`` in its
    dtype. ``BIAS``: additive float32 ``[B, NF+NS+NN]`` over the segments in that order."""
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_live = offs_g < G
    q = tl.load(Q + (bh * G + offs_g[:, None]) * D + offs_d[None, :], mask=g_live[:, None], other=0.0)
    q = q.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    bias_row = BIAS + b * (NF + NS + NN)
    m, total, acc = full_precision_segment(
        m, total, acc, q, FK, FV, NF, FB, FH, FT, b, h, bias_row, scaling_log2, D, BLOCK_T, HAS_BIAS
    )
    m, total, acc = full_precision_segment(
        m, total, acc, q, SK, SV, NS, SB, SH, ST, b, h, bias_row + NF, scaling_log2, D, BLOCK_T, HAS_BIAS
    )
    m, total, acc = full_precision_segment(
        m, total, acc, q, NK, NV, NN, NB, NH, NT, b, h, bias_row + NF + NS, scaling_log2, D, BLOCK_T, HAS_BIAS
    )
    # the full-precision part as one more partial result: normalised output and base-e lse
    safe = tl.where(total > 0, total, 1.0)
    fp_lse = tl.where(total > 0, (m + tl.log2(safe)) * LN2, float("-inf"))
    out, _ = merge_partials(
        fp_lse, acc / safe[:, None], OUT, LSE, bh, S, G, offs_g, offs_d, g_live, D, BLOCK_G, BLOCK_S
    )
    target = OUTPUT + (bh * G + offs_g[:, None]) * D + offs_d[None, :]
    tl.store(target, out.to(OUTPUT.dtype.element_ty), mask=g_live[:, None])
