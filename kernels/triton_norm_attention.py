"""Causal NormAttention in Triton: O = (Q Kᵀ ⊙ M) V, M[t, s] = λ^(t-s) for s ≤ t (λ = 1 without decay).

One kernel, `_scan_kernel`, computes the general form OUT = (A Bᵀ ⊙ M) C block by block:
inside a block of BLOCK_N tokens the masked quadratic form, across blocks a running
Bᵀ C state in fp32. Run forward in time it is the attention itself (A, B, C = Q, K, V)
and dQ (dO, V, K); run backward in time, with the mask transposed, it gives dK (V, dO, Q)
and dV (K, Q, dO). kernels/README.md derives the recurrences.

Parallelism: one program per (batch·head, tile of C's columns); the columns of C (and of
the state) are independent. When that is too few programs to fill the GPU (long
sequences, small batch), the sequence is also cut into segments: a first pass computes
each segment's own state, `_carry_kernel` turns those into each segment's incoming
state, and the scan then runs all segments at once (`segments` below).

Carried state: the scan may start from a given state (the tokens before this slice) and
hand out the state after its last token, both fp32 [D_A, D_C] per (batch, head); the
segmented path carries them through `_carry_kernel`. `CausalNormAttention` uses them for
`initial_state` / `output_final_state` (kernels/README.md, "Carried state").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import as_kernel_inputs, autotune, dot_precision, pow2

BLOCK_N = 64  # tokens per block; the quadratic part is BLOCK_N × BLOCK_N
PLAIN, SEGMENT_STATE, SEGMENT_SCAN = 0, 1, 2  # _scan_kernel's MODE


def _configs():
    # Compiled for sm_90 (bench/kernels.py --sass), all use HGMMA; at d=128 the first has no
    # spills in any mode, 4 warps with 64 columns spill with decay (the BLOCK_N² decay mask
    # takes registers). Wider tiles re-read A and B less, narrower ones give more programs.
    return [triton.Config({"BLOCK_C": bc}, num_warps=w, num_stages=s)
            for bc, w, s in [(64, 8, 2), (32, 4, 2), (64, 4, 2), (128, 8, 2), (128, 8, 1)]]


@autotune(_configs(), key=["DA", "DC", "HAS_DECAY", "REVERSE", "MODE", "HAS_INIT", "HAS_FINAL"])
@triton.jit
def _scan_kernel(A, B, C, OUT, STATES, LOG2_DECAY, INIT, FINAL,
                 sa_b, sa_h, sa_n, sb_b, sb_h, sb_n, sc_b, sc_h, sc_n, so_b, so_h, so_n,
                 N, H, DA, DC, SEG_BLOCKS,
                 HAS_DECAY: tl.constexpr, REVERSE: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
                 HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[bh] = (A[bh] B[bh]ᵀ ⊙ M) C[bh] over the blocks of segment program_id(2).

    A, B: [N, DA], C, OUT: [N, DC] per (batch, head), rows `s*_n` apart, last dim dense
    (so [B, N, H, D] layouts seen as [B, H, N, D] need no copy). MODE PLAIN: one segment,
    starting from INIT[bh] ([DA, DC] fp32, contiguous) with HAS_INIT, else from zero; with
    HAS_FINAL the state after the last token is written to FINAL[bh]. SEGMENT_STATE: only
    the segment's own final state, written to STATES[bh, seg] ([DA, DC] fp32), no OUT.
    SEGMENT_SCAN: OUT, starting from the incoming state in STATES[bh, seg] (`_carry_kernel`
    handles INIT and FINAL in the segmented path).
    """
    bh = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_C
    seg = tl.program_id(2)
    bi = bh // H
    hi = bh % H
    a_base = A + bi * sa_b + hi * sa_h
    b_base = B + bi * sb_b + hi * sb_h
    c_base = C + bi * sc_b + hi * sc_h
    o_base = OUT + bi * so_b + hi * so_h
    dt = C.dtype.element_ty

    r = tl.arange(0, BLOCK_N)
    ka = tl.arange(0, BLOCK_DA)
    kc = col0 + tl.arange(0, BLOCK_C)
    ka_ok = ka < DA
    kc_ok = kc < DC
    # Forward in time: output row t sees rows s ≤ t; backward: rows s ≥ t.
    if REVERSE:
        diff = r[None, :] - r[:, None]
    else:
        diff = r[:, None] - r[None, :]
    causal = diff >= 0
    if HAS_DECAY:
        log2_lam = tl.load(LOG2_DECAY + hi)
        # Clamped so that the discarded (non-causal) entries do not overflow to inf.
        intra = tl.where(causal, tl.exp2(tl.maximum(diff, 0).to(tl.float32) * log2_lam), 0.0)
        # A row's weight on the state, and a B row's weight entering it (README, "decay").
        if REVERSE:
            a_scale = tl.exp2((BLOCK_N - r).to(tl.float32) * log2_lam)
            b_scale = tl.exp2(r.to(tl.float32) * log2_lam)
        else:
            a_scale = tl.exp2((r + 1).to(tl.float32) * log2_lam)
        block_scale = tl.exp2(BLOCK_N * log2_lam)

    state_off = (bh * tl.num_programs(2) + seg) * DA * DC + ka[:, None] * DC + kc[None, :]
    state_mask = ka_ok[:, None] & kc_ok[None, :]
    carried_off = bh * DA * DC + ka[:, None] * DC + kc[None, :]  # INIT, FINAL: [BH, DA, DC]
    if MODE == 2:
        state = tl.load(STATES + state_off, mask=state_mask, other=0.0)
    elif HAS_INIT and MODE == 0:
        state = tl.load(INIT + carried_off, mask=state_mask, other=0.0)
    else:
        state = tl.zeros((BLOCK_DA, BLOCK_C), dtype=tl.float32)
    lo = seg * SEG_BLOCKS
    count = tl.minimum(SEG_BLOCKS, tl.cdiv(N, BLOCK_N) - lo)
    for j in range(0, count):
        if REVERSE:
            blk = lo + count - 1 - j
        else:
            blk = lo + j
        rows = blk * BLOCK_N + r
        row_ok = rows < N
        b = tl.load(b_base + rows[:, None] * sb_n + ka[None, :], mask=row_ok[:, None] & ka_ok[None, :], other=0.0)
        c = tl.load(c_base + rows[:, None] * sc_n + kc[None, :], mask=row_ok[:, None] & kc_ok[None, :], other=0.0)
        if HAS_DECAY:
            if not REVERSE:
                # The state leaves a block at its last real token (the last block may be
                # partial), so that a final state is Σ λ^(N-1-s) b_s c_sᵀ; full blocks: λ^(C-1-r).
                length = tl.minimum(BLOCK_N, N - blk * BLOCK_N)
                b_scale = tl.exp2(tl.maximum(length - 1 - r, 0).to(tl.float32) * log2_lam)
                block_scale = tl.exp2(length.to(tl.float32) * log2_lam)
            b_in = (b.to(tl.float32) * b_scale[:, None]).to(dt)
        else:
            b_in = b
        if MODE != 1:
            a = tl.load(a_base + rows[:, None] * sa_n + ka[None, :], mask=row_ok[:, None] & ka_ok[None, :], other=0.0)
            scores = tl.dot(a, tl.trans(b), input_precision=PREC)
            if HAS_DECAY:
                scores = scores * intra
                a_in = (a.to(tl.float32) * a_scale[:, None]).to(dt)
            else:
                scores = tl.where(causal, scores, 0.0)
                a_in = a
            out = tl.dot(scores.to(dt), c, input_precision=PREC)
            # Rows before this block (after it, in reverse) reach this block through the state.
            out = tl.dot(a_in, state.to(dt), acc=out, input_precision=PREC)
            tl.store(o_base + rows[:, None] * so_n + kc[None, :], out.to(dt), mask=row_ok[:, None] & kc_ok[None, :])
        if HAS_DECAY:
            state = state * block_scale
        state = tl.dot(tl.trans(b_in), c, acc=state, input_precision=PREC)
    if MODE == 1:
        tl.store(STATES + state_off, state, mask=state_mask)
    if MODE == 0 and HAS_FINAL:
        tl.store(FINAL + carried_off, state, mask=state_mask)


@triton.jit
def _carry_kernel(STATES, LOG2_DECAY, INIT, FINAL, H, NSEG, SIZE, SEG_LEN, LAST_LEN,
                  HAS_DECAY: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr,
                  HAS_FINAL: tl.constexpr, BLOCK: tl.constexpr):
    """In place over STATES[bh] ([NSEG, SIZE] fp32): each segment's own final state becomes
    the state entering it, P_next = λ^len · P + L (an exclusive scan in scan order), starting
    from INIT[bh] ([SIZE]) with HAS_INIT; with HAS_FINAL the state after the last segment
    goes to FINAL[bh]. A segment's own state is taken at its last real token, so stepping
    over the (possibly shorter) last segment takes λ^LAST_LEN. (Only forward scans carry
    an INIT: a reverse scan's blocks end at the padded length, not at a token.)"""
    bh = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < SIZE
    base = STATES + bh * NSEG * SIZE + offs
    if HAS_DECAY:
        log2_lam = tl.load(LOG2_DECAY + bh % H)
        seg_scale = tl.exp2(SEG_LEN * log2_lam)
        last_scale = tl.exp2(LAST_LEN * log2_lam)
    if HAS_INIT:
        carry = tl.load(INIT + bh * SIZE + offs, mask=ok, other=0.0)
    else:
        carry = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, NSEG):
        if REVERSE:
            s = NSEG - 1 - j
        else:
            s = j
        own = tl.load(base + s * SIZE, mask=ok, other=0.0)
        tl.store(base + s * SIZE, carry, mask=ok)
        if HAS_DECAY:
            if s == NSEG - 1:
                carry = carry * last_scale
            else:
                carry = carry * seg_scale
        carry += own
    if HAS_FINAL:
        tl.store(FINAL + bh * SIZE + offs, carry, mask=ok)


def segments_for(bh: int, dc: int, n: int, device: torch.device) -> int:
    """How many segments to cut the sequence into. Segmenting costs a second read of B and
    C (the state pass), so only when (batch·head, column tile) programs fill less than one
    wave of SMs; then enough segments for two programs per SM, each at least 8 blocks long."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = bh * triton.cdiv(dc, 64)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(n, BLOCK_N) // 8))


def scan(a, b, c, log2_decay=None, reverse: bool = False, segments: int | None = None, initial=None,
         final: bool = False):
    """(A Bᵀ ⊙ M) C for [B, H, N, ·] tensors with a dense last dim; M causal (reverse: anti-causal).
    The output has C's memory layout.

    segments: how many pieces of the sequence run in parallel (None: `segments_for`).
    initial: the state [B, H, DA, DC] the scan starts from (forward only); final: also return
    the state after the last token (forward: Σ λ^(N-1-s) b_s c_sᵀ + λ^N initial; reverse: the
    state at position 0, Σ λ^s b_s c_sᵀ), fp32 [B, H, DA, DC]. Returns (out, final or None).
    """
    bsz, h, n, da = a.shape
    dc = c.shape[-1]
    if initial is not None and reverse:
        raise ValueError("a carried initial state is defined for forward scans only")
    out = torch.empty_like(c)  # keeps c's strides: a [B, N, H, E] layout stays one
    final_state = torch.empty(bsz, h, da, dc, device=a.device, dtype=torch.float32) if final else None
    if n == 0:
        if final:
            final_state.copy_(initial if initial is not None else torch.zeros_like(final_state))
        return out, final_state
    init = None
    if initial is not None:
        init = initial.to(device=a.device, dtype=torch.float32).contiguous()
    nblocks = triton.cdiv(n, BLOCK_N)
    nseg = segments_for(bsz * h, dc, n, a.device) if segments is None else segments
    seg_blocks = triton.cdiv(nblocks, max(1, min(nseg, nblocks)))
    nseg = triton.cdiv(nblocks, seg_blocks)
    decay_arg = log2_decay if log2_decay is not None else a  # never read without decay
    common = dict(HAS_DECAY=log2_decay is not None, REVERSE=reverse, PREC=dot_precision(a.dtype),
                  BLOCK_N=BLOCK_N, BLOCK_DA=pow2(da))
    grid = lambda meta: (bsz * h, triton.cdiv(dc, meta["BLOCK_C"]), nseg)  # noqa: E731
    strides = [s for t in (a, b, c, out) for s in t.stride()[:3]]
    # Pointers that a variant never reads or writes are passed as `out` (any tensor will do).
    init_arg = init if init is not None else out
    final_arg = final_state if final else out
    if nseg == 1:
        _scan_kernel[grid](a, b, c, out, out, decay_arg, init_arg, final_arg, *strides, n, h, da, dc, seg_blocks,
                           MODE=PLAIN, HAS_INIT=init is not None, HAS_FINAL=final, **common)
        return out, final_state
    states = torch.empty(bsz * h, nseg, da, dc, device=a.device, dtype=torch.float32)
    _scan_kernel[grid](a, b, c, out, states, decay_arg, out, out, *strides, n, h, da, dc, seg_blocks,
                       MODE=SEGMENT_STATE, HAS_INIT=False, HAS_FINAL=False, **common)
    size = da * dc
    carry_block = min(1024, triton.next_power_of_2(size))
    seg_len = seg_blocks * BLOCK_N
    _carry_kernel[(bsz * h, triton.cdiv(size, carry_block))](
        states, decay_arg, init_arg, final_arg, h, nseg, size, seg_len, n - (nseg - 1) * seg_len,
        HAS_DECAY=log2_decay is not None, REVERSE=reverse, HAS_INIT=init is not None, HAS_FINAL=final,
        BLOCK=carry_block)
    _scan_kernel[grid](a, b, c, out, states, decay_arg, out, out, *strides, n, h, da, dc, seg_blocks,
                       MODE=SEGMENT_SCAN, HAS_INIT=False, HAS_FINAL=False, **common)
    return out, final_state


def _row_powers(log2_decay, h: int, exponent: torch.Tensor) -> torch.Tensor:
    """λ_h^exponent as [1, H, N, 1] fp32 (1 without decay)."""
    if log2_decay is None:
        return torch.ones(1, 1, exponent.numel(), 1, device=exponent.device)
    return torch.exp2(log2_decay.view(1, h, 1, 1) * exponent.to(torch.float32).view(1, 1, -1, 1))


class CausalNormAttention(torch.autograd.Function):
    """Saves q, k, v (O(n·d) per head) and recomputes the rest in backward.

    The decay is a constant of the model (TransNormerLLM fixes λ_h), so it gets no gradient;
    the dispatcher sends a decay that requires grad to the PyTorch reference instead.

    With a carried state S₀ and the final state S_N (README, "Carried state"):
    dQ starts its scan from S₀ᵀ; dS₀ = λ·(the dK scan's state at position 0)ᵀ + λ^N dS_N;
    dS_N reaches every key and value as dk_s += λ^(N-1-s) dS_N v_s, dv_s += λ^(N-1-s) dS_Nᵀ k_s
    (two GEMMs, only when the final state has a gradient).
    """

    @staticmethod
    def forward(ctx, q, k, v, decay, segments, initial_state, output_final_state):
        q, k, v = as_kernel_inputs(q, k, v)
        log2_decay = None
        if decay is not None:
            if decay.shape != (q.shape[1],):
                raise ValueError(f"decay must have shape [H]=[{q.shape[1]}], got {tuple(decay.shape)}")
            # Clamped: λ = 0 would give 0·(−inf) = NaN where the exponent is 0.
            log2_decay = torch.log2(decay.detach().to(device=q.device, dtype=torch.float32)).clamp_min(-1e4)
        if initial_state is not None and initial_state.shape != (*q.shape[:2], q.shape[-1], v.shape[-1]):
            raise ValueError(f"initial_state must have shape [B, H, D, E]={[*q.shape[:2], q.shape[-1], v.shape[-1]]}, "
                             f"got {list(initial_state.shape)}")
        init = None if initial_state is None else initial_state.detach()
        ctx.save_for_backward(q, k, v, log2_decay, init)
        ctx.segments = segments
        return scan(q, k, v, log2_decay, segments=segments, initial=init, final=output_final_state)

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, log2_decay, init = ctx.saved_tensors
        (do,) = as_kernel_inputs(do.to(q.dtype))
        seg = ctx.segments
        want_q, want_k, want_v, want_init = (ctx.needs_input_grad[i] for i in (0, 1, 2, 5))
        dq = dk = dv = dinit = None
        if want_q:
            dq, _ = scan(do, v, k, log2_decay, segments=seg,
                         initial=None if init is None else init.transpose(-1, -2))
        if want_k or want_init:
            dk, at_start = scan(v, do, q, log2_decay, reverse=True, segments=seg, final=want_init)
            if want_init:  # Σ_t λ^(t+1) q_t dO_tᵀ
                lam = 1.0 if log2_decay is None else torch.exp2(log2_decay).view(1, -1, 1, 1)
                dinit = lam * at_start.transpose(-1, -2)
        if want_v:
            dv, _ = scan(k, q, do, log2_decay, reverse=True, segments=seg)
        if dfinal is not None:
            n, h = q.shape[2], q.shape[1]
            weight = _row_powers(log2_decay, h, n - 1 - torch.arange(n, device=q.device))  # λ^(N-1-s)
            dfinal = dfinal.to(torch.float32)
            if want_k:
                dk = (dk.float() + weight * (v.float() @ dfinal.transpose(-1, -2))).to(dk.dtype)
            if want_v:
                dv = (dv.float() + weight * (k.float() @ dfinal)).to(dv.dtype)
            if want_init:  # + λ^N dS_N
                carried = 1.0 if log2_decay is None else torch.exp2(log2_decay * n).view(1, h, 1, 1)
                dinit = dinit + carried * dfinal
        return dq, dk, dv, None, None, dinit, None


def causal_norm_attention(q, k, v, decay=None, segments: int | None = None, initial_state=None,
                          output_final_state: bool = False):
    """-> (out, final state or None); see `scan` and `CausalNormAttention`.
    segments: force the number of parallel sequence segments (None: chosen per GPU)."""
    return CausalNormAttention.apply(q, k, v, decay, segments, initial_state, output_final_state)
