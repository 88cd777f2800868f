"""Pure-PyTorch stand-ins for the mamba-ssm kernels used by megatron-core's ``MambaMixer``.

megatron-core 0.16.1 (``megatron/core/ssm/mamba_mixer.py``) imports three things from
mamba-ssm on the ``use_mamba_mem_eff_path=False`` path:

* ``mamba_chunk_scan_combined`` (prefill / training, in ``_ssm_prefill``),
* ``selective_state_update`` (one-token decode, in ``_ssm_decode``),
* ``RMSNorm`` imported as ``RMSNormGated`` (base class of ``ExtendedRMSNorm``).

This module re-implements them with plain tensor ops (fp32 accumulation) and the same
call signatures, so the mixer's module globals can be monkeypatched with them on
machines where mamba-ssm (Triton/CUDA) is unavailable. ``ssd_scan_naive`` is an
obviously-correct per-time-step recurrence used as a test oracle.

Shapes (mamba-ssm conventions): x ``(b, l, h, p)``, dt ``(b, l, h)``, A ``(h,)``,
B/C ``(b, l, g, n)`` with head ``i`` reading group ``i // (h // g)``, D ``(h,)`` or
``(h, p)``, z like x, SSM state ``(b, h, p, n)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "RMSNormGated",
    "mamba_chunk_scan_combined",
    "selective_state_update",
    "ssd_scan_naive",
]


def _process_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool) -> torch.Tensor:
    """Return fp32 ``dt (+ dt_bias)``, optionally passed through softplus."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)  # threshold=20, like the mamba-ssm kernels
    return dt


def _skip_and_gate(
    y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> torch.Tensor:
    """Add the ``D * x`` skip term (``D`` of shape ``(h,)`` or ``(h, p)``) and gate by silu(z)."""
    if D is not None:
        Df = D.float()
        y = y + x.float() * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    return y


def _check_groups(nheads: int, ngroups: int) -> int:
    """Return heads per group, raising if heads cannot be split evenly into groups."""
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by ngroups ({ngroups})")
    return nheads // ngroups


def ssd_scan_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential reference SSD (Mamba-2) scan, one time step at a time.

    ``h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T`` and ``y_t = h_t C_t + D x_t``,
    then ``y *= silu(z)`` if ``z`` is given. Returns ``(y, final_state)`` with ``y`` in
    ``x.dtype`` and the final state ``(b, h, p, n)`` in fp32. No ``dt_limit`` clamp.
    """
    b, seqlen, h, p = x.shape
    g, n = B.shape[-2:]
    hpg = _check_groups(h, g)
    dt = _process_dt(dt, dt_bias, dt_softplus)
    Bh = B.float().repeat_interleave(hpg, dim=2)  # (b, l, h, n)
    Ch = C.float().repeat_interleave(hpg, dim=2)
    xf, Af = x.float(), A.float()
    if initial_states is None:
        state = x.new_zeros((b, h, p, n), dtype=torch.float32)
    else:
        state = initial_states.float()
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * Af)  # (b, h)
        inp = (dt[:, t, :, None, None] * xf[:, t, :, :, None]) * Bh[:, t, :, None, :]
        state = state * decay[:, :, None, None] + inp
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # (b, h, p)
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros((b, 0, h, p))
    return _skip_and_gate(y, x, D, z).to(x.dtype), state


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: ``out[..., i, j] = sum(a[..., j+1 : i+1])`` for ``i >= j``, else -inf.

    Built by cumulatively summing a masked copy instead of differencing a global cumsum,
    so small decays are not lost against a large running total.
    """
    T = a.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # m > j
    rep = a[..., :, None].expand(*a.shape, T).masked_fill(~strict, 0.0)  # [m, j] = a[m]
    out = rep.cumsum(dim=-2)  # [i, j] = sum_{j < m <= i} a[m]
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (Mamba-2), a vectorized pure-torch ``mamba_chunk_scan_combined``.

    Within each chunk the output is the quadratic (attention-like) form with a
    segment-sum decay mask; across chunks the per-chunk end states are combined by a
    chunk-level decay matrix. Sequences are zero-padded (``dt = 0``) to a multiple of
    ``chunk_size``; padding neither decays nor feeds the state. ``dt`` is clamped to
    ``dt_limit`` after bias/softplus, as upstream does. Returns ``y`` (``x.dtype``) or,
    with ``return_final_states``, ``(y, final_states)`` with fp32 ``(b, h, p, n)`` states.
    Packed/variable-length sequences (``seq_idx``, ``cu_seqlens``,
    ``return_varlen_states``) are not supported and raise ``ValueError``.
    """
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise ValueError(
            "pure-torch mamba_chunk_scan_combined does not support packed / variable-length "
            "sequences (seq_idx, cu_seqlens, return_varlen_states); pass one sequence per "
            "batch row, or install mamba-ssm for the Triton kernels"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, seqlen, h, p = x.shape
    g, n = B.shape[-2:]
    k = _check_groups(h, g)
    T = chunk_size
    nchunks = max(1, -(-seqlen // T))
    pad = nchunks * T - seqlen

    dtp = _process_dt(dt, dt_bias, dt_softplus).clamp(dt_limit[0], dt_limit[1])
    xf, Bf, Cf = x.float(), B.float(), C.float()
    if pad:
        dtp = F.pad(dtp, (0, 0, 0, pad))  # padded steps: dt = 0 -> no decay, no input
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    # Split into chunks and heads into (group, head-in-group) so B/C need no repeat.
    xc = xf.reshape(b, nchunks, T, g, k, p)
    Bc = Bf.reshape(b, nchunks, T, g, n)
    Cc = Cf.reshape(b, nchunks, T, g, n)
    dtc = dtp.reshape(b, nchunks, T, g, k)
    dA = (dtc * A.float().reshape(g, k)).permute(0, 3, 4, 1, 2)  # (b, g, k, c, T)
    dA_cs = dA.cumsum(dim=-1)

    # 1) Intra-chunk (diagonal blocks): y_i = sum_{j<=i} (C_i . B_j) exp(sum dA_(j,i]) dt_j x_j
    L = torch.exp(_segsum(dA))  # (b, g, k, c, i, j)
    CB = torch.einsum("bcign,bcjgn->bgcij", Cc, Bc)  # (b, g, c, i, j)
    W = CB[:, :, None] * L * dtc.permute(0, 3, 4, 1, 2)[..., None, :]  # (b, g, k, c, i, j)
    y = torch.einsum("bgkcij,bcjgkp->bcigkp", W, xc)

    # 2) State contributed by each chunk at its own end: (b, c, g, k, p, n)
    decay_to_end = torch.exp(dA_cs[..., -1:] - dA_cs) * dtc.permute(0, 3, 4, 1, 2)
    chunk_states = torch.einsum("bgkcj,bcjgn,bcjgkp->bcgkpn", decay_to_end, Bc, xc)

    # 3) Inter-chunk recurrence s_{c+1} = exp(sum dA_c) s_c + chunk_states_c, vectorized:
    #    s_z = sum_{m<=z} exp(sum of chunk decays in (m, z]) * U_m, U = [s_0, states...].
    if initial_states is None:
        s0 = xf.new_zeros((b, 1, g, k, p, n))
    else:
        s0 = initial_states.float().reshape(b, 1, g, k, p, n)
    U = torch.cat([s0, chunk_states], dim=1)  # (b, c+1, g, k, p, n)
    chunk_decay = F.pad(dA_cs[..., -1], (1, 0))  # (b, g, k, c+1), entry 0 is a dummy
    M = torch.exp(_segsum(chunk_decay))  # (b, g, k, c+1, c+1)
    S = torch.einsum("bgkzm,bmgkpn->bzgkpn", M, U)
    states_in, final_state = S[:, :-1], S[:, -1]

    # 4) Off-diagonal part: the state entering chunk c, decayed to position i, read by C_i.
    decay_in = torch.exp(dA_cs)  # (b, g, k, c, i)
    y = y + torch.einsum("bcign,bcgkpn,bgkci->bcigkp", Cc, states_in, decay_in)

    y = y.reshape(b, nchunks * T, h, p)[:, :seqlen]
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    if return_final_states:
        return y, final_state.reshape(b, h, p, n)
    return y


def _per_head_dim(t: torch.Tensor, h: int, p: int) -> torch.Tensor:
    """Broadcast a per-head tensor given as ``(h,)`` or ``(h, p)`` to fp32 ``(h, p)``."""
    t = t.float()
    return t[:, None].expand(h, p) if t.dim() == 1 else t


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-token SSM decode step; updates ``state`` in place and returns ``y`` like ``x``.

    Accepts mamba-ssm's layouts: ``state (B, h, p, n)``, ``x``/``z``/``dt`` ``(b, h, p)``,
    ``A (h, p, n)``, ``B``/``C`` ``(b, g, n)``, ``D``/``dt_bias`` ``(h, p)`` (or ``(h,)``),
    plus the head-less variants (``x (b, p)``, ``A (p, n)``, ``B (b, n)``, ...), which are
    treated as a single head. With ``state_batch_indices`` (shape ``(b,)``) row ``i`` reads
    and writes ``state[state_batch_indices[i]]``; otherwise ``B == b``.
    """
    if x.dim() == 2:  # head-less form: add a singleton head axis everywhere
        y = selective_state_update(
            state[:, None] if state.dim() == 3 else state,
            x[:, None],
            dt[:, None],
            A[None],
            B[:, None],
            C[:, None],
            None if D is None else D[None],
            None if z is None else z[:, None],
            None if dt_bias is None else dt_bias[None],
            dt_softplus,
            state_batch_indices,
        )
        return y[:, 0]
    b, h, p = x.shape
    n = state.shape[-1]
    hpg = _check_groups(h, B.shape[1])
    dtf = dt.float()
    if dtf.dim() == 2:  # (b, h)
        dtf = dtf[:, :, None].expand(b, h, p)
    if dt_bias is not None:
        dtf = dtf + _per_head_dim(dt_bias, h, p)
    if dt_softplus:
        dtf = F.softplus(dtf)
    Af = A.float()
    if Af.dim() == 1:
        Af = Af[:, None, None]
    elif Af.dim() == 2:
        Af = Af[:, :, None]
    Af = Af.expand(h, p, n)
    Bh = B.float().repeat_interleave(hpg, dim=1)[:, :, None, :]  # (b, h, 1, n)
    Ch = C.float().repeat_interleave(hpg, dim=1)[:, :, None, :]

    old = state if state_batch_indices is None else state[state_batch_indices]
    new = old.float() * torch.exp(dtf[..., None] * Af) + (dtf * x.float())[..., None] * Bh
    if state_batch_indices is None:
        state.copy_(new)
    else:
        state[state_batch_indices] = new.to(state.dtype)
    y = (new * Ch).sum(-1)
    if D is not None:
        y = y + x.float() * _per_head_dim(D, h, p)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


class RMSNormGated(torch.nn.Module):
    """Gated, grouped RMSNorm with mamba-ssm's ``RMSNorm`` interface (``layernorm_gated``).

    ``forward(x, z)``: if ``z`` is given and not ``norm_before_gate``, ``x = x * silu(z)``
    first; then each contiguous group of ``group_size`` channels (default: all) is
    RMS-normalised and scaled by ``weight``; if ``norm_before_gate`` and ``z`` is given, the
    result is multiplied by ``silu(z)``. Computed in fp32, returned in ``x.dtype``.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        group_size = hidden_size if group_size is None else group_size
        if hidden_size % group_size != 0:
            raise ValueError(f"hidden_size {hidden_size} not divisible by group_size {group_size}")
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise ``weight`` to ones."""
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise the last dimension of ``x`` (any leading shape), optionally gated by ``z``."""
        xf = x.float()
        if z is not None and not self.norm_before_gate:
            xf = xf * F.silu(z.float())
        grouped = xf.reshape(*xf.shape[:-1], -1, self.group_size)
        rstd = torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        out = (grouped * rstd).reshape(xf.shape) * self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()  # type: ignore[operator]
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(x.dtype)
