"""The promotion gate: may a newly registered version replace the champion?

`decide` is a pure function of the two versions' metrics and the configured rules, so it can be
tested and reasoned about without a registry; `components.registry.champion` applies it to registered
versions. No MLflow here: the training and evaluation steps import this module (eval_record), and
MLflow's import costs each of those tasks over a second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from components.config import BenchmarkRule, PromotionRules
from model.config import BENCHMARK_METRICS, LOWER_IS_BETTER_METRICS

# Float noise allowance so that a candidate equal to the champion is never "worse".
_EPS = 1e-12
DATA_TAG = "bench.{}.data_sha256"  # version tag: the hash of the data a benchmark was scored on


class Decision(BaseModel):
    """promote: the verdict. reasons: why (the failed rules when rejected, the checks that
    passed when promoted). compared: per metric, the numbers each rule looked at."""

    promote: bool
    reasons: list[str]
    compared: dict[str, dict[str, Any]] = Field(default_factory=dict)
    champion_version: str | None = None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    rules: PromotionRules,
    candidate_data: Mapping[str, str] | None = None,
    champion_data: Mapping[str, str] | None = None,
) -> Decision:
    """Promote when every floor holds and, given a champion, nothing regresses beyond what is
    allowed: per benchmark (`<benchmark>.<metric>` keys, with their `.stderr`) by max_regression plus
    the noise margin, on the same data only (`*_data`: benchmark -> data hash); on the
    cross-benchmark means by max_regression (so matching the champion is enough)."""
    failures: list[str] = []
    passes: list[str] = []
    compared: dict[str, dict[str, Any]] = {}
    _mean_floors(candidate, rules, failures, passes, compared)
    _benchmark_rules(candidate, champion, rules, candidate_data or {}, champion_data or {}, failures, passes,
                     compared)
    if champion is None:
        passes.append("no champion yet: only the floors apply")
    else:
        _mean_regressions(candidate, champion, rules, failures, passes, compared)
    return Decision(promote=not failures, reasons=failures or passes, compared=compared)


def _mean_floors(candidate: Mapping[str, float], rules: PromotionRules, failures: list[str], passes: list[str],
                 compared: dict[str, dict[str, Any]]) -> None:
    for metric, bound in sorted(rules.floors.items()):
        value = candidate.get(metric)
        lower = metric in rules.lower_is_better
        entry = compared.setdefault(metric, {"candidate": value})
        entry["max" if lower else "min"] = bound
        if not _finite(value):
            failures.append(f"{metric}: candidate has no finite value (floor {bound:g})")
            entry["passed"] = False
            continue
        ok = value <= bound + _EPS if lower else value >= bound - _EPS
        entry["passed"] = ok
        if ok:
            passes.append(f"{metric}={value:.6g} meets the floor {bound:g}")
        else:
            side = "above the maximum" if lower else "below the floor"
            failures.append(f"{metric}={value:.6g} is {side} {bound:g}")


def _mean_regressions(candidate: Mapping[str, float], champion: Mapping[str, float], rules: PromotionRules,
                      failures: list[str], passes: list[str], compared: dict[str, dict[str, Any]]) -> None:
    directions = [(m, True) for m in rules.higher_is_better] + [(m, False) for m in rules.lower_is_better]
    for metric, higher in directions:
        cand, champ = candidate.get(metric), champion.get(metric)
        if not _finite(champ):
            # A metric the champion never reported (e.g. added later) cannot regress.
            if _finite(cand):
                passes.append(f"{metric}={cand:.6g}: champion has no value, not compared")
            continue
        entry = compared.setdefault(metric, {"candidate": cand})
        entry.update(champion=champ, higher_is_better=higher, max_regression=rules.max_regression)
        if not _finite(cand):
            entry["passed"] = False
            failures.append(f"{metric}: candidate has no value, champion has {champ:.6g}")
            continue
        regression = (champ - cand) if higher else (cand - champ)
        ok = regression <= rules.max_regression + _EPS
        entry.update(regression=regression, passed=ok)
        better = "higher" if higher else "lower"
        if ok:
            passes.append(f"{metric}={cand:.6g} vs champion {champ:.6g} ({better} is better): ok")
        else:
            failures.append(
                f"{metric}={cand:.6g} is worse than champion {champ:.6g} ({better} is better, "
                f"regression {regression:.6g} > allowed {rules.max_regression:g})"
            )


class BenchScore(BaseModel):
    metric: str
    value: float
    stderr: float = 0.0


def benchmark_scores(metrics: Mapping[str, float]) -> dict[str, BenchScore]:
    """`<benchmark>.<metric>` (and `.stderr`) entries of a version's metrics, by benchmark."""
    out = {}
    for key, value in metrics.items():
        name, _, metric = key.partition(".")
        if metric in BENCHMARK_METRICS:
            out[name] = BenchScore(metric=metric, value=value, stderr=metrics.get(f"{key}.stderr") or 0.0)
    return out


def _benchmark_rules(candidate: Mapping[str, float], champion: Mapping[str, float] | None, rules: PromotionRules,
                     cand_data: Mapping[str, str], champ_data: Mapping[str, str], failures: list[str],
                     passes: list[str], compared: dict[str, dict[str, Any]]) -> None:
    cand, champ = benchmark_scores(candidate), benchmark_scores(champion or {})
    names = sorted(set(rules.benchmarks) | (set(cand) if rules.compare_benchmarks else set()))
    for name in names:
        rule = rules.benchmarks.get(name, BenchmarkRule())
        if name not in cand:
            failures.append(f"{name}: the candidate has no score (the promotion rules name it)")
            continue
        c = cand[name]
        key, higher = f"{name}.{c.metric}", c.metric not in LOWER_IS_BETTER_METRICS
        entry = compared.setdefault(key, {"candidate": c.value, "higher_is_better": higher})
        if rule.floor is not None:
            ok = c.value >= rule.floor - _EPS if higher else c.value <= rule.floor + _EPS
            entry.update({"min" if higher else "max": rule.floor, "passed": ok})
            (passes if ok else failures).append(
                f"{key}={c.value:.6g} {'meets' if ok else 'misses'} the {'floor' if higher else 'maximum'} "
                f"{rule.floor:g}")
        if champion is not None and rule.compare:
            _compare_benchmark(name, c, champ.get(name), rule, rules, cand_data, champ_data, entry, failures,
                               passes)


def _compare_benchmark(name: str, c: BenchScore, h: BenchScore | None, rule: BenchmarkRule, rules: PromotionRules,
                       cand_data: Mapping[str, str], champ_data: Mapping[str, str], entry: dict[str, Any],
                       failures: list[str], passes: list[str]) -> None:
    key = f"{name}.{c.metric}"
    if h is None or h.metric != c.metric:
        passes.append(f"{key}: the champion has no {c.metric} on {name}, not compared")
        return
    if cand_data.get(name) and champ_data.get(name) and cand_data[name] != champ_data[name]:
        entry["compared"] = "different data"
        passes.append(f"{key}: scored on different data than the champion's (data sha256 "
                      f"{cand_data[name][:12]} vs {champ_data[name][:12]}), not compared")
        return
    higher = c.metric not in LOWER_IS_BETTER_METRICS
    allowed = rules.max_regression if rule.max_regression is None else rule.max_regression
    noise = rules.noise_z * math.sqrt(c.stderr**2 + h.stderr**2)
    regression = (h.value - c.value) if higher else (c.value - h.value)
    ok = regression <= allowed + noise + _EPS
    entry.update(champion=h.value, regression=regression, allowed=allowed, noise_margin=noise,
                 passed=entry.get("passed", True) and ok)
    text = (f"{key}={c.value:.6g} vs champion {h.value:.6g}: regression {regression:.4g}, allowed {allowed:g} + "
            f"noise {noise:.4g} ({rules.noise_z:g} x combined standard error)")
    (passes if ok else failures).append(text + (": ok" if ok else ""))


def eval_record(summary: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """What the registry keeps of an evaluation summary (components.steps.evaluation): the metrics the
    gate compares (`metric.*` version tags) and the data hash of each benchmark (`bench.*.data_sha256`)."""
    if "benchmarks" not in summary:  # a plain {metric: value} mapping
        return {k: float(v) for k, v in summary.items()}, {}
    metrics = {k: float(v) for k, v in summary.get("overall", {}).items()}
    tags = {}
    for name, r in summary["benchmarks"].items():
        metrics[f"{name}.{r['metric']}"] = r["value"]
        if r.get("stderr") is not None:
            metrics[f"{name}.{r['metric']}.stderr"] = r["stderr"]
        metrics[f"{name}.items"] = r["items"]
        metrics[f"{name}.failed"] = r["failed"] + r.get("read_failures", 0)
        for field, values in r.get("by_category", {}).items():
            metrics |= {f"{name}.{field}.{value}": v for value, v in values.items()}
        tags[DATA_TAG.format(name)] = r["data_sha256"]
    return metrics, tags
