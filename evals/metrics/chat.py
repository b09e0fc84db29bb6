"""Chat: the edit asked as a chat question, answered by greedy generation, judged by containment.

Example::

    from evals.metrics.chat import chat_question, chat_scores, judge, missing_chat_template
    chat_question("The Eiffel Tower is located in the city of")
    # 'Complete the sentence in a few words: The Eiffel Tower is located in the city of...'
    if missing_chat_template(tok) is None:
        results = chat_scores(model=model, tokenizer=tok, cases=cases)   # attach the store for "post"
    judge(answer="It's in Rome.", target_new="Rome", target_true="Paris")   # 'new'

Card
----
Measures: whether an edit shows in how an instruct model is used, a chat turn answered by
free generation, where teacher-forced ES/PS ("The Mirage of Model Editing", arXiv
2502.11177) can overstate success.

Question (one fixed rule, ``QUESTION``): the user message is ``"Complete the sentence in a
few words: " + text + "..."`` where ``text`` is the filled edit prompt (``chat_efficacy``)
or a paraphrase (``chat_generalization``), trailing spaces removed. It is formatted with
``tokenizer.apply_chat_template([{"role": "user", "content": ...}], add_generation_prompt=True)``
(the template's own system prompt, if any, is kept) and tokenised without adding special
tokens again (the template writes them).

Generation: greedy (``do_sample=False``) through ``model.generate``, batched with left
padding and an attention mask, until EOS (the tokenizer's and the generation config's EOS
ids) or ``max_new_tokens`` (default 16) new tokens. The answer is the new tokens up to the
first EOS, decoded without special tokens. Greedy decoding is deterministic for a given
batch composition.

Judge (``judge``): text is normalised by NFKD, dropping combining marks, case folding and
turning every run of non-alphanumeric characters into one space; a target is contained when
its normalised words occur as a contiguous run of the answer's normalised words. So
"Football." contains "football", "football club" does, "footballer" and "foot ball" do NOT
(whole words only), "Rolls-Royce" matches "Rolls Royce". When one target's words contain
the other's (new "North Korea", true "Korea"), the shorter one only counts outside the
longer one's matches. Verdict: ``new`` (new only), ``true`` (true only), ``both`` or
``neither``; a prompt succeeds when the verdict is ``new``. Per case: ``chat_efficacy`` is
0/1 (one edit prompt: Wilson interval, McNemar), ``chat_generalization`` the fraction over
paraphrases (t interval, paired t). Pre: store detached; post: attached.

A tokenizer without a chat template (``tokenizer.chat_template`` unset): the metrics are
skipped with that reason, never approximated with a made-up template.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .tokens import eval_mode, model_device, pad_id

__all__ = ["ChatCaseResult", "QUESTION", "VERDICTS", "chat_prompt_ids", "chat_question", "chat_scores", "contains",
           "examples", "generate_answers", "judge", "missing_chat_template", "normalize", "summary_extras",
           "verdict_counts"]

log = logging.getLogger(__name__)
QUESTION = "Complete the sentence in a few words: {text}..."
VERDICTS = ("new", "true", "both", "neither")


def missing_chat_template(tokenizer: Any) -> str | None:
    """None when ``tokenizer`` can format chats; otherwise why the chat metrics are skipped."""
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        return f"the tokenizer ({type(tokenizer).__name__}) has no apply_chat_template"
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        return (f"the tokenizer {name!r} has no chat template (tokenizer.chat_template is unset; a base model): "
                "the chat metrics need an instruct/chat model's template")
    return None


def chat_question(text: str) -> str:
    """The user message for a filled prompt (see the card)."""
    return QUESTION.format(text=text.rstrip())


def chat_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of the chat-formatted question about ``text``, ending with the assistant turn's start."""
    messages = [{"role": "user", "content": chat_question(text)}]
    formatted = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(formatted, add_special_tokens=False)["input_ids"])


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = {getattr(tokenizer, "eos_token_id", None)}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {i for i in ids if isinstance(i, int)}


@torch.no_grad()
def generate_answers(*, model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers (decoded new tokens up to the first EOS), one per prompt of token ids."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"need max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens}, {batch_size}")
    device, pad, stops = model_device(model), pad_id(tokenizer), _stop_ids(model, tokenizer)
    answers = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    with eval_mode(model):
        for begin in range(0, len(order), batch_size):
            idx = order[begin:begin + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, T) left padded
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):
                ids[b, width - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
                mask[b, width - len(prompts[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=sorted(stops) or None, num_beams=1)
            new = out[:, width:].cpu().tolist()  # (B, <= max_new_tokens)
            for b, i in enumerate(idx):
                toks = new[b]
                cut = next((t for t, x in enumerate(toks) if x in stops), len(toks))
                answers[i] = tokenizer.decode(toks[:cut], skip_special_tokens=True).strip()
    return answers


def normalize(text: str) -> tuple[str, ...]:
    """The words of ``text`` for the judge: NFKD, no combining marks, case-folded, split on non-alphanumerics."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return tuple(w for w in re.split(r"[\W_]+", text.casefold()) if w)


def _runs(words: Sequence[str], target: Sequence[str]) -> list[tuple[int, int]]:
    n = len(target)
    return [(i, i + n) for i in range(len(words) - n + 1) if n and tuple(words[i:i + n]) == tuple(target)]


def contains(answer: str, target: str, *, outside: str | None = None) -> bool:
    """Whether ``target``'s words occur as a whole-word run in ``answer`` (normalised), not inside a
    match of ``outside`` when ``outside`` is given (used for a target contained in the other)."""
    words = normalize(answer)
    spans = _runs(words, normalize(target))
    if outside is not None:
        blocked = _runs(words, normalize(outside))
        spans = [s for s in spans if not any(a <= s[0] and s[1] <= b for a, b in blocked)]
    return bool(spans)


def judge(*, answer: str, target_new: str, target_true: str | None) -> str:
    """'new', 'true', 'both' or 'neither' (see the card)."""
    new_w, true_w = normalize(target_new), normalize(target_true or "")
    longer_new = bool(true_w) and len(new_w) > len(true_w) and _runs(new_w, true_w)
    longer_true = bool(true_w) and len(true_w) > len(new_w) and _runs(true_w, new_w)
    has_new = contains(answer, target_new, outside=target_true if longer_true else None)
    has_true = bool(true_w) and contains(answer, target_true, outside=target_new if longer_new else None)
    return {(True, False): "new", (False, True): "true", (True, True): "both"}.get((has_new, has_true), "neither")


@dataclass(frozen=True)
class ChatCaseResult:
    case_id: int
    efficacy: float | None  # 0/1 on the edit prompt
    generalization: float | None  # fraction over the paraphrases; None without paraphrases
    answers: tuple[tuple[str, str, str], ...]  # (group "edit"/"paraphrase", answer, verdict)


def chat_scores(*, model: Any, tokenizer: Any, cases: Sequence[Any], max_new_tokens: int = 16,
                batch_size: int = 16, paraphrases: bool = True) -> list[ChatCaseResult]:
    """Answer every case's edit prompt (and paraphrases) as a chat question; judge each answer."""
    reason = missing_chat_template(tokenizer)
    if reason is not None:
        raise ValueError(reason)
    items: list[tuple[int, str, str]] = []  # (case index, group, text)
    for k, case in enumerate(cases):
        items.append((k, "edit", case.fact.text))
        if paraphrases:
            items += [(k, "paraphrase", p) for p in case.fact.paraphrases]
    prompts = [chat_prompt_ids(tokenizer, text) for _, _, text in items]
    answers = generate_answers(model=model, tokenizer=tokenizer, prompts=prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    per_case: list[list[tuple[str, str, str]]] = [[] for _ in cases]
    for (k, group, _), answer in zip(items, answers):
        fact = cases[k].fact
        per_case[k].append((group, answer, judge(answer=answer, target_new=fact.target_new,
                                                 target_true=fact.target_true)))
    out = []
    for case, rows in zip(cases, per_case):
        edit = [float(v == "new") for g, _, v in rows if g == "edit"]
        para = [float(v == "new") for g, _, v in rows if g == "paraphrase"]
        out.append(ChatCaseResult(case.case_id, edit[0] if edit else None,
                                  sum(para) / len(para) if para else None, tuple(rows)))
    return out


def verdict_counts(answers: Sequence[Sequence[Sequence[str]] | None], group: str) -> dict[str, int]:
    """How many answers of ``group`` got each verdict, over cases' ``(group, answer, verdict)`` rows."""
    counts = Counter(v for rows in answers if rows for g, _, v in rows if g == group)
    return {v: counts.get(v, 0) for v in VERDICTS}


def summary_extras(*, name: str, pre: Sequence[Any], post: Sequence[Any], max_new_tokens: int) -> dict[str, Any]:
    """What the report adds to a chat metric's summary: verdict counts pre/post and the protocol."""
    group = "edit" if name == "chat_efficacy" else "paraphrase"
    return {"verdicts": {"pre": verdict_counts(pre, group), "post": verdict_counts(post, group)},
            "question": QUESTION, "max_new_tokens": max_new_tokens, "decoding": "greedy, left padded, stop at EOS",
            "judge": "normalised whole-word containment of target_new and not target_true"}


def examples(*, cases: Sequence[Mapping[str, Any]], n: int = 3) -> list[dict[str, Any]]:
    """The first ``n`` cases' edit-prompt answers pre and post, from report case records."""
    rows = []
    for c in cases:
        detail = c.get("detail") or {}
        pre, post = ((detail.get(p) or {}).get("chat") for p in ("pre", "post"))
        if pre or post:
            first = [next((r for r in (x or []) if r[0] == "edit"), None) for x in (pre, post)]
            rows.append({"fact_id": c.get("fact_id"), "pre": first[0], "post": first[1]})
        if len(rows) >= n:
            break
    return rows
