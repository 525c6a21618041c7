"""One registry of the probe's metric names (DESIGN §2b): logger keys, report panels and the README table derive from
it, so a metric is named once.

Scopes: ``layer`` metrics are per-layer rows of the record (logged ``ee/<metric>/layer_<ℓ:02d>``), ``head`` metrics
per-layer rows of an exit head (``ee/heads/<kind>/<metric>/layer_<ℓ:02d>``), ``summary`` metrics scalars of the
summary (``ee/summary/<name>``; a name ending in ``_<n>`` or holding ``<kind>``/``<c>`` is a family of keys).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Metric", "METRICS", "names", "layer_key", "head_key", "summary_key", "REPORT_LAYER_PANELS"]


@dataclass(frozen=True)
class Metric:
    name: str
    scope: str  # "layer", "head" or "summary"
    formula: str
    report_panel: bool = False  # drawn per layer in the report and the W&B table


METRICS = (
    Metric("agree", "layer", "1[argmax z_ℓ = argmax z_L]", True),
    Metric("acc", "layer", "1[argmax z_ℓ = y_t]", True),
    Metric("ce", "layer", "−log p_ℓ(y_t) (nats)", True),
    Metric("kl", "layer", "KL(p_L ‖ p_ℓ) = Σ_v p_L (log p_L − log p_ℓ) (nats)", True),
    Metric("entropy", "layer", "H(p_ℓ) = −Σ_v p_ℓ log p_ℓ (nats)", True),
    Metric("max_prob", "layer", "max_v p_ℓ", True),
    Metric("margin", "layer", "top-1 minus top-2 probability of p_ℓ", True),
    Metric("logit_cos", "layer", "cos(z_ℓ, z_L)", True),
    Metric("logit_corr", "layer", "cos(z_ℓ − mean z_ℓ, z_L − mean z_L) (Pearson over the vocabulary)", True),
    Metric("js_sim", "layer", "1 − JS(p_ℓ, p_L)/ln 2 (only with eas_similarity=js)"),
    Metric("hidden_cos_final", "layer", "cos(h_ℓ, h_L)", True),
    Metric("block_influence", "layer", "BI_ℓ = 1 − cos(h_{ℓ−1}, h_ℓ) (ShortGPT)", True),
    Metric("saturation_frac", "layer", "share of tokens with strict saturation layer ℓ"),
    Metric("cka_drift", "layer", "linear CKA of h_ℓ now vs. at the previous probe (same tokens)"),
    Metric("ce", "head", "−log q_ℓ(y_t) of the head's distribution q_ℓ"),
    Metric("agree", "head", "1[argmax of the head = argmax z_L]"),
    Metric("acc", "head", "1[argmax of the head = y_t]"),
    Metric("kl", "head", "KL(p_L ‖ q_ℓ)"),
    Metric("entropy", "head", "H(q_ℓ)"),
    Metric("max_prob", "head", "max_v q_ℓ"),
    Metric("margin", "head", "top-1 minus top-2 probability of q_ℓ"),
    Metric("logit_cos", "head", "cos of the head's logits with z_L"),
    Metric("logit_corr", "head", "Pearson correlation of the head's logits with z_L"),
    Metric("mean_conf", "head", "mean confidence of a `confidence` head"),
    Metric("mean_conf_when_agree", "head", "its mean confidence on tokens whose logit-lens top-1 is the final one"),
    Metric("lens_agree", "head", "share of tokens whose logit-lens top-1 at ℓ is the final one"),
    Metric("eas", "summary", "mean_{ℓ=1..L} S_ℓ^α · ((L−ℓ)/L)^(1−α)"),
    Metric("oracle_skip_strict", "summary", "1 − E[ℓ*]/L"),
    Metric("oracle_skip_lenient", "summary", "1 − E[ℓ°]/L"),
    Metric("saturation_mean_strict", "summary", "E[ℓ*]"),
    Metric("static_exit_layer", "summary", "shallowest ℓ_s with acc_ℓ ≥ (1 − tol)·acc_L"),
    Metric("static_skip_5pct", "summary", "1 − ℓ_s/L"),
    Metric("spec_speedup_est", "summary", "best over E < L, k of [(1 − a^k)/(1 − a)] / [(k·E + L − E)/L], a = agree_E"),
    Metric("spec_draft_layer", "summary", "E of spec_speedup_est"),
    Metric("spec_draft_len", "summary", "k of spec_speedup_est"),
    Metric("spec_acceptance", "summary", "a = agree_E of spec_speedup_est"),
    Metric("spec_speedup_est_runs", "summary", "the same cycle simulated along the probe sequences"),
    Metric("spec_runs_draft_layer", "summary", "E of spec_speedup_est_runs"),
    Metric("spec_runs_draft_len", "summary", "k of spec_speedup_est_runs"),
    Metric("final_ce", "summary", "the model's own ce"),
    Metric("final_acc", "summary", "the model's own acc"),
    Metric("angular_min_<n>", "summary", "min_ℓ E_t[arccos(cos(h_ℓ, h_{ℓ+n}))/π]"),
    Metric("angular_argmin_<n>", "summary", "its argmin ℓ"),
    Metric("cka_drift_mean", "summary", "mean of cka_drift over layers"),
    Metric("probe_s", "summary", "wall time of the probe (s)"),
    Metric("stderr/<name>", "summary", "standard error sqrt((Σx²/n − x̄²)/n) of a headline mean over tokens"),
    Metric("layers_probed", "summary", "the blocks read out with ProbeConfig(layers=...) (summaries defined on them)"),
    Metric("skip_at_consistency_<c>/<rule>", "summary", "largest skip with consistency ≥ c, per rule"),
    Metric("head_<kind>_oracle_skip_strict", "summary", "oracle skip with the head's top-1"),
    Metric("head_<kind>_eas", "summary", "EAS with the head's logit_corr"),
)

REPORT_LAYER_PANELS = tuple(m.name for m in METRICS if m.scope == "layer" and m.report_panel)


def names(scope: str) -> tuple:
    """The metric names of one scope, in registry order."""
    return tuple(m.name for m in METRICS if m.scope == scope)


def layer_key(prefix: str, metric: str, layer: int) -> str:
    return f"{prefix}/{metric}/layer_{layer:02d}"


def head_key(prefix: str, kind: str, metric: str, layer: int) -> str:
    return f"{prefix}/heads/{kind}/{metric}/layer_{layer:02d}"


def summary_key(prefix: str, name: str) -> str:
    return f"{prefix}/summary/{name}"
