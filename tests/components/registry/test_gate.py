"""The promotion gate: the pure decision (components.registry.gate), then alias moves on a real MLflow sqlite
registry (components.registry.champion)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from components.registry import tracking
from components.registry.champion import promote_if_better, rollback
from components.registry.gate import Decision, PromotionRules, decide, eval_record

REPO = Path(__file__).resolve().parents[3]
RULES = PromotionRules(
    higher_is_better=["mcq_accuracy"], lower_is_better=["wer"], floors={"mcq_accuracy": 0.3}
)


def test_rules_match_the_config_section() -> None:
    section = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["promotion"]
    rules = PromotionRules.model_validate(section)
    assert rules.compare_benchmarks and rules.noise_z == pytest.approx(1.96)
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


# --- per-benchmark rules: noise margin, like-with-like data, floors -------------------------------


def _acc(right: int, n: int, name: str = "mmbench_en") -> dict[str, float]:
    """An accuracy with its standard error as the evaluate step stores them (sample std / sqrt(n))."""
    p = right / n
    return {f"{name}.mcq_accuracy": p, f"{name}.mcq_accuracy.stderr": math.sqrt(p * (1 - p) / (n - 1))}


def test_noise_margin_lets_a_one_question_drop_through() -> None:
    """36 questions: 18 -> 17 right is a drop of 0.028; the combined standard error is ~0.12, so with
    noise_z=1.96 the margin is ~0.23. The same drop with noise_z=0 is a regression."""
    rules = PromotionRules()
    champion, candidate = _acc(18, 36), _acc(17, 36)
    decision = decide(candidate, champion, rules)
    assert decision.promote, decision.reasons
    entry = decision.compared["mmbench_en.mcq_accuracy"]
    assert entry["regression"] == pytest.approx(1 / 36) and entry["noise_margin"] == pytest.approx(0.2337, abs=1e-3)
    strict = decide(candidate, champion, PromotionRules(noise_z=0.0))
    assert not strict.promote and "mmbench_en.mcq_accuracy" in strict.reasons[0]


def test_noise_margin_still_blocks_a_real_regression() -> None:
    """18 -> 8 right of 36 (0.5 -> 0.22): far outside 1.96 combined standard errors (~0.21)."""
    decision = decide(_acc(8, 36), _acc(18, 36), PromotionRules())
    assert not decision.promote
    assert "regression 0.2778" in decision.reasons[0] and "noise" in decision.reasons[0]
    # lower is better: a WER up from 0.10 to 0.30 with small standard errors regresses
    wer = decide({"fleurs_en.wer": 0.30, "fleurs_en.wer.stderr": 0.02},
                 {"fleurs_en.wer": 0.10, "fleurs_en.wer.stderr": 0.02}, PromotionRules())
    assert not wer.promote and wer.compared["fleurs_en.wer"]["higher_is_better"] is False


def test_only_the_same_data_is_compared() -> None:
    champion, candidate = _acc(30, 36), _acc(10, 36)
    other = decide(candidate, champion, PromotionRules(), {"mmbench_en": "a" * 64}, {"mmbench_en": "b" * 64})
    assert other.promote and "different data" in other.reasons[0]
    same = decide(candidate, champion, PromotionRules(), {"mmbench_en": "a" * 64}, {"mmbench_en": "a" * 64})
    assert not same.promote


def test_benchmark_floors_and_required_benchmarks() -> None:
    rules = PromotionRules.model_validate({"benchmarks": {"mmbench_en": {"floor": 0.6}, "fleurs_zh": {"floor": 0.1}}})
    ok = decide({**_acc(30, 36), "fleurs_zh.cer": 0.08}, None, rules)
    assert ok.promote
    low = decide({**_acc(18, 36), "fleurs_zh.cer": 0.08}, None, rules)
    assert not low.promote and "misses the floor 0.6" in low.reasons[0]
    high_cer = decide({**_acc(30, 36), "fleurs_zh.cer": 0.2}, None, rules)  # a maximum for CER
    assert not high_cer.promote and "maximum" in high_cer.reasons[0]
    missing = decide(_acc(30, 36), None, rules)
    assert not missing.promote and "fleurs_zh: the candidate has no score" in missing.reasons[0]


def _summary(right: int, n: int, sha: str) -> dict:
    p = right / n
    result = {"metric": "mcq_accuracy", "value": p, "stderr": math.sqrt(p * (1 - p) / (n - 1)), "items": n,
              "failed": 0, "read_failures": 0, "data_sha256": sha, "by_category": {"category": {"ocr": p}}}
    return {"benchmarks": {"mmbench_en": result}, "overall": {"mcq_accuracy": p}}


def test_registry_keeps_what_the_gate_compares(uri: str, register) -> None:
    """The evaluate step's summary -> version tags (metric.*, bench.*.data_sha256) -> the gate's verdict."""
    metrics, tags = eval_record(_summary(18, 36, "d" * 64))
    assert metrics["mmbench_en.mcq_accuracy"] == 0.5 and metrics["mmbench_en.category.ocr"] == 0.5
    assert tags == {"bench.mmbench_en.data_sha256": "d" * 64}
    model = "omni-bench-gate"
    ckpt_tags = {"pipeline_run_id": "r", "data_manifest_sha256": "d", "config_sha256": "c", "git_sha": "g"}

    def register_summary(summary: dict) -> str:
        values, data = eval_record(summary)
        run_id = tracking.start_pipeline_run(uri, "gate-test", "bench")
        ckpt = Path(tracking.client(uri).get_run(run_id).info.artifact_uri.removeprefix("file://")).parent / "ckpt"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "model.safetensors").write_bytes(b"w")
        return tracking.register_model_version(uri, model, ckpt, run_id, {**ckpt_tags, **data}, metrics=values)

    assert promote_if_better(uri, model, register_summary(_summary(18, 36, "d" * 64)), PromotionRules()).promote
    noisy = promote_if_better(uri, model, register_summary(_summary(17, 36, "d" * 64)), PromotionRules())
    assert noisy.promote and aliases(uri, model)["champion"] == "2"
    worse = promote_if_better(uri, model, register_summary(_summary(5, 36, "d" * 64)), PromotionRules())
    assert not worse.promote
    reasons = tracking.get_version(uri, model, "3").tags["promotion.reasons"]
    assert "mmbench_en.mcq_accuracy" in reasons and "noise" in reasons
    elsewhere = promote_if_better(uri, model, register_summary(_summary(5, 36, "e" * 64)), PromotionRules())
    assert elsewhere.promote and "different data" in elsewhere.reasons[0]
