"""The promotion gate: may a newly registered version replace the champion?

`decide` is a pure function of the two versions' metrics and the configured rules, so it can be
tested and reasoned about without a registry. `promote_if_better` wraps it with the registry
side: read the champion, decide, record the decision on the candidate, move the aliases.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from components import tracking
from components.config import PromotionRules

# Float noise allowance so that a candidate equal to the champion is never "worse".
_EPS = 1e-12


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
) -> Decision:
    """Promote when every floor holds and, given a champion, no compared metric regresses by
    more than `max_regression` (so matching the champion is enough)."""
    failures: list[str] = []
    passes: list[str] = []
    compared: dict[str, dict[str, Any]] = {}

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

    if champion is None:
        passes.append("no champion yet: only the floors apply")
    else:
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

    return Decision(promote=not failures, reasons=failures or passes, compared=compared)


def judge(uri: str, model_name: str, version: str | int, rules: PromotionRules | Mapping[str, Any]) -> Decision:
    """Gate `version` against `@champion` and record the verdict as `promotion.*` tags on the
    version. Moves no alias: the pipeline's `dsl.If` branch calls `crown` when this passes."""
    rules = PromotionRules.model_validate(rules)
    version = str(version)
    candidate = tracking.get_version(uri, model_name, version)
    champion = tracking.get_alias_version(uri, model_name, tracking.CHAMPION)

    if champion is not None and str(champion.version) == version:
        decision = Decision(promote=True, reasons=[f"version {version} is already the champion"])
    else:
        decision = decide(
            tracking.version_metrics(candidate),
            None if champion is None else tracking.version_metrics(champion),
            rules,
        )
        decision.champion_version = None if champion is None else str(champion.version)

    tracking.set_version_tags(
        uri,
        model_name,
        version,
        {
            "promotion.decision": "promoted" if decision.promote else "rejected",
            "promotion.reasons": json.dumps(decision.reasons),
            "promotion.compared": json.dumps(decision.compared, sort_keys=True),
            "promotion.champion_version": decision.champion_version or "none",
        },
    )
    return decision


def crown(uri: str, model_name: str, version: str | int) -> None:
    """Make `version` the champion; the old champion keeps `previous-champion` for rollback."""
    version = str(version)
    champion = tracking.get_alias_version(uri, model_name, tracking.CHAMPION)
    if champion is not None and str(champion.version) == version:
        return
    # previous-champion first: if the second call fails, the champion is unchanged.
    if champion is not None:
        tracking.set_alias(uri, model_name, tracking.PREVIOUS_CHAMPION, champion.version)
    tracking.set_alias(uri, model_name, tracking.CHAMPION, version)


def promote_if_better(
    uri: str, model_name: str, version: str | int, rules: PromotionRules | Mapping[str, Any]
) -> Decision:
    """`judge`, then `crown` on a pass; on fail no alias moves."""
    decision = judge(uri, model_name, version, rules)
    if decision.promote:
        crown(uri, model_name, version)
    return decision


def rollback_target(uri: str, model_name: str) -> str:
    """The version a rollback returns to (`previous-champion`); LookupError if there is none."""
    previous = tracking.get_alias_version(uri, model_name, tracking.PREVIOUS_CHAMPION)
    if previous is None:
        raise LookupError(
            f"model {model_name!r} has no {tracking.PREVIOUS_CHAMPION!r} version to roll back to"
        )
    return str(previous.version)


def rollback(uri: str, model_name: str) -> str:
    """Move `champion` back to `previous-champion`; returns the version that is champion now.

    The `previous-champion` alias is removed so a second rollback cannot bounce back to the
    version that was just rolled back. `components.lifecycle.rollback` applies the serving manifest
    for that version first and calls this only once the cluster serves it.
    """
    previous = rollback_target(uri, model_name)
    current = tracking.get_alias_version(uri, model_name, tracking.CHAMPION)
    tracking.set_alias(uri, model_name, tracking.CHAMPION, previous)
    tracking.delete_alias(uri, model_name, tracking.PREVIOUS_CHAMPION)
    if current is not None:
        tracking.set_version_tags(uri, model_name, current.version, {"promotion.rolled_back_to": previous})
    return previous
