"""Text sources of the false-fire report: the evaluated unrelated text and the calibration text."""

from __future__ import annotations

import json
from pathlib import Path

from .measure import load_passages


def calibration_texts(data_dir: Path, path: str | None = None, limit: int | None = None) -> list[str]:
    """Generic text for per-key thresholds: a file (one passage a line / JSONL), or the general
    tasks' inputs in the data dir: SciQ support passages, MMLU questions (every 5th), then
    ARC-Challenge and CommonsenseQA questions and WSC sentences (whichever are there)."""
    if path:
        return load_passages(path, limit=limit)
    out: list[str] = []

    def field(rel: str, key: str, step: int = 1) -> list[str]:
        f = data_dir / rel
        if not f.is_file():
            return []
        rows = [json.loads(x) for x in open(f, encoding="utf-8") if x.strip()][::step]
        return [t for t in (r.get(key, "") for r in rows) if isinstance(t, str) and t.strip()]

    out += field("sciq/sciq_test.jsonl", "support")
    out += field("mmlu/mmlu_test.jsonl", "question", 5)
    if not out:
        raise FileNotFoundError(f"no calibration text in {data_dir} (sciq/, mmlu/); pass --calib-text FILE")
    out += field("arc_challenge/arc_challenge_test.jsonl", "question")
    out += field("commonsense_qa/commonsense_qa_validation.jsonl", "question")
    out += field("wsc273/wsc273_test.jsonl", "text")
    return out[:limit] if limit else out


def _slice(spec: str | None) -> tuple[int, int | None]:
    if not spec:
        return 0, None
    lo, _, hi = spec.partition(":")
    return int(lo or 0), (int(hi) if hi else None)


def load_text_spec(spec: str, data_dir: Path, evaluated: tuple[str | None, str | None] = (None, None)) -> list[str]:
    """``default``, ``lambada[@START:END]``, or ``FILE[@START:END]``.

    ``default`` is the general tasks' inputs (:func:`calibration_texts`) plus the LAMBADA
    passages that are not evaluated: ``evaluated`` is the run's (``--text``, ``--passages``);
    with ``--text`` another file all of LAMBADA is used, with LAMBADA only the passages
    outside the evaluated slice.
    """
    name, _, sl = spec.partition("@")
    lo, hi = _slice(sl)
    if name == "default":
        texts = calibration_texts(data_dir)[lo:hi]
        lambada = data_dir / "lambada_openai" / "lambada_test.jsonl"
        text, passages = evaluated
        if lambada.is_file() and not sl:
            all_l = load_passages(lambada)
            if text is None:  # the evaluated text is LAMBADA: only the other passages
                elo, ehi = _slice(passages)
                ehi = len(all_l) if ehi is None else ehi
                all_l = all_l[:elo] + all_l[ehi:]
            texts += all_l
        return texts
    return unrelated_texts(None if name == "lambada" else name, data_dir)[lo:hi]


GLUE_SENTENCES = {"sst2": ("sentence",), "rte": ("sentence1", "sentence2"), "mrpc": ("sentence1", "sentence2"),
                  "cola": ("sentence",)}


def unrelated_texts(text: str | None, data_dir: Path) -> list[str]:
    """``--text``: None (LAMBADA), ``glue`` (the GLUE validation sentences in the data dir:
    SST-2, RTE, MRPC, CoLA, one text per sentence), or a file (one passage a line / JSONL)."""
    if text != "glue":
        return load_passages(text, data_dir=data_dir)
    out = []
    for task, fields in GLUE_SENTENCES.items():
        f = data_dir / "glue" / f"{task}_validation.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"--text glue: {f} is missing (GLUE validation files in the data dir)")
        for line in open(f, encoding="utf-8"):
            if line.strip():
                rec = json.loads(line)
                out += [rec[k].replace("\n", " ").strip() for k in fields if str(rec.get(k, "")).strip()]
    return out
