"""Minibatch linear CKA (unbiased HSIC) and CKA drift against an independent float64 brute force."""

import math

import pytest
import torch

from ee_callbacks.metrics.similarity import (
    CKADrift,
    MinibatchCKA,
    gram_linear,
    hsic_all_pairs,
    u_centre,
)


def song_hsic(k: torch.Tensor, l: torch.Tensor) -> float:
    """Song et al. (2012) unbiased HSIC written out term by term, float64."""
    k = k.double().clone()
    l = l.double().clone()
    n = k.shape[0]
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    ones = torch.ones(n, dtype=torch.float64)
    trace_term = torch.trace(k @ l)
    sum_term = (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * (ones @ k @ l @ ones)
    return float((trace_term + sum_term - cross_term) / (n * (n - 3)))


def brute_force_cka(minibatches: list[list[torch.Tensor]]) -> torch.Tensor:
    """CKA matrix from per-minibatch lists of (n, d) features: sums of Song HSIC, then the ratio."""
    n_layers = len(minibatches[0])
    sums = torch.zeros(n_layers, n_layers, dtype=torch.float64)
    for feats in minibatches:
        grams = [f.double() @ f.double().T for f in feats]
        for i in range(n_layers):
            for j in range(n_layers):
                sums[i, j] += song_hsic(grams[i], grams[j])
    out = torch.empty_like(sums)
    for i in range(n_layers):
        for j in range(n_layers):
            out[i, j] = sums[i, j] / math.sqrt(sums[i, i] * sums[j, j])
    return out


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


def test_u_centre_identity_matches_song_formula():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 9, 5, generator=gen)
    grams = gram_linear(feats)
    assert grams.dtype == torch.float64
    assert torch.allclose(grams[1], feats[1].double() @ feats[1].double().T)
    u = u_centre(grams)
    assert torch.all(torch.diagonal(u, dim1=-2, dim2=-1) == 0)
    n = grams.shape[-1]
    for i in range(3):
        for j in range(3):
            via_u = float((u[i] * u[j]).sum()) / (n * (n - 3))
            assert via_u == pytest.approx(song_hsic(grams[i], grams[j]), rel=1e-10, abs=1e-12)
    # the identity does not rely on PSD Gram matrices: any symmetric matrices will do
    sym = torch.randn(2, 7, 7, generator=gen, dtype=torch.float64)
    sym = sym + sym.transpose(-1, -2)
    u = u_centre(sym)
    hsic = hsic_all_pairs(u)
    assert float(hsic[0, 1]) == pytest.approx(song_hsic(sym[0], sym[1]), rel=1e-10)
    assert torch.allclose(hsic, hsic.T)


def test_cka_of_identical_features_is_one():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    acc = MinibatchCKA(2)
    acc.update(torch.stack([x, x]))
    assert torch.allclose(acc.compute(), torch.ones(2, 2, dtype=torch.float64), atol=1e-12)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    gen = torch.Generator().manual_seed(2)
    acc = MinibatchCKA(3)
    for _ in range(3):
        x = torch.randn(32, 8, generator=gen, dtype=torch.float64)
        y = torch.tanh(x @ torch.randn(8, 8, generator=gen, dtype=torch.float64)) + 0.5 * torch.randn(
            32, 8, generator=gen, dtype=torch.float64)
        q = random_orthogonal(8, gen)
        acc.update(torch.stack([x, y, 3.7 * y @ q]))
    cka = acc.compute()
    assert 0.2 < float(cka[0, 1]) < 0.99                 # a non-trivial similarity...
    assert float(cka[0, 2]) == pytest.approx(float(cka[0, 1]), rel=1e-9)   # ...unchanged by Q and scale
    assert float(cka[1, 2]) == pytest.approx(1.0, rel=1e-9)


def test_minibatch_cka_matches_brute_force():
    gen = torch.Generator().manual_seed(3)
    minibatches = []
    acc = MinibatchCKA(3)
    for n in (6, 11, 8):                                  # minibatches of different sizes
        base = torch.randn(n, 5, generator=gen)
        feats = [base, base @ torch.randn(5, 5, generator=gen) + 0.3 * torch.randn(n, 5, generator=gen),
                 torch.randn(n, 5, generator=gen)]
        minibatches.append(feats)
        acc.update(torch.stack(feats).float())
    expected = brute_force_cka(minibatches)
    assert acc.n_minibatches == 3
    assert torch.allclose(acc.compute(), expected, rtol=1e-9, atol=1e-12)


def test_cka_of_independent_features_is_near_zero():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(512, 128, generator=gen)
    y = torch.randn(512, 128, generator=gen)
    acc = MinibatchCKA(2)
    acc.update(torch.stack([x, y]))
    # the biased (HSIC_0) linear CKA of these is ≈ 0.2; the unbiased estimator is centred at 0
    assert abs(float(acc.compute()[0, 1])) < 0.1


def test_state_tensor_sums_like_an_all_reduce():
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 10, 4, generator=gen) for _ in range(4)]
    whole, rank0, rank1 = MinibatchCKA(3), MinibatchCKA(3), MinibatchCKA(3)
    for i, b in enumerate(batches):
        whole.update(b)
        (rank0 if i % 2 == 0 else rank1).update(b)
    reduced = rank0.state_tensor() + rank1.state_tensor()
    assert reduced.dtype == torch.float64 and reduced.shape == (3 * 3 + 1,)
    merged = MinibatchCKA(3)
    merged.load_state_tensor(reduced)
    assert merged.n_minibatches == 4
    assert torch.allclose(merged.compute(), whole.compute(), rtol=1e-12)


def test_shapes_and_errors():
    acc = MinibatchCKA(2)
    assert torch.isnan(acc.compute()).all()               # undefined before any update
    with pytest.raises(ValueError, match="at least 4 tokens"):
        acc.update(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="at least 4 tokens"):
        hsic_all_pairs(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"\(K, n, d\)"):
        acc.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="2 layers"):
        acc.update(torch.randn(3, 6, 5))
    u = acc.update(torch.randn(2, 6, 5), return_ucentred=True)
    assert u.shape == (2, 6, 6) and u.dtype == torch.float64
    with pytest.raises(ValueError, match="entries"):
        acc.load_state_tensor(torch.zeros(4))


def brute_force_drift(prev: list[torch.Tensor], cur: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer drift CKA from lists of (K, n, d) features of the same tokens at two probes."""
    n_layers = prev[0].shape[0]
    out = torch.empty(n_layers, dtype=torch.float64)
    for k in range(n_layers):
        cross = a = b = 0.0
        for p, c in zip(prev, cur):
            gp = p[k].double() @ p[k].double().T
            gc = c[k].double() @ c[k].double().T
            cross += song_hsic(gp, gc)
            a += song_hsic(gp, gp)
            b += song_hsic(gc, gc)
        out[k] = cross / math.sqrt(a * b)
    return out


def test_cka_drift_matches_brute_force_and_invariances():
    gen = torch.Generator().manual_seed(6)
    probe1 = [torch.randn(3, n, 6, generator=gen) for n in (8, 12)]
    q = random_orthogonal(6, gen).float()
    # probe 2: layer 0 rotated+scaled (drift 1), layer 1 perturbed, layer 2 independent
    probe2 = [torch.stack([2.0 * p[0] @ q, p[1] + 0.7 * torch.randn(p[1].shape, generator=gen),
                           torch.randn(p[2].shape, generator=gen)]) for p in probe1]
    drift = CKADrift(3, storage_dtype=torch.float64)
    cka = MinibatchCKA(3)
    drift.begin_probe()
    for p in probe1:
        drift.update(cka.update(p, return_ucentred=True))
    assert torch.isnan(drift.compute()).all() and not drift.has_reference   # first probe: no reference yet
    drift.end_probe()
    assert drift.has_reference
    drift.begin_probe()
    for p in probe2:
        drift.update(cka.update(p, return_ucentred=True))
    result = drift.compute()
    assert torch.allclose(result, brute_force_drift(probe1, probe2), rtol=1e-9)
    assert float(result[0]) == pytest.approx(1.0, rel=1e-9)
    assert 0.3 < float(result[1]) < 0.99
    assert drift.n_pairs == 2
    assert drift.state_tensor().shape == (3 * 3 + 1,)


def test_cka_drift_state_dict_and_shape_mismatch():
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 9, 4, generator=gen)
    u = u_centre(gram_linear(feats))
    drift = CKADrift(2)                                   # default float32 storage on CPU
    drift.begin_probe()
    drift.update(u)
    drift.end_probe()
    restored = CKADrift(2)
    restored.load_state_dict(drift.state_dict())
    restored.begin_probe()
    restored.update(u)
    assert torch.allclose(restored.compute(), torch.ones(2, dtype=torch.float64), atol=1e-12)
    restored.load_state_tensor(restored.state_tensor() * 2)
    assert restored.n_pairs == 2
    assert torch.allclose(restored.compute(), torch.ones(2, dtype=torch.float64), atol=1e-12)
    restored.end_probe()
    restored.begin_probe()
    with pytest.raises(ValueError, match="same probe tokens"):
        restored.update(u_centre(gram_linear(torch.randn(2, 7, 4, generator=gen))))
