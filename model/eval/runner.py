"""The benchmark runner: a benchmark's items -> prompts -> answers (batched, KV-cached greedy
generation, or option log-likelihood) -> scored rows.

- Every item ends as a row: answered, or failed with its reason (media over the benchmark's limits,
  undecodable, too long for the model), and a failed row is scored as an empty answer.
- CircularEval: an MCQ item without circular copies in its file is asked once per rotation of its
  options (`model.eval.mcq.rotations`); its rows share a group.
- Resumable: answers go to a `PredictionCache` batch by batch; a rerun asks only what is missing.
- Shardable: rank r of w answers items r, r + w, ...; every rank writes its own cache parts, and the
  primary rank scores once all parts are in (after a barrier when a process group is up).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from tqdm import tqdm

from model import runtime
from model.config import BenchmarkConfig, EvalConfig
from model.eval.cache import PredictionCache
from model.eval.items import BenchItem, ScoreRow
from model.eval.loglik import pick_by_loglik
from model.eval.mcq import rotations
from model.eval.readers import BenchData
from model.media.decode import MediaError
from model.media.inputs import ChatInput, MediaReader, RawMedia
from model.media.limits import MediaLimits
from model.media.tags import MEDIA_KINDS
from model.nn.generation import OmniChat


@dataclass
class BenchmarkRun:
    rows: list[ScoreRow]  # every item, in the benchmark's order (empty on ranks other than the primary)
    prompts: dict[str, str]  # item id -> the user turn the model saw
    answered: int  # items this call asked the model (the rest came from the cache)
    cached: int


def expand(items: list[BenchItem], spec: BenchmarkConfig) -> list[BenchItem]:
    """CircularEval rotations for items that do not come with their copies (VLMEvalKit TSVs do)."""
    if not spec.circular:
        return items
    out = []
    for item in items:
        if item.group is not None or len(item.choices) < 2 or item.answers[0] not in item.choices:
            out.append(item)
            continue
        for k, (choices, gold) in enumerate(rotations(item.choices, item.answers[0])):
            out.append(replace(item, id=item.id if k == 0 else f"{item.id}#r{k}", choices=choices, answers=[gold],
                               group=item.id))
    return out


def prompt_text(item: BenchItem, spec: BenchmarkConfig) -> str:
    """The user turn: media tags, pre-prompt, hint, question, lettered options, post-prompt."""
    hint = f"Hint: {item.hint}\n" if spec.prompt.hint and item.hint else ""
    options = "".join(f"\n{k}. {v}" for k, v in item.choices.items())
    return f"{item.media_tags()}{spec.prompt.pre_prompt}{hint}{item.question}{options}{spec.prompt.post_prompt}"


def limits_of(name: str, spec: BenchmarkConfig) -> MediaLimits:
    return MediaLimits.of(f"benchmark.{name}.limits", spec.limits)


def chat_input(item: BenchItem, spec: BenchmarkConfig, chat: OmniChat, limits: MediaLimits) -> ChatInput:
    """The conversation for `item` with its media decoded under the benchmark's limits (MediaError if not)."""
    messages = ([{"role": "system", "content": spec.prompt.system}] if spec.prompt.system else [])
    media = [RawMedia(kind, src, f"{kind}s[{i}]", spec.use_audio_in_video) for kind in MEDIA_KINDS
             for i, src in enumerate(getattr(item, kind + "s"))]
    return MediaReader(chat.model.cfg, limits).chat_input(
        [*messages, {"role": "user", "content": prompt_text(item, spec)}], media)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The answer up to the first stop string (lmms-eval's `until`)."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut].strip()


def _answer_batch(chat: OmniChat, spec: BenchmarkConfig, batch: list[BenchItem], limits: MediaLimits) -> list[dict]:
    rows: list[dict] = []
    ready: list[tuple[BenchItem, ChatInput]] = []
    for item in batch:
        try:
            sample = chat_input(item, spec, chat, limits)
            n_tokens = len(chat.processor.encode(sample, add_generation_prompt=True).input_ids)
        except (MediaError, ValueError) as err:
            kind = getattr(err, "kind", None) or "bad input"
            rows.append({"id": item.id, "failed": f"{kind}: {err}"})
            continue
        window = chat.model.cfg.max_seq_len
        if n_tokens + spec.generation.max_new_tokens > window and spec.scoring == "generate":
            rows.append({"id": item.id, "failed": f"prompt is {n_tokens} tokens; with max_new_tokens="
                         f"{spec.generation.max_new_tokens} that exceeds model.max_seq_len={window}"})
            continue
        ready.append((item, sample))
    if ready:
        items, inputs = zip(*ready, strict=True)
        if spec.scoring == "loglikelihood":
            answers = pick_by_loglik(chat, list(inputs), [list(i.choices) for i in items])
        else:
            texts = chat.generate(list(inputs), max_new_tokens=spec.generation.max_new_tokens)
            answers = [cut_at_stop(t, spec.generation.stop) for t in texts]
        rows += [{"id": i.id, "prediction": a} for i, a in zip(items, answers, strict=True)]
    return rows


def _batches(items: list[BenchItem], size: int) -> Iterator[list[BenchItem]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_benchmark(chat: OmniChat, name: str, spec: BenchmarkConfig, data: BenchData, cfg: EvalConfig,
                  cache: PredictionCache, progress: bool = True) -> BenchmarkRun:
    """Answer this rank's share of the benchmark (resuming from `cache`), then, on the primary rank,
    return every item's row. (Rows the reader could not use have no key to score: `data.failures`
    reports them.)"""
    items = expand(data.items[: cfg.max_samples] if cfg.max_samples else data.items, spec)
    ranks = runtime.ranks()
    mine = items[ranks.rank :: ranks.world_size]
    done = cache.done()
    todo = [i for i in mine if i.id not in done]
    limits = limits_of(name, spec)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=name, unit="item", disable=not progress)
    for batch in _batches(todo, cfg.batch_size):
        cache.append(_answer_batch(chat, spec, batch, limits))
        bar.update(len(batch))
    bar.close()
    _barrier(ranks.world_size)
    prompts = {i.id: prompt_text(i, spec) for i in items}
    if not ranks.primary:
        return BenchmarkRun([], prompts, len(todo), len(mine) - len(todo))
    return BenchmarkRun(_rows(items, cache.done(), name), prompts, len(todo), len(mine) - len(todo))


def _barrier(world_size: int) -> None:
    import sys

    dist = sys.modules.get("torch.distributed")
    if world_size > 1 and dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rows(items: list[BenchItem], answers: dict[str, dict], name: str) -> list[ScoreRow]:
    missing = [i.id for i in items if i.id not in answers]
    if missing:
        raise RuntimeError(f"benchmark {name}: {len(missing)} items have no answer yet (first: {missing[0]!r}); "
                           "are other ranks still running?")
    return [ScoreRow(id=i.id, prediction=answers[i.id].get("prediction", ""), answers=i.answers,
                     choices=i.choices or None, lang=i.lang, category=i.category, group=i.group,
                     failed=answers[i.id].get("failed")) for i in items]
