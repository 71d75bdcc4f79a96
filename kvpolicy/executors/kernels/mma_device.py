"""Gluon kernel of the fused decode executor: 2-bit codes go from global memory to the matrix
units without passing through shared memory (imported only where Gluon is, Triton >= 3.5).

Triton picks register layouts itself and moves the unpacked codes through shared memory to
reach the matrix-unit operands (benchmarks/NOTES.md, v16). Gluon lets the kernel name every
layout, so each thread loads exactly the 32-bit words whose codes its operand registers hold:

* Scores ``Sᵀ = K Qᵀ`` [BLOCK_N tokens, 8 heads]: the key codes are the left operand ``K``
  ``[tokens, channels]``, so the 16 rows of ``mma.m16n8k16`` are all real tokens and only the
  8 columns hold (up to 8) heads: half the matrix products of ``S = Q Kᵀ``, whose 16 rows
  would hold 8 heads at most. A thread holds tokens ``lane // 4`` and ``+8`` of each 16-token
  tile and 4 channel slots of each 16-channel tile. Which channel sits in which slot is free
  (the contraction sums over channels), as long as the query uses the same order. So thread
  ``(t, c) = (lane // 4, lane % 4)`` loads words ``2c, 2c+1`` of its tokens (8 bytes: 32
  codes), and the channels follow from the words (:func:`channel`).
* Output ``Oᵀ = Vᵀ Pᵀ`` [channels, heads]: the value codes are the left operand ``Vᵀ``
  ``[channels, tokens]``; a thread holds 4 tokens of each 16-token tile (``2c, 2c+1, 2c+8,
  2c+9``) and one 32-bit word of each (word ``t``: 16 codes). ``Pᵀ`` is the right operand;
  the scores' accumulator holds each token's heads in one thread, the operand each head's
  tokens, so every 8x8 block of probabilities is transposed in registers (``movmatrix``,
  :func:`probs_operand`) and never touches shared memory.
* A code pair becomes float16 in two instructions, one for values (:func:`unpack_pairs_ptx`).

One warp per program, so nothing is shared between warps: the loop's shared memory holds
only the ``cp.async`` copies of the blocks ahead (``STAGES``). Key scales are folded into
the query (``q.(c*s + z) = (q*s).c + q.z``), value scales into the probabilities
(``p.(c*s + z) = (p*s).c + p.z``). Serves 2-bit keys (per-channel,
groups of 16+ tokens) and values (per-token, groups of 32, 64 or 128 channels), head
dimension 128 and up to 8 query heads per KV head: see :meth:`kvpolicy.executors.kernels.MmaSplits.serves`.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)
HEAD_DIM = gl.constexpr(128)  # channels per head served
WORDS = gl.constexpr(8)  # 32-bit words of 2-bit codes per token row
ROWS = gl.constexpr(8)  # query heads per KV head served (the 8 columns of mma.m16n8k16)


@gluon.constexpr_function
def _log2(x):
    return x.bit_length() - 1


@gluon.constexpr_function
def key_words_layout(block_n):
    """Key code words ``[BLOCK_N tokens, 8 words]``: thread ``(t, c)`` holds words ``2c, 2c+1``
    (adjacent: one 8-byte load) of token ``t`` of every 8-token tile."""
    regs = [[0, 1]] + [[8 << i, 0] for i in range(_log2(block_n // 8))]
    return gl.DistributedLinearLayout(regs, [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]], [], [], [block_n, WORDS])


@gluon.constexpr_function
def token_regs(block_n):
    """Register bases of the tokens of a block as the value operand holds them: ``2c + {0, 1}``
    and ``+8`` of every 16-token tile (lanes give ``2c``)."""
    return [1, 8] + [16 << i for i in range(_log2(block_n // 16))]


@gluon.constexpr_function
def value_words_layout(block_n):
    """Value code words ``[BLOCK_N tokens, 8 words]``: thread ``(t, c)`` holds word ``t`` of
    tokens ``2c, 2c+1, 2c+8, 2c+9`` of every 16-token tile (the left operand's tokens)."""
    regs = [[r, 0] for r in token_regs(block_n)]
    return gl.DistributedLinearLayout(regs, [[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]], [], [], [block_n, WORDS])


@gluon.constexpr_function
def token_scales_layout(block_n, groups):
    """Per-token value scales ``[BLOCK_N, groups]``: a token's groups adjacent in one thread
    (one load per token), tokens as the rows of the scores' accumulator hold them (``t``, ``t+8``
    of every 16-token tile; every ``c`` alike)."""
    regs = [[0, 1 << i] for i in range(_log2(groups))] + [[8 << i, 0] for i in range(_log2(block_n // 8))]
    return gl.DistributedLinearLayout(regs, [[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]], [], [], [block_n, groups])


@gluon.constexpr_function
def query_layout():
    """The query ``[8 rows, 128 channels]`` as the key tiles need it: thread ``(t, c)`` holds
    row ``t``, channels ``8c .. 8c+7`` of each 32-channel plane (one 16-byte load of scales)."""
    regs = [[0, 1], [0, 2], [0, 4], [0, 32], [0, 64]]
    return gl.DistributedLinearLayout(regs, [[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]], [], [], [ROWS, HEAD_DIM])


@gluon.constexpr_function
def unpack_pairs_ptx(exact, half, subnormal=False):
    """PTX turning two words (``$8``: element 0, ``$9``: element 1) into 8 float16 pairs:
    output ``2*i + b`` holds plane ``i`` of byte ``2*half + b`` of each word (low half from ``$8``).

    ``prmt`` puts bytes ``2*half, 2*half + 1`` of both words into one register's two 16-bit
    halves and ``lop3`` keeps a plane's two bits where they are (bits ``2i``, ``2i + 1``):

    * ``subnormal``: with a zero exponent, as the subnormal ``c * 2**(2i - 24)``, exact, in one
      instruction; the caller scales the products back by ``2**(24 - 2i)`` (values: see
      :func:`packed_decode_mma`).
    * otherwise set into the mantissa of ``2**(10 - 2i)`` (exponent bits ``25 - 2i``):
      ``2**(10 - 2i) + c`` exactly. ``exact`` subtracts that in one ``add.f16x2`` per pair;
      otherwise the caller takes it off on the matrix units (keys: :func:`key_offsets`).

    Half a word's codes per call, so that the tiles of one half can be consumed before the
    other half is unpacked.
    """
    lines = [
        ".reg .b32 w, w8, t, m<4>, o<4>, z<4>;",
        f"prmt.b32 w, $8, $9, {0x7632 if half else 0x5410:#06x};",
        "shr.u32 w8, w, 8;",
    ]
    for i in range(4):
        lines.append(f"mov.b32 m{i}, {(3 << 2 * i) * 0x10001:#010x};")
        lines.append(f"mov.b32 o{i}, {0 if subnormal else ((25 - 2 * i) << 10) * 0x10001:#010x};")
        lines.append(f"mov.b32 z{i}, {(0x8000 | (25 - 2 * i) << 10) * 0x10001:#010x};")
    for i in range(4):
        for b, src in enumerate(["w", "w8"]):
            if exact and not subnormal:
                lines.append(f"lop3.b32 t, {src}, m{i}, o{i}, 0xEA;")
                lines.append(f"add.rn.f16x2 ${2 * i + b}, t, z{i};")
            else:
                lines.append(f"lop3.b32 ${2 * i + b}, {src}, m{i}, o{i}, 0xEA;")
    return "{\n" + "\n".join(lines) + "\n}"


@gluon.jit
def unpack(words, exact: gl.constexpr, half: gl.constexpr, subnormal: gl.constexpr = False):
    """8 float16 tensors of the shape and layout of ``words`` (int32, two adjacent elements
    per thread paired): tensor ``2*i + b`` holds plane ``i`` of byte ``2*half + b``, as
    ``c * 2**(2i - 24)`` if ``subnormal``, else ``c`` if ``exact``, else ``2**(10 - 2i) + c``."""
    return gl.inline_asm_elementwise(
        unpack_pairs_ptx(exact, half, subnormal), "=r," * 8 + "r,r", [words], dtype=(gl.float16,) * 8,
        is_pure=True, pack=2,
    )  # fmt: skip


@gluon.jit
def value_tile(x0, x1, layout: gl.constexpr):
    """Two ``[BLOCK_N, 8]`` unpacked planes as one value operand tile ``[16, BLOCK_N]``:
    index ``8*j + word`` (``j`` 0 for ``x0``); only registers are renamed."""
    both = gl.permute(gl.join(x0, x1), (2, 1, 0))
    return gl.convert_layout(gl.reshape(both, [16, x0.shape[0]]), layout, assert_trivial=True)


@gluon.jit
def channel(j: gl.constexpr, k):
    """Channel of slot ``k`` (0-15) of operand tile ``j`` (keys: contraction slot; values: row).
    Tile ``j`` joins outputs ``j - j % 2, j - j % 2 + 1`` of ``unpack(.., half=j % 2)``
    (:func:`key_tile`, :func:`value_tile`): plane ``j // 2`` of bytes ``2*(j%2) + k // 8`` of
    word ``k % 8``, and byte ``y`` of word ``w`` plane ``i`` holds channel ``4w + y + 32i``
    (:func:`kvpolicy.quantizers.native.pack_codes`)."""
    return 4 * (k % 8) + 2 * (j % 2) + k // 8 + 32 * (j // 2)


@gluon.jit
def key_tile(x0, x1, layout: gl.constexpr):
    """Two ``[BLOCK_N, 8]`` unpacked planes as one key operand tile ``[BLOCK_N tokens, 16 slots]``:
    slot ``8*j + word`` (``j`` 0 for ``x0``); only registers are renamed."""
    both = gl.reshape(gl.permute(gl.join(x0, x1), (0, 2, 1)), [x0.shape[0], 16])
    return gl.convert_layout(both, layout, assert_trivial=True)


@gluon.jit
def query_tile(x, j: gl.constexpr, layout: gl.constexpr):
    """Key tile ``j``'s right operand ``[16 slots, 8 rows]`` from ``[8, 128]`` in
    :func:`query_layout`, channels in :func:`channel` order; only registers are renamed."""
    x = gl.reshape(x, [ROWS, 4, 4, 2, 2, 2])  # channel = 32i + 8c + 4e + 2h + y
    x = gl.permute(x, (0, 5, 2, 3, 1, 4))  # row, y, c, e, i, h
    x = gl.reshape(x, [ROWS, 16, 2, 2, 2])  # slot 8y + 2c + e; tile j = 2i + h = 4 * i1 + 2 * i0 + h
    h0, h1 = gl.split(x)
    x = h0 if j % 2 == 0 else h1
    i0, i1 = gl.split(x)
    x = i0 if (j // 2) % 2 == 0 else i1
    i0, i1 = gl.split(x)
    x = i0 if j // 4 == 0 else i1
    return gl.convert_layout(gl.permute(x, (1, 0)), layout, assert_trivial=True)


@gluon.jit
def key_offsets(offsets, qs, j: gl.constexpr, lhs: gl.constexpr, rhs: gl.constexpr):
    """Adds ``-2**(10 - 2i) * sum_k qs[k]`` of key tile ``j`` (plane ``i = j // 2``) to every
    row of ``offsets`` ``[16, 8]``: what the codes' offsets (:func:`unpack`) add to the scores."""
    return mma_v2(gl.full([16, 16], -(1024 >> (2 * (j // 2))), gl.float16, lhs), query_tile(qs, j, rhs), offsets)


@gluon.jit
def repeat_rows(x, n: gl.constexpr, layout: gl.constexpr):
    """``[16, 8]`` -> ``[n, 8]``: ``x`` stacked ``n // 16`` times; only registers are copied."""
    for _ in gl.static_range(_log2(n // 16)):
        x = gl.reshape(gl.permute(gl.join(x, x), (2, 0, 1)), [2 * x.shape[0], x.shape[1]])
    return gl.convert_layout(x, layout, assert_trivial=True)


@gluon.jit
def row_tile(x, k: gl.constexpr):
    """Rows ``16k .. 16k + 15`` of ``x`` ``[n]`` or ``[n, m]`` whose 16-row tiles are registers:
    only registers are renamed."""
    bits: gl.constexpr = _log2(x.shape[0] // 16)
    for i in gl.static_range(bits):
        if len(x.shape) == 1:
            lo, hi = gl.split(gl.permute(gl.reshape(x, [2, x.shape[0] // 2]), (1, 0)))
        else:
            lo, hi = gl.split(gl.permute(gl.reshape(x, [2, x.shape[0] // 2, x.shape[1]]), (1, 2, 0)))
        x = hi if (k >> (bits - 1 - i)) % 2 == 1 else lo
    return x


@gluon.jit
def fold_rows(acc, p, v, layout: gl.constexpr):
    """``acc`` ``[16, 8]`` plus each 16-row tile of ``p * v[:, None]`` (``p`` ``[n, 8]``, ``v``
    ``[n]``, or ``p`` alone if ``v`` is None), one chain within each thread: the sums over the
    block's tokens are completed over lanes once, after the loop."""
    for k in gl.static_range(p.shape[0] // 16):
        tile = gl.convert_layout(row_tile(p, k), layout, assert_trivial=True)
        if v is None:
            acc = acc + tile
        else:
            vk = gl.convert_layout(row_tile(v, k), gl.SliceLayout(1, layout), assert_trivial=True)
            acc = acc + tile * vk[:, None]
    return acc


@gluon.jit
def group_scales(x, tok: gl.constexpr, NG: gl.constexpr):
    """``[BLOCK_N, NG]`` per-token values of ``NG`` (1, 2 or 4) value groups -> 4 ``[BLOCK_N]``
    float32 tensors, group ``g * NG // 4`` in position ``g`` (repeated where ``NG < 4``)."""
    x = x.to(gl.float32)
    if NG == 1:
        g0 = gl.convert_layout(gl.reshape(x, [x.shape[0]]), tok, assert_trivial=True)
        return g0, g0, g0, g0
    elif NG == 2:
        g0, g1 = gl.split(x)
        g0 = gl.convert_layout(g0, tok, assert_trivial=True)
        g1 = gl.convert_layout(g1, tok, assert_trivial=True)
        return g0, g0, g1, g1
    else:
        e, o = gl.split(gl.reshape(x, [x.shape[0], 2, 2]))
        g0, g2 = gl.split(e)
        g1, g3 = gl.split(o)
        return (
            gl.convert_layout(g0, tok, assert_trivial=True), gl.convert_layout(g1, tok, assert_trivial=True),
            gl.convert_layout(g2, tok, assert_trivial=True), gl.convert_layout(g3, tok, assert_trivial=True),
        )  # fmt: skip


TRANSPOSE_PTX = gl.constexpr("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;")


@gluon.jit
def probs_operand(p, vs, rhs: gl.constexpr):
    """``p * s`` float16 ``[BLOCK_N, 8]`` as the value tiles' right operand: the scores'
    accumulator layout holds a token row's heads in a thread, the operand a head's tokens, so
    each 8x8 block is transposed in registers (``movmatrix``) and the result renamed."""
    x = gl.inline_asm_elementwise(
        TRANSPOSE_PTX, "=r,r", [(p * vs[:, None]).to(gl.float16)], dtype=gl.float16, is_pure=True, pack=2
    )
    # element (8a + t, u) now holds token 8a + u of head t
    x = gl.reshape(gl.permute(gl.reshape(x, [x.shape[0] // 8, 8, 8]), (0, 2, 1)), [x.shape[0], 8])
    return gl.convert_layout(x, rhs, assert_trivial=True)


@gluon.jit
def key_inputs(
    first, bh, N, KG: gl.constexpr, qc, KC, KS, KZ, stage, kc_s, ks_s, kz_s,
    BLOCK_N: gl.constexpr, STAGED: gl.constexpr,
):  # fmt: skip
    """A block's key words, scales and zeros in the operand layouts, from shared-memory
    ``stage`` (``STAGED``, see :func:`stage_block`) or straight from global memory."""
    kwl: gl.constexpr = key_words_layout(BLOCK_N)
    if STAGED:
        ql: gl.constexpr = query_layout()
        kcodes = kc_s.index(stage).load(kwl)
        ks = ks_s.index(stage).load(gl.SliceLayout(0, ql))
        kz = kz_s.index(stage).load(gl.SliceLayout(0, ql))
    else:
        kn = first + gl.arange(0, BLOCK_N, gl.SliceLayout(1, kwl))
        kcodes = gl.load(KC + (bh * N + kn[:, None]) * WORDS + gl.arange(0, WORDS, gl.SliceLayout(0, kwl))[None, :])
        key_row = (bh * (N // KG) + first // KG) * HEAD_DIM + qc
        ks = gl.load(KS + key_row)
        kz = gl.load(KZ + key_row)
    return kcodes, ks, kz


@gluon.jit
def value_rows(
    first, bh, N, NV, VROWS, layout: gl.constexpr, BLOCK_N: gl.constexpr, GATHER: gl.constexpr, end=None
):  # fmt: skip
    """``(value row of each key or -1, its flat row)`` of a block's tokens in ``layout``: the
    tokens themselves unless ``GATHER`` (values are per-token rows, so each key's may be read
    from anywhere). Tokens from ``end`` on (if given) are not looked up: row 0."""
    rows = first + gl.arange(0, BLOCK_N, layout)
    if GATHER:
        if end is None:
            rows = gl.load(VROWS + rows)
        else:
            rows = gl.load(VROWS + rows, mask=rows < end, other=0)
        return rows, bh * NV + gl.maximum(rows, 0)
    return rows, bh * N + rows


@gluon.jit
def value_inputs(
    first, bh, N, NV, VC, VS, VZ, VROWS, stage, vc_s, vs_s, vz_s,
    BLOCK_N: gl.constexpr, NG: gl.constexpr, GATHER: gl.constexpr, STAGED: gl.constexpr,
):  # fmt: skip
    """A block's value words and per-token scales and zeros in the operand and accumulator
    layouts, from shared-memory ``stage`` (``STAGED``) or straight from global memory."""
    vwl: gl.constexpr = value_words_layout(BLOCK_N)
    tsl: gl.constexpr = token_scales_layout(BLOCK_N, NG)
    if STAGED:
        return vc_s.index(stage).load(vwl), vs_s.index(stage).load(tsl), vz_s.index(stage).load(tsl)
    _, vrow = value_rows(first, bh, N, NV, VROWS, gl.SliceLayout(1, vwl), BLOCK_N, GATHER)
    vcodes = gl.load(VC + vrow[:, None] * WORDS + gl.arange(0, WORDS, gl.SliceLayout(0, vwl))[None, :])
    _, srow = value_rows(first, bh, N, NV, VROWS, gl.SliceLayout(1, tsl), BLOCK_N, GATHER)
    at = srow[:, None] * NG + gl.arange(0, NG, gl.SliceLayout(0, tsl))[None, :]
    return vcodes, gl.load(VS + at), gl.load(VZ + at)


@gluon.jit
def stage_block(
    first, end, bh, N, NV, KG: gl.constexpr, KC, KS, KZ, VC, VS, VZ, VROWS, stage, kc_s, ks_s, kz_s, vc_s, vs_s, vz_s,
    BLOCK_N: gl.constexpr, NG: gl.constexpr, GATHER: gl.constexpr,
):  # fmt: skip
    """Starts copying a block's bytes into shared-memory ``stage`` (``cp.async``, 16, 8 and
    ``2 * NG`` bytes per copy); a block past ``end`` copies nothing."""
    words: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [1, 1], [1, 0])
    rows = first + gl.arange(0, BLOCK_N, gl.SliceLayout(1, words))
    live = (rows < end)[:, None]
    _, vrows = value_rows(first, bh, N, NV, VROWS, gl.SliceLayout(1, words), BLOCK_N, GATHER, end)
    w = gl.arange(0, WORDS, gl.SliceLayout(0, words))[None, :]
    async_copy.async_copy_global_to_shared(kc_s.index(stage), KC + (bh * N + rows[:, None]) * WORDS + w, live)
    async_copy.async_copy_global_to_shared(vc_s.index(stage), VC + vrows[:, None] * WORDS + w, live)
    channels: gl.constexpr = gl.BlockedLayout([4], [32], [1], [0])
    c = gl.arange(0, HEAD_DIM, channels)
    key_row = (bh * (N // KG) + first // KG) * HEAD_DIM + c
    async_copy.async_copy_global_to_shared(ks_s.index(stage), KS + key_row, c < HEAD_DIM * (first < end))
    async_copy.async_copy_global_to_shared(kz_s.index(stage), KZ + key_row, c < HEAD_DIM * (first < end))
    groups: gl.constexpr = gl.BlockedLayout([1, NG], [32, 1], [1, 1], [1, 0])
    live = (first + gl.arange(0, BLOCK_N, gl.SliceLayout(1, groups)) < end)[:, None]
    _, vrows = value_rows(first, bh, N, NV, VROWS, gl.SliceLayout(1, groups), BLOCK_N, GATHER, end)
    at = vrows[:, None] * NG + gl.arange(0, NG, gl.SliceLayout(0, groups))[None, :]
    async_copy.async_copy_global_to_shared(vs_s.index(stage), VS + at, live)
    async_copy.async_copy_global_to_shared(vz_s.index(stage), VZ + at, live)


@gluon.jit
def attend_block(
    first, bh, b, N, NV, KG: gl.constexpr, q, qc, KC, KS, KZ, VC, VS, VZ, VROWS, BIAS,
    stage, kc_s, ks_s, kz_s, vc_s, vs_s, vz_s,
    m, total, zs0, zs1, zs2, zs3, a0, a1, a2, a3, a4, a5, a6, a7,
    BLOCK_N: gl.constexpr, NG: gl.constexpr, HAS_BIAS: gl.constexpr, GATHER: gl.constexpr,
    EXACT_KEYS: gl.constexpr, STAGED: gl.constexpr,
):  # fmt: skip
    """One block of ``BLOCK_N`` tokens from ``first``: the online-softmax state, updated. Its
    inputs come from shared-memory ``stage`` (``STAGED``) or from global memory."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    lhs: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    rhs: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
    tok: gl.constexpr = gl.SliceLayout(1, mma)  # the scores' rows: tokens
    heads: gl.constexpr = gl.SliceLayout(0, mma)  # their columns, and the output's

    # keys: scores Sᵀ = K Qᵀ [BLOCK_N, 8] against this block's key group, its scales folded into
    # the query; every row starts from its head's q . z and the codes' offsets
    kcodes, ks, kz = key_inputs(first, bh, N, KG, qc, KC, KS, KZ, stage, kc_s, ks_s, kz_s, BLOCK_N, STAGED)
    row_term = gl.convert_layout(gl.sum(q * kz.to(gl.float32)[None, :], 1), heads)  # q . z
    qs = (q * ks.to(gl.float32)[None, :]).to(gl.float16)
    start = gl.zeros([16, ROWS], gl.float32, mma) + row_term[None, :]
    if not EXACT_KEYS:
        start = key_offsets(start, qs, 0, lhs, rhs)
        start = key_offsets(start, qs, 1, lhs, rhs)
        start = key_offsets(start, qs, 2, lhs, rhs)
        start = key_offsets(start, qs, 3, lhs, rhs)
        start = key_offsets(start, qs, 4, lhs, rhs)
        start = key_offsets(start, qs, 5, lhs, rhs)
        start = key_offsets(start, qs, 6, lhs, rhs)
        start = key_offsets(start, qs, 7, lhs, rhs)
    s = repeat_rows(start, BLOCK_N, mma)
    u = unpack(kcodes, EXACT_KEYS, 0)
    s = mma_v2(key_tile(u[0], u[1], lhs), query_tile(qs, 0, rhs), s)
    s = mma_v2(key_tile(u[2], u[3], lhs), query_tile(qs, 2, rhs), s)
    s = mma_v2(key_tile(u[4], u[5], lhs), query_tile(qs, 4, rhs), s)
    s = mma_v2(key_tile(u[6], u[7], lhs), query_tile(qs, 6, rhs), s)
    u = unpack(kcodes, EXACT_KEYS, 1)
    s = mma_v2(key_tile(u[0], u[1], lhs), query_tile(qs, 1, rhs), s)
    s = mma_v2(key_tile(u[2], u[3], lhs), query_tile(qs, 3, rhs), s)
    s = mma_v2(key_tile(u[4], u[5], lhs), query_tile(qs, 5, rhs), s)
    s = mma_v2(key_tile(u[6], u[7], lhs), query_tile(qs, 7, rhs), s)
    vcodes, vsc, vzc = value_inputs(
        first, bh, N, NV, VC, VS, VZ, VROWS, stage, vc_s, vs_s, vz_s, BLOCK_N, NG, GATHER, STAGED
    )
    if GATHER:  # a key without a value row
        rows, _ = value_rows(first, bh, N, NV, VROWS, tok, BLOCK_N, GATHER)
        s = gl.where((rows >= 0)[:, None], s, float("-inf"))
    if HAS_BIAS:
        s += gl.load(BIAS + b * N + first + gl.arange(0, BLOCK_N, tok))[:, None] * LOG2E

    # online softmax; the accumulators are rescaled only in blocks that raise a head's maximum
    m_new = gl.maximum(m, gl.max(s, 0))
    if gl.max((m_new > m).to(gl.int32), 0) > 0:
        alpha = gl.exp2(m - gl.where(m_new == float("-inf"), 0.0, m_new))
        total *= alpha[None, :]
        zs0 *= alpha[None, :]
        if NG >= 2:
            zs2 *= alpha[None, :]
        if NG == 4:
            zs1 *= alpha[None, :]
            zs3 *= alpha[None, :]
        a0 *= alpha[None, :]
        a1 *= alpha[None, :]
        a2 *= alpha[None, :]
        a3 *= alpha[None, :]
        a4 *= alpha[None, :]
        a5 *= alpha[None, :]
        a6 *= alpha[None, :]
        a7 *= alpha[None, :]
        m = m_new
    p = gl.exp2(s - gl.where(m == float("-inf"), 0.0, m)[None, :])
    total = fold_rows(total, p, None, mma)

    # values: per-token scales folded into the probabilities
    vs0, vs1, vs2, vs3 = group_scales(vsc, tok, NG)
    vz0, vz1, vz2, vz3 = group_scales(vzc, tok, NG)
    zs0 = fold_rows(zs0, p, vz0, mma)
    r0 = probs_operand(p, vs0, rhs)
    if NG == 1:
        r1 = r0
        r2 = r0
        r3 = r0
    elif NG == 2:
        zs2 = fold_rows(zs2, p, vz2, mma)
        r1 = r0
        r2 = probs_operand(p, vs2, rhs)
        r3 = r2
    else:
        zs1 = fold_rows(zs1, p, vz1, mma)
        zs2 = fold_rows(zs2, p, vz2, mma)
        zs3 = fold_rows(zs3, p, vz3, mma)
        r1 = probs_operand(p, vs1, rhs)
        r2 = probs_operand(p, vs2, rhs)
        r3 = probs_operand(p, vs3, rhs)
    # value tile j holds plane j // 2 (channels 32 * (j // 2) + ..), of value group r_(j // 2)
    u = unpack(vcodes, False, 0, True)  # subnormal: c * 2**(2i - 24)
    a0 = mma_v2(value_tile(u[0], u[1], lhs), r0, a0)
    a2 = mma_v2(value_tile(u[2], u[3], lhs), r1, a2)
    a4 = mma_v2(value_tile(u[4], u[5], lhs), r2, a4)
    a6 = mma_v2(value_tile(u[6], u[7], lhs), r3, a6)
    u = unpack(vcodes, False, 1, True)
    a1 = mma_v2(value_tile(u[0], u[1], lhs), r0, a1)
    a3 = mma_v2(value_tile(u[2], u[3], lhs), r1, a3)
    a5 = mma_v2(value_tile(u[4], u[5], lhs), r2, a5)
    a7 = mma_v2(value_tile(u[6], u[7], lhs), r3, a7)
    return m, total, zs0, zs1, zs2, zs3, a0, a1, a2, a3, a4, a5, a6, a7


@gluon.jit
def packed_decode_mma(
    Q, KC, KS, KZ, VC, VS, VZ, VROWS, BIAS, OUT, LSE,
    N, NV, HKV, G, scaling_log2, tokens_per_split,
    KG: gl.constexpr, VG: gl.constexpr, BLOCK_N: gl.constexpr, HAS_BIAS: gl.constexpr, GATHER: gl.constexpr,
    EXACT_KEYS: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """One warp: one (batch row, KV head) and tokens ``[start, start + tokens_per_split)``.

    Same contract as :func:`kvpolicy.executors.kernels.triton_device.packed_decode` with one partial result per
    split (``OUT`` ``[B*H_kv, S, G, D]`` normalised, ``LSE`` ``[B*H_kv, S, G]`` in base e): ``KC``
    and ``VC`` are the codes viewed as int32 words ``[.., n, 8]``, ``KS``/``KZ`` ``[.., n // KG, D]``,
    ``VS``/``VZ`` ``[.., NV, D // VG]``; ``BLOCK_N`` divides ``KG`` (so ``N`` too, a whole number
    of key groups) and ``tokens_per_split``.
    ``EXACT_KEYS``: subtract each key code's offset in the unpacking rather than once per row
    (:func:`key_offsets`). ``STAGES``: blocks in flight through shared memory (``cp.async``,
    0: none, each block read straight into registers; needs ``VG <= 64``). Rows past ``G`` are
    computed but never written.
    """
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    NG: gl.constexpr = HEAD_DIM // VG  # value groups per token
    ql: gl.constexpr = query_layout()
    heads: gl.constexpr = gl.SliceLayout(0, mma)  # the scores' and the output's columns

    bh = gl.program_id(0)
    split = gl.program_id(1)
    splits = gl.num_programs(1)
    b = bh // HKV
    start = split * tokens_per_split
    end = gl.minimum(start + tokens_per_split, N)

    qr = gl.arange(0, ROWS, gl.SliceLayout(1, ql))
    qc = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, ql))
    q = gl.load(Q + (bh * G + qr[:, None]) * HEAD_DIM + qc[None, :], mask=(qr < G)[:, None], other=0.0)
    q = q.to(gl.float32) * scaling_log2

    m = gl.full([ROWS], float("-inf"), gl.float32, heads)
    # sums over tokens, folded to 16 rows in each thread and summed over lanes after the loop
    total = gl.zeros([16, ROWS], gl.float32, mma)  # of p
    zs0 = gl.zeros([16, ROWS], gl.float32, mma)  # of p * z of plane i's value group
    zs1 = gl.zeros([16, ROWS], gl.float32, mma)
    zs2 = gl.zeros([16, ROWS], gl.float32, mma)
    zs3 = gl.zeros([16, ROWS], gl.float32, mma)
    a0 = gl.zeros([16, ROWS], gl.float32, mma)  # Oᵀ, one accumulator per 16-channel tile
    a1 = gl.zeros([16, ROWS], gl.float32, mma)
    a2 = gl.zeros([16, ROWS], gl.float32, mma)
    a3 = gl.zeros([16, ROWS], gl.float32, mma)
    a4 = gl.zeros([16, ROWS], gl.float32, mma)
    a5 = gl.zeros([16, ROWS], gl.float32, mma)
    a6 = gl.zeros([16, ROWS], gl.float32, mma)
    a7 = gl.zeros([16, ROWS], gl.float32, mma)
    if STAGES == 0:
        for first in range(start, end, BLOCK_N):  # (the pointers stand in for the unused stages)
            m, total, zs0, zs1, zs2, zs3, a0, a1, a2, a3, a4, a5, a6, a7 = attend_block(
                first, bh, b, N, NV, KG, q, qc, KC, KS, KZ, VC, VS, VZ, VROWS, BIAS, 0, KC, KS, KZ, VC, VS, VZ,
                m, total, zs0, zs1, zs2, zs3, a0, a1, a2, a3, a4, a5, a6, a7,
                BLOCK_N, NG, HAS_BIAS, GATHER, EXACT_KEYS, False,
            )  # fmt: skip
    else:
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])  # per stage
        kc_s = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, WORDS], flat)
        vc_s = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, WORDS], flat)
        vs_s = gl.allocate_shared_memory(VS.dtype.element_ty, [STAGES, BLOCK_N, NG], flat)
        vz_s = gl.allocate_shared_memory(VZ.dtype.element_ty, [STAGES, BLOCK_N, NG], flat)
        ks_s = gl.allocate_shared_memory(KS.dtype.element_ty, [STAGES, HEAD_DIM], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        kz_s = gl.allocate_shared_memory(KZ.dtype.element_ty, [STAGES, HEAD_DIM], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        for i in gl.static_range(STAGES - 1):
            stage_block(
                start + i * BLOCK_N, end, bh, N, NV, KG, KC, KS, KZ, VC, VS, VZ, VROWS,
                i, kc_s, ks_s, kz_s, vc_s, vs_s, vz_s, BLOCK_N, NG, GATHER,
            )  # fmt: skip
            async_copy.commit_group()
        for i in range(0, gl.cdiv(end - start, BLOCK_N)):
            gl.thread_barrier()  # every lane is done with the stage refilled now
            stage_block(
                start + (i + STAGES - 1) * BLOCK_N, end, bh, N, NV, KG, KC, KS, KZ, VC, VS, VZ, VROWS,
                (i + STAGES - 1) % STAGES, kc_s, ks_s, kz_s, vc_s, vs_s, vz_s, BLOCK_N, NG, GATHER,
            )  # fmt: skip
            async_copy.commit_group()
            async_copy.wait_group(STAGES - 1)
            gl.thread_barrier()  # and every lane's copies of this block are visible
            m, total, zs0, zs1, zs2, zs3, a0, a1, a2, a3, a4, a5, a6, a7 = attend_block(
                start + i * BLOCK_N, bh, b, N, NV, KG, q, qc, KC, KS, KZ, VC, VS, VZ, VROWS, BIAS,
                i % STAGES, kc_s, ks_s, kz_s, vc_s, vs_s, vz_s,
                m, total, zs0, zs1, zs2, zs3, a0, a1, a2, a3, a4, a5, a6, a7,
                BLOCK_N, NG, HAS_BIAS, GATHER, EXACT_KEYS, True,
            )  # fmt: skip

    total = gl.sum(total, 0)
    if NG == 4:
        zs1 = gl.sum(zs1, 0)
        zs3 = gl.sum(zs3, 0)
    if NG >= 2:
        zs2 = gl.sum(zs2, 0)
    zs0 = gl.sum(zs0, 0)
    if NG == 1:
        zs2 = zs0
    if NG <= 2:
        zs1 = zs0
        zs3 = zs2
    head = gl.arange(0, ROWS, heads)
    safe = gl.where(total > 0, total, 1.0)
    row = (bh * splits + split) * G
    gl.store(LSE + row + head, gl.where(total > 0, (m + gl.log2(safe)) * LN2, float("-inf")), mask=head < G)
    inv = (1.0 / safe)[None, :]
    h = head
    k = gl.arange(0, 16, gl.SliceLayout(1, mma))
    out = OUT + (row + h[None, :]) * HEAD_DIM
    live = (h < G)[None, :]
    # the value codes were c * 2**(2i - 24) in plane i (tiles 2i, 2i + 1): scaled back exactly
    gl.store(out + channel(0, k)[:, None], (a0 * 16777216.0 + zs0[None, :]) * inv, mask=live)
    gl.store(out + channel(1, k)[:, None], (a1 * 16777216.0 + zs0[None, :]) * inv, mask=live)
    gl.store(out + channel(2, k)[:, None], (a2 * 4194304.0 + zs1[None, :]) * inv, mask=live)
    gl.store(out + channel(3, k)[:, None], (a3 * 4194304.0 + zs1[None, :]) * inv, mask=live)
    gl.store(out + channel(4, k)[:, None], (a4 * 1048576.0 + zs2[None, :]) * inv, mask=live)
    gl.store(out + channel(5, k)[:, None], (a5 * 1048576.0 + zs2[None, :]) * inv, mask=live)
    gl.store(out + channel(6, k)[:, None], (a6 * 262144.0 + zs3[None, :]) * inv, mask=live)
    gl.store(out + channel(7, k)[:, None], (a7 * 262144.0 + zs3[None, :]) * inv, mask=live)
