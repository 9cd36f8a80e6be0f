"""Log-likelihood scoring of options (lm-evaluation-harness's way for MMLU, CMMLU, C-Eval): the
answer is the option letter whose assistant turn the model finds most likely after the prompt, so
the score does not depend on how the model phrases a free-form answer."""

from __future__ import annotations

from dataclasses import replace

import torch

from model.nn.devices import to_consumers
from model.nn.generation import OmniChat
from model.text.processor import IGNORE_INDEX, ChatInput


@torch.no_grad()
def answer_logprobs(chat: OmniChat, prompts: list[ChatInput], answers: list[list[str]]) -> list[list[float]]:
    """For each prompt, the summed log-probability of each of its candidate assistant turns
    (the answer's tokens and the turn's end token)."""
    samples, owners = [], []
    for i, (prompt, candidates) in enumerate(zip(prompts, answers, strict=True)):
        for text in candidates:
            conv = replace(prompt, messages=[*prompt.messages, {"role": "assistant", "content": text}])
            samples.append(chat.processor.encode(conv))
            owners.append(i)
    batch = to_consumers(chat.model, chat.processor.collate(samples))
    labels = batch.pop("labels")
    logits = chat.model(**batch).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    totals = (picked * (target != IGNORE_INDEX)).sum(-1).tolist()
    out: list[list[float]] = [[] for _ in prompts]
    for owner, total in zip(owners, totals, strict=True):
        out[owner].append(total)
    return out


def pick_by_loglik(chat: OmniChat, prompts: list[ChatInput], letters: list[list[str]]) -> list[str]:
    """The most likely option letter of each prompt."""
    scores = answer_logprobs(chat, prompts, letters)
    return [opts[max(range(len(opts)), key=s.__getitem__)] for opts, s in zip(letters, scores, strict=True)]
