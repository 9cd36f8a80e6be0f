"""The registry side of the promotion gate: judge a registered version against `@champion`
(components.registry.gate.decide on their `metric.*` tags), record the verdict on it, move the aliases
(crown, rollback)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from components.config import PromotionRules
from components.registry import tracking
from components.registry.gate import DATA_TAG, Decision, decide


def version_data(version) -> dict[str, str]:
    """benchmark -> data hash, from a registered version's tags."""
    pre, post = DATA_TAG.split("{}")
    return {k[len(pre):-len(post)]: v for k, v in version.tags.items() if k.startswith(pre) and k.endswith(post)}


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
            version_data(candidate),
            None if champion is None else version_data(champion),
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
    version that was just rolled back. `components.steps.lifecycle.rollback` applies the serving manifest
    for that version first and calls this only once the cluster serves it.
    """
    previous = rollback_target(uri, model_name)
    current = tracking.get_alias_version(uri, model_name, tracking.CHAMPION)
    tracking.set_alias(uri, model_name, tracking.CHAMPION, previous)
    tracking.delete_alias(uri, model_name, tracking.PREVIOUS_CHAMPION)
    if current is not None:
        tracking.set_version_tags(uri, model_name, current.version, {"promotion.rolled_back_to": previous})
    return previous
