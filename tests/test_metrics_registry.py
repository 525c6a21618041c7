"""The metric registry is the one list of names: the logger keys and the README's tables derive from it."""

import re
from pathlib import Path

from ee_callbacks.metrics import registry
from ee_callbacks.sinks.loggers import flatten_record_metrics

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_per_layer_metric_has_a_readme_row_with_its_key():
    for name in registry.names("layer"):
        assert re.search(rf"^\| {name} \| .* \| `ee/{name}/layer_ℓℓ` \|$", README, re.M), name


def test_every_head_and_summary_metric_is_named_in_the_readme():
    for name in registry.names("head") + registry.names("summary"):
        plain = name.replace("<n>", "n").split("/")[0]
        assert name in README or plain in README, name


def test_logger_keys_come_from_the_registry_including_head_logit_corr():
    record = {
        "layers": [{"layer": 1, **{m: 0.5 for m in registry.names("layer")}}],
        "summary": {"eas": 0.4, "skip_at_consistency_0.99": {"max_prob": 0.2}, "eas_similarity": "logit_corr"},
        "heads": {"tuned_lens": [{"layer": 2, **{m: 0.25 for m in registry.names("head")}}]},
        "timing": {"probe_s": 1.5},
    }
    keys = flatten_record_metrics(record)
    assert {f"ee/{m}/layer_01" for m in registry.names("layer")} <= set(keys)
    assert keys["ee/heads/tuned_lens/logit_corr/layer_02"] == 0.25
    assert keys["ee/summary/skip_at_consistency_0.99/max_prob"] == 0.2
    assert keys["ee/summary/probe_s"] == 1.5 and "ee/summary/eas_similarity" not in keys


def _imported_modules(source: str) -> set:
    """Every module a source file imports, relative ones written as in the file (``.probe``, ``..providers``)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_callbacks_share_only_the_core_and_the_provider_registry():
    package = Path(__file__).resolve().parents[1] / "ee_callbacks" / "callbacks"
    for name, other in (("probe.py", "exit_heads"), ("exit_heads.py", "probe")):
        imported = _imported_modules((package / name).read_text())
        assert not imported & {f".{other}", f"ee_callbacks.callbacks.{other}"}, (name, sorted(imported))
    assert "..providers" in _imported_modules((package / "probe.py").read_text())  # finds ExitHeads as a provider
