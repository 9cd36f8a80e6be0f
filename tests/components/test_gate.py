"""The promotion gate: the pure decision, then alias moves on a real MLflow sqlite registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from components import tracking
from components.gate import Decision, PromotionRules, decide, promote_if_better, rollback

REPO = Path(__file__).resolve().parents[2]
RULES = PromotionRules(
    higher_is_better=["mcq_accuracy"], lower_is_better=["wer"], floors={"mcq_accuracy": 0.3}
)


def test_rules_match_the_config_section() -> None:
    section = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["promotion"]
    rules = PromotionRules.model_validate(section)
    assert "wer" in rules.lower_is_better
    with pytest.raises(ValidationError):
        PromotionRules.model_validate({**section, "max_regresion": 0.1})
    with pytest.raises(ValidationError, match="both"):
        PromotionRules(higher_is_better=["wer"], lower_is_better=["wer"])
    with pytest.raises(ValidationError):
        PromotionRules(max_regression=-0.1)


def test_no_champion_promotes_when_floors_pass() -> None:
    assert decide({"mcq_accuracy": 0.5}, None, RULES).promote
    low = decide({"mcq_accuracy": 0.2}, None, RULES)
    assert not low.promote and "mcq_accuracy" in low.reasons[0] and "floor" in low.reasons[0]
    missing = decide({"wer": 0.1}, None, RULES)
    assert not missing.promote and "mcq_accuracy" in missing.reasons[0]


def test_floor_of_a_lower_is_better_metric_is_a_maximum() -> None:
    rules = PromotionRules(lower_is_better=["wer"], floors={"wer": 0.5})
    assert decide({"wer": 0.4}, None, rules).promote
    assert not decide({"wer": 0.6}, None, rules).promote


def test_compare_with_champion() -> None:
    champion = {"mcq_accuracy": 0.5, "wer": 0.2}
    assert decide(champion, champion, RULES).promote  # beat or match
    better = decide({"mcq_accuracy": 0.6, "wer": 0.1}, champion, RULES)
    assert better.promote
    assert better.compared["wer"]["regression"] == pytest.approx(-0.1)

    worse_acc = decide({"mcq_accuracy": 0.4, "wer": 0.1}, champion, RULES)
    assert not worse_acc.promote and len(worse_acc.reasons) == 1 and "mcq_accuracy" in worse_acc.reasons[0]
    # Lower is better: a higher WER is a regression even though the number grew.
    worse_wer = decide({"mcq_accuracy": 0.6, "wer": 0.3}, champion, RULES)
    assert not worse_wer.promote and len(worse_wer.reasons) == 1 and "wer" in worse_wer.reasons[0]
    assert worse_wer.compared["wer"]["passed"] is False

    missing = decide({"mcq_accuracy": 0.6}, champion, RULES)
    assert not missing.promote and "wer" in missing.reasons[0]


def test_max_regression_allows_small_losses() -> None:
    rules = RULES.model_copy(update={"max_regression": 0.05})
    champion = {"mcq_accuracy": 0.5, "wer": 0.2}
    assert decide({"mcq_accuracy": 0.46, "wer": 0.24}, champion, rules).promote
    assert not decide({"mcq_accuracy": 0.44, "wer": 0.2}, champion, rules).promote


def test_metric_the_champion_lacks_is_not_compared() -> None:
    decision = decide({"mcq_accuracy": 0.5, "wer": 0.9}, {"mcq_accuracy": 0.5}, RULES)
    assert decision.promote
    assert isinstance(decision, Decision)


def test_nan_candidate_fails() -> None:
    assert not decide({"mcq_accuracy": float("nan")}, {"mcq_accuracy": 0.5}, RULES).promote


# --- registry side -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tracking.tracking_uri(None, tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def register(uri: str, tmp_path_factory: pytest.TempPathFactory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    run_id = tracking.start_pipeline_run(uri, "gate-test", "pipeline")
    tags = {"pipeline_run_id": run_id, "data_manifest_sha256": "d", "config_sha256": "c", "git_sha": "g"}

    def _register(model: str, metrics: dict[str, float]) -> str:
        return tracking.register_model_version(uri, model, ckpt, run_id, tags, metrics=metrics)

    return _register


def aliases(uri: str, model: str) -> dict[str, str]:
    return {k: str(v) for k, v in tracking.client(uri).get_registered_model(model).aliases.items()}


def test_gate_moves_champion_only_on_pass(uri: str, register) -> None:
    model = "omni-gate"
    v1 = register(model, {"mcq_accuracy": 0.5, "wer": 0.2})
    first = promote_if_better(uri, model, v1, RULES)
    assert first.promote and first.champion_version is None
    assert aliases(uri, model) == {"champion": "1", "challenger": "1"}

    v2 = register(model, {"mcq_accuracy": 0.4, "wer": 0.2})
    worse = promote_if_better(uri, model, v2, RULES.model_dump())  # a plain config mapping works too
    assert not worse.promote and worse.champion_version == "1"
    assert any("mcq_accuracy" in r for r in worse.reasons)
    assert aliases(uri, model) == {"champion": "1", "challenger": "2"}
    tags = tracking.get_version(uri, model, v2).tags
    assert tags["promotion.decision"] == "rejected"
    assert "mcq_accuracy" in tags["promotion.reasons"]
    assert tags["promotion.champion_version"] == "1"

    v3 = register(model, {"mcq_accuracy": 0.5, "wer": 0.2})  # equal to the champion
    equal = promote_if_better(uri, model, v3, RULES)
    assert equal.promote
    assert aliases(uri, model) == {"champion": "3", "challenger": "3", "previous-champion": "1"}
    assert tracking.get_version(uri, model, v3).tags["promotion.decision"] == "promoted"

    v4 = register(model, {"mcq_accuracy": 0.9, "wer": 0.35})  # better accuracy, worse WER
    mixed = promote_if_better(uri, model, v4, RULES)
    assert not mixed.promote and mixed.reasons == [r for r in mixed.reasons if "wer" in r]
    assert aliases(uri, model)["champion"] == "3"

    again = promote_if_better(uri, model, v3, RULES)  # re-running the gate is harmless
    assert again.promote
    assert aliases(uri, model) == {"champion": "3", "challenger": "4", "previous-champion": "1"}


def test_rollback_restores_previous_champion(uri: str, register) -> None:
    model = "omni-rollback"
    promote_if_better(uri, model, register(model, {"mcq_accuracy": 0.5}), RULES)
    with pytest.raises(LookupError):
        rollback(uri, model)
    promote_if_better(uri, model, register(model, {"mcq_accuracy": 0.6}), RULES)
    assert rollback(uri, model) == "1"
    assert aliases(uri, model) == {"champion": "1", "challenger": "2"}
    assert tracking.get_version(uri, model, 2).tags["promotion.rolled_back_to"] == "1"
