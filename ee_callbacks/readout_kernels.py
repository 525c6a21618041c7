"""Per-token statistics of a readout against the final layer, one token chunk at a time (the probe's inner loop).

Plain PyTorch. A chunk's final-layer logits become a :class:`FinalChunk`; each layer's readout logits (from the
affine :class:`AffineLogitLens`, the model's own readout or an exit head) become per-token statistics with
:func:`centred_token_stats` / :func:`token_stats`. The (chunk × V) buffers are reused through a :class:`Workspace`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .metrics import suitability as suit_m
from .model_parts import ModelParts

__all__ = ["Workspace", "AffineLogitLens", "FinalChunk", "centred_token_stats", "token_stats", "top2", "LENS_STATS",
           "LogitLensReadout", "HeadReadout"]



class Workspace:
    """Reusable (rows, V) float buffers for the readouts of one probe.

    On CPU a fresh (chunk × V) tensor costs page faults as slow as the operation that fills it, so the logits and the
    softmax of every layer land in the same two buffers (and a third for the final layer's distribution when
    vocabulary-space comparisons need it). They live for one ``run_probe`` call: peak ≈ a few × chunk_tokens × V.
    """

    def __init__(self):
        self.buffers: dict = {}

    def get(self, name: str, n: int, V: int, dtype: torch.dtype, device) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < n or buf.shape[1] != V or buf.dtype != dtype or buf.device != device:
            self.buffers.pop(name, None)
            buf = torch.empty(n, V, dtype=dtype, device=device)
            self.buffers[name] = buf
        return buf[:n]


def _softmax_into(z: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """softmax(z) over the last dim, written into ``out`` when given (falls back to a fresh tensor)."""
    if out is not None:
        try:
            return torch.ops.aten._softmax.out(z, -1, False, out=out)
        except (RuntimeError, AttributeError, NotImplementedError):  # pragma: no cover - op missing in this build
            pass
    return torch.softmax(z, dim=-1)


_TOP2_BLOCK = 64


def top2(z: torch.Tensor):
    """(largest value, its index, second-largest value or None when V = 1) per row of ``z`` (n, V).

    One pass over the logits: the maxima of blocks of ``_TOP2_BLOCK`` columns (a vectorised ``amax``, about 3×
    faster on CPU than ``topk`` or ``max`` with indices over the whole row), then the winning block is searched on
    its own. The index is the first maximal one (as ``argmax``); values are exact (no arithmetic). Small
    vocabularies use ``topk``.
    """
    n, V = z.shape
    S = _TOP2_BLOCK
    if V < 4 * S or n == 0 or z.stride(-1) != 1:
        top_v = z.topk(2 if V > 1 else 1, dim=-1).values
        # topk's index among equal maxima is arbitrary; argmax's is the first (half-precision logits do tie)
        return top_v[:, 0], z.argmax(dim=-1), (top_v[:, 1] if V > 1 else None)
    B = V // S
    bmax = z[:, : B * S].unflatten(1, (B, S)).amax(dim=-1)  # (n, B)
    if B * S < V:
        bmax = torch.cat([bmax, z[:, B * S :].amax(dim=-1, keepdim=True)], dim=1)
    _, block = bmax.max(dim=-1)
    cols = block[:, None] * S + torch.arange(S, device=z.device)
    inside = cols < V
    vals = z.gather(1, cols.clamp_max(V - 1)).masked_fill_(~inside, float("-inf"))
    v1, local = vals.max(dim=-1)
    i1 = block * S + local
    second_inside = vals.scatter_(1, local[:, None], float("-inf")).amax(dim=-1)
    second_outside = bmax.scatter_(1, block[:, None], float("-inf")).amax(dim=-1)
    return v1, i1, torch.maximum(second_inside, second_outside)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a_ij b_ij per row (small (n, d) operands only: it materialises the product)."""
    return torch.linalg.vecdot(a, b)


class AffineLogitLens:
    """The logit lens of a model whose unembedding is a plain ``nn.Linear``: ``z = s·(W N(h) + b)``.

    Being affine, the readout lets the probe (1) write *centred* logits ``z − mean_v z`` straight out of the matmul
    (with the centred unembedding ``W − w̄``, ``w̄`` the mean unembedding row, or ``addmm`` subtracting the per-token
    mean ``w̄·N(h)``), so the centred norm needs no variance pass and every shift-invariant statistic is computed
    away from a large shared offset; the mean itself is ``s·(w̄·N(h) + b̄)``; and (2) take the dot products of every
    layer's logits with the final layer's distribution and centred logits in model space:
    ``Σ_v z_v a_v = s·(N(h)·(Wᵀa) + b·a)`` with ``Wᵀa`` computed once per chunk (two (chunk × V) @ (V × d) matmuls)
    instead of two passes over (chunk × V) per layer. The second pays off when the number of layers is large
    against d/64 (see ``dspace``).
    """

    def __init__(self, parts: ModelParts, n_layers: int, chunk_tokens: int = 0):
        unembed = parts.unembed
        self.parts = parts
        self.W = unembed.weight.detach()
        self.b = unembed.bias.detach() if unembed.bias is not None else None
        self.scale = float(parts.logit_scale) if parts.logit_scale is not None else None
        self.w_mean = self.W.mean(dim=0)
        # the bias enters centred (b − b̄) so that a large shared offset never meets the centred logits' rounding
        self.b_mean = self.b.mean() if self.b is not None else None
        self.b_centred = self.b - self.b_mean if self.b is not None else None
        # a centred copy W − w̄ (as large as the unembedding; kept when that is at most one chunk of logits) makes the
        # matmul write centred logits directly; otherwise addmm subtracts the mean (one more write pass per layer)
        self.W_centred = self.W - self.w_mean if self.W.shape[1] <= chunk_tokens else None
        d = self.W.shape[1]
        # model-space dots cost 2 matmuls per chunk against 2 vocabulary passes per layer: a pass over (chunk × V)
        # costs about 64/d of the readout matmul on CPUs and GPUs alike (memory- against compute-bound)
        self.dspace = n_layers * _DSPACE_LAYERS_PER_WIDTH >= d

    @classmethod
    def of(cls, parts: ModelParts, rdtype: torch.dtype, n_layers: int,
           chunk_tokens: int = 0) -> Optional["AffineLogitLens"]:
        unembed = parts.unembed
        if type(unembed) is not nn.Linear or parts.logit_softcap is not None:
            return None
        if unembed._forward_hooks or unembed._forward_pre_hooks:
            return None
        from torch.nn.modules import module as _module

        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return None
        weight = unembed.weight
        if type(weight) not in (torch.Tensor, nn.Parameter) or weight.dtype != rdtype or weight.dim() != 2:
            return None
        if rdtype not in (torch.float32, torch.float64):
            return None
        return cls(parts, n_layers, chunk_tokens)

    def centred_logits(self, h: torch.Tensor, out: torch.Tensor):
        """(centred logits written into ``out``, their per-token mean, the normed hidden state)."""
        normed = self.parts.normed(h)
        mu = normed @ self.w_mean
        if self.W_centred is not None:
            zc = torch.mm(normed, self.W_centred.t(), out=out)
        else:
            zc = torch.addmm(-mu[:, None], normed, self.W.t(), out=out)
        if self.b is not None:
            zc.add_(self.b_centred)
            mu = mu + self.b_mean
        if self.scale is not None:
            zc.mul_(self.scale)
            mu = mu * self.scale
        return zc, mu, normed

    def project(self, a: torch.Tensor, total: float):
        """(Wᵀa per token (n, d), b·a per token or None) for rows a (n, V) of the final layer's chunk summing to
        ``total`` (1 for p_L, 0 for the centred logits): b·a = (b − b̄)·a + b̄·total."""
        if self.b is None:
            return a @ self.W, None
        return a @ self.W, a @ self.b_centred + self.b_mean * total

    def dots(self, normed: torch.Tensor, final: "FinalChunk"):
        """(Σ_v p_L z, Σ_v zc_L z) per token from the normed hidden states, without the (n, V) logits."""
        a_p = _rowdot(normed, final.Wp)
        a_zc = _rowdot(normed, final.Wzc)
        if final.bp is not None:
            a_p = a_p + final.bp
            a_zc = a_zc + final.bzc
        if self.scale is not None:
            a_p = a_p * self.scale
            a_zc = a_zc * self.scale
        return a_p, a_zc


_DSPACE_LAYERS_PER_WIDTH = 64


class FinalChunk:
    """What every layer's readout is compared against: the final layer's logits of one token chunk.

    ``z_final`` (n, V) is owned by the probe and centred in place. Kept per token: top-1, target, lse, the final
    negative entropy Σ p_L log p_L, ‖z_L‖, ‖z_L − mean‖ and the mean; for comparisons in vocabulary space
    (``keep_vocab``: exit heads, JS, non-affine readouts) also ``p`` = p_L and ``zc`` = centred z_L; for an affine
    lens in model space ``Wp`` = Wᵀp_L and ``Wzc`` = Wᵀzc_L (and their bias terms). ``stats`` are the final layer's
    own per-token statistics.
    """

    def __init__(self, z_final: torch.Tensor, targets: torch.Tensor, *, workspace: Optional[Workspace] = None,
                 lens: Optional[AffineLogitLens] = None, keep_vocab: bool = True, want_js: bool = False):
        z = z_final
        n, V = z.shape
        self.targets = targets
        self.V = V
        _, top1, v2 = top2(z)  # on the model's own logits, before any rounding by the centring
        self.top1 = top1
        self.mean = z.mean(dim=-1)
        zc = z.sub_(self.mean[:, None])
        self.zc_norm = torch.linalg.vector_norm(zc, dim=-1)
        self.norm = (self.zc_norm.square() + V * self.mean.square()).sqrt()  # ‖z‖² = ‖z − mean‖² + V·mean²
        buf = workspace.get("final_p" if keep_vocab else "p", n, V, zc.dtype, zc.device) if workspace is not None else None
        p = _softmax_into(zc, buf)
        p1 = p.gather(1, top1[:, None]).squeeze(1)
        lse_c = zc.gather(1, top1[:, None]).squeeze(1) - p1.log()  # p1 ≥ 1/V: a well-conditioned log
        p2 = (v2 - self.mean - lse_c).exp() if v2 is not None else torch.zeros_like(p1)
        self.lse_c = lse_c
        self.lse = lse_c + self.mean
        ce = lse_c - zc.gather(1, targets[:, None]).squeeze(1)
        self.Wp = self.Wzc = self.bp = self.bzc = None
        if lens is not None and lens.dspace:
            self.Wp, self.bp = lens.project(p, 1.0)
            self.Wzc, self.bzc = lens.project(zc, 0.0)
        if keep_vocab:
            tmp = workspace.get("z", n, V, zc.dtype, zc.device) if workspace is not None else None
            pz = (torch.mul(p, zc, out=tmp) if tmp is not None else p * zc).sum(dim=-1)
            self.p, self.zc = p, zc
        else:
            pz = p.mul_(zc).sum(dim=-1)  # p is not needed any more
            self.p = self.zc = None
        self.neg_entropy = pz - lse_c  # Σ p_L log p_L
        self._logp = (zc - lse_c[:, None]) if (want_js and keep_vocab) else None
        self.stats = {
            "top1": top1,
            "agree": torch.ones_like(top1, dtype=torch.bool),
            "acc": top1 == targets,
            "ce": ce,
            "kl": torch.zeros_like(ce),  # exact by definition, not up to rounding
            "entropy": (-self.neg_entropy).clamp_min(0.0),
            "max_prob": p1,
            "margin": p1 - p2,
            "logit_cos": torch.ones_like(ce),
            "logit_corr": torch.ones_like(ce),
        }
        if want_js:
            self.stats["js_sim"] = torch.ones_like(ce)

    @property
    def logp(self) -> torch.Tensor:
        if self._logp is None:
            if self.zc is None:
                raise RuntimeError("the final chunk kept no vocabulary-space tensors (keep_vocab=False)")
            self._logp = self.zc - self.lse_c[:, None]
        return self._logp


def centred_token_stats(zc: torch.Tensor, mu: torch.Tensor, final: FinalChunk, probs_out: Optional[torch.Tensor],
                   dots=None, want_js: bool = False) -> dict:
    """Per-token statistics of one layer from its centred logits ``zc`` = z − mu (n, V), which are overwritten.

    Passes over (n, V): top-2, softmax (into ``probs_out``), ‖zc‖, Σ p·zc (in place in probs_out), and — without
    ``dots`` from an affine lens — Σ p_L·zc and Σ zc_L·zc (into probs_out again). Every statistic is shift-invariant
    except ``logit_cos``, which adds the means back: Σ z·z_L = Σ zc·zc_L + V·mu·mu_L and ‖z‖² = ‖zc‖² + V·mu².
    """
    V = zc.shape[-1]
    v1, top1, v2 = top2(zc)
    p = _softmax_into(zc, probs_out)
    p1 = p.gather(1, top1[:, None]).squeeze(1)
    lse_c = v1 - p1.log()  # p1 ≥ 1/V: a well-conditioned log
    p2 = (v2 - lse_c).exp() if v2 is not None else torch.zeros_like(p1)
    ce = lse_c - zc.gather(1, final.targets[:, None]).squeeze(1)
    sq = torch.linalg.vector_norm(zc, dim=-1).square()
    js = suit_m.js_similarity(zc - lse_c[:, None], final.logp) if want_js else None
    pz = p.mul_(zc).sum(dim=-1)  # Σ p·zc; p is spent
    if dots is None:
        p_final_z = torch.mul(final.p, zc, out=p).sum(dim=-1)  # Σ p_L·zc
        zc_dot = torch.mul(final.zc, zc, out=p).sum(dim=-1)  # Σ zc_L·zc (= Σ zc_L·z)
    else:
        p_final_z = dots[0] - mu  # Σ p_L·z − mu
        zc_dot = dots[1]
    # KL(p_L ‖ p_ℓ) = Σ p_L log p_L − Σ p_L (z − lse) ; the shift mu cancels
    kl = final.neg_entropy - p_final_z + lse_c
    entropy = lse_c - pz
    norm = (sq + V * mu.square()).sqrt()
    logit_cos = (zc_dot + V * mu * final.mean) / (norm * final.norm)
    logit_corr = zc_dot / (sq.sqrt() * final.zc_norm)
    out = {
        "top1": top1,
        "agree": top1 == final.top1,
        "acc": top1 == final.targets,
        "ce": ce,
        "kl": kl.clamp_min(0.0),
        "entropy": entropy.clamp_min(0.0),
        "max_prob": p1,
        "margin": p1 - p2,
        "logit_cos": logit_cos,
        "logit_corr": logit_corr,
    }
    if want_js:
        out["js_sim"] = js
    return out


def token_stats(z: torch.Tensor, final: FinalChunk, want_js: bool, *, owned: bool = False,
                      probs_out: Optional[torch.Tensor] = None) -> dict:
    """Per-token statistics of one layer's logits ``z`` (N, V) against the final layer (kept in vocabulary space).

    ``owned``: ``z`` may be overwritten (it is centred in place); otherwise it is copied first.
    """
    zc = z if owned else z.clone()
    mu = zc.mean(dim=-1)
    zc.sub_(mu[:, None])
    return centred_token_stats(zc, mu, final, probs_out, None, want_js)


LENS_STATS = ("agree", "acc", "ce", "kl", "entropy", "max_prob", "margin", "logit_cos", "logit_corr")


class LogitLensReadout:
    """The logit lens ``T(U(N(h)))`` behind the probe's readout interface (``token_stats(h, layer, final, workspace)``).

    A plain ``nn.Linear`` unembedding takes the affine fast path (:class:`AffineLogitLens`: centred logits out of the
    matmul, dot products in model space); anything else goes through the model's own readout.
    """

    name = "logit_lens"
    kind = "logits"

    def __init__(self, parts: ModelParts, readout_dtype: torch.dtype, n_layers: int, chunk_tokens: int,
                 want_js: bool):
        self.parts, self.readout_dtype, self.n_layers = parts, readout_dtype, n_layers
        self.chunk_tokens, self.want_js = chunk_tokens, want_js
        self.stats_dtype = torch.float32 if readout_dtype in (torch.bfloat16, torch.float16) else readout_dtype
        self.refresh()

    def refresh(self) -> None:
        """Re-read the unembedding (under FSDP its full weights exist only inside the readout context)."""
        self.affine = None if self.want_js else AffineLogitLens.of(
            self.parts, self.readout_dtype, self.n_layers, self.chunk_tokens)

    def token_stats(self, h: torch.Tensor, layer: int, final: FinalChunk, workspace: Workspace) -> dict:
        n, V = h.shape[0], final.V
        h = h.to(self.readout_dtype)
        probs = workspace.get("p", n, V, self.stats_dtype, h.device)
        if self.affine is not None:
            zc, mu, normed = self.affine.centred_logits(h, workspace.get("z", n, V, self.stats_dtype, h.device))
            dots = self.affine.dots(normed, final) if self.affine.dspace else None
            return centred_token_stats(zc, mu, final, probs, dots, self.want_js)
        z = self.parts.readout(h)
        return token_stats(z.to(self.stats_dtype), final, self.want_js, owned=True, probs_out=probs)


class HeadReadout:
    """A trained exit head (``logits(h, layer)``, or ``confidence(h, layer)`` for a confidence classifier) behind
    the same interface as the logit lens, so it gets the same per-layer statistics."""

    def __init__(self, head, readout_dtype: torch.dtype):
        self.head, self.readout_dtype = head, readout_dtype
        self.kind = getattr(head, "kind", "logits")
        self.layers = [int(layer) for layer in head.layers]
        # our own heads return fresh logits that may be centred in place; anyone else's are copied first
        self.owned = type(head).__module__.startswith("ee_callbacks.")

    def token_stats(self, h: torch.Tensor, layer: int, final: FinalChunk, workspace: Workspace) -> dict:
        z = self.head.logits(h.to(self.readout_dtype), layer).float()
        probs = workspace.get("p", z.shape[0], z.shape[1], z.dtype, z.device)
        return token_stats(z, final, False, owned=self.owned, probs_out=probs)

    def confidence(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.head.confidence(h.to(self.readout_dtype), layer).float().reshape(-1)
