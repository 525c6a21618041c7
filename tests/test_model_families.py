"""Every causal-LM family of the installed transformers (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), built tiny: the language
model and its parts are found with no hints and proven against the model's own logits; at least 95 % of the families
that build from a generic small config resolve, and looped models get a clear refusal. New transformers releases are
covered automatically: the test enumerates the mapping. (docs/model_coverage.md: the same check as a table.)"""

import pytest

from ee_callbacks.model_families import causal_lm_families, check_family, coverage


@pytest.fixture(scope="module")
def results():
    return {model_type: check_family(model_type) for model_type in causal_lm_families()}


def test_at_least_95_percent_of_buildable_families_resolve_with_no_hints(results):
    resolved, buildable = coverage(results.values())
    assert buildable >= 0.7 * len(results), "the generic small config stopped building most families"
    refused = {k: r.why[:160] for k, r in results.items() if r.status == "refused"}
    assert resolved >= 0.95 * buildable, f"{resolved}/{buildable} resolved; refused: {refused}"


def test_every_refusal_and_failure_says_why(results):
    for model_type, r in results.items():
        assert r.status in ("resolved", "refused", "unbuildable")
        if r.status != "resolved":
            assert len(r.why) > 20, model_type
        else:
            assert r.parts["proof"]["passed"] is True and r.parts["proof"]["max_abs_diff"] <= \
                r.parts["proof"]["tolerance"], model_type


@pytest.mark.parametrize("model_type, final_path", [
    ("opt", "model.decoder.final_layer_norm"),  # registered before the layers: a structural guess misses it
    ("bert", "cls.predictions.transform"),  # a transform (dense, activation, norm) before the decoder
    ("roberta", "input_of:lm_head.decoder"),  # the head applies gelu functionally between its modules
    ("llama", "model.norm"),
    ("gpt2", "transformer.ln_f"),
])
def test_the_hard_cases_resolve_to_the_real_readout(results, model_type, final_path):
    r = results[model_type]
    assert r.status == "resolved" and r.parts["final_norm"] == final_path, r.why


def test_looped_models_are_refused_clearly(results):
    looped = {k: r for k, r in results.items() if "ran [" in r.why}
    assert "dory" not in results or "dory" in looped
    for r in looped.values():
        assert r.status == "refused" and "times in one forward" in r.why
