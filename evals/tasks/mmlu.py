"""``process_docs`` for the offline MMLU subtasks: keep one subject's rows.

The local MMLU files hold all 57 subjects in one JSONL per split (``cais/mmlu`` fields plus
``subject``). The generated ``mmlu_<subject>.yaml`` files say ``process_docs: !function
evals.tasks.mmlu.<subject>``; this module answers every subject name of lm-eval's own MMLU
(``SUBJECTS``) with a filter for that subject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["SUBJECTS", "keep_subject"]


def _subjects() -> tuple[str, ...]:
    import lm_eval.tasks

    default = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    return tuple(sorted(p.stem.removeprefix("mmlu_") for p in default.glob("mmlu_*.yaml")))


SUBJECTS: tuple[str, ...] = _subjects()


def keep_subject(dataset: Any, *, subject: str) -> Any:
    """The rows of ``dataset`` (a ``datasets.Dataset``) whose ``subject`` is ``subject``."""
    rows = [i for i, s in enumerate(dataset["subject"]) if s == subject]
    return dataset.select(rows)


def _keeper(subject: str) -> Any:
    def keep(dataset: Any) -> Any:
        return keep_subject(dataset, subject=subject)

    keep.__name__ = keep.__qualname__ = subject
    return keep


def __getattr__(name: str) -> Any:  # `evals.tasks.mmlu.<subject>`, for every subject in SUBJECTS
    if name in SUBJECTS:
        return _keeper(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (not an MMLU subject)")
