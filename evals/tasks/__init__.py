"""lm-eval tasks of the general-ability suite, as data.

Example::

    from evals.tasks import SIX_TASKS, offline_include_path
    include = offline_include_path(os.environ["NEURALDB_DATA_DIR"])   # -> ~/.cache/neuraldb/lm_eval_tasks/<key>
    TaskManager(include_path=str(include)).load(list(SIX_TASKS))

The six tasks of NeuralDB's general-ability evaluation (docs/method.md, 'General tasks') are lm-eval's own
task definitions. Online (no data dir) they are used as they are and read the hub. Offline,
:func:`offline_include_path` renders the templates beside this file (``offline_*.yaml``) into an
include path: each rendered YAML ``include:``-s the built-in definition by absolute path and
overrides only where the data comes from (``dataset_path: json`` plus absolute ``data_files``,
and ``null`` for the splits the data dir lacks). Same task names, so the built-in ``mmlu`` group
and its sub-groups pick up the 57 overridden ``mmlu_<subject>`` tasks through their tags.

Template placeholders: ``${lm_eval_tasks}`` (lm-eval's built-in task folder), ``${data_dir}``
(absolute) and, in ``offline_mmlu_subject.yaml``, ``${subject}`` (one file per subject of
:data:`evals.tasks.mmlu.SUBJECTS`). Only few-shot MMLU has local few-shot examples (its dev
split); the other tasks' train splits are not in the data dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from pathlib import Path

import yaml

from neuraldb.io import atomic_dir

__all__ = ["SIX_TASKS", "TEMPLATES", "lm_eval_tasks_dir", "offline_include_path"]

SIX_TASKS: tuple[str, ...] = ("mmlu", "sciq", "commonsense_qa", "arc_challenge", "lambada_openai", "wsc273")
TEMPLATES = Path(__file__).resolve().parent
_PER_SUBJECT = "offline_mmlu_subject.yaml"  # rendered once per MMLU subject as mmlu_<subject>.yaml


def lm_eval_tasks_dir() -> Path:
    """The folder of lm-eval's built-in task YAMLs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _yaml_str(value: str | Path) -> str:
    """``value`` escaped for a double-quoted YAML scalar (JSON escapes are valid YAML)."""
    return json.dumps(str(value))[1:-1]


def _rendered(data_dir: Path) -> dict[str, str]:
    """File name -> YAML text of the whole include path."""
    from .mmlu import SUBJECTS

    fill = {"data_dir": _yaml_str(data_dir), "lm_eval_tasks": _yaml_str(lm_eval_tasks_dir())}
    files: dict[str, str] = {}
    for template in sorted(TEMPLATES.glob("offline_*.yaml")):
        text = string.Template(template.read_text())
        if template.name == _PER_SUBJECT:
            for subject in SUBJECTS:
                files[f"mmlu_{subject}.yaml"] = text.substitute(fill, subject=subject)
        else:
            files[template.name.removeprefix("offline_")] = text.substitute(fill)
    return files


def _check_data_files(files: dict[str, str], data_dir: Path) -> None:
    """Every ``data_files`` path the rendered YAMLs name must exist (else one error naming them)."""

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    missing: dict[str, set[str]] = {}
    for name, text in files.items():
        cfg = yaml.load(text, Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
        for path in ((cfg.get("dataset_kwargs") or {}).get("data_files") or {}).values():
            if not Path(path).is_file():
                missing.setdefault(path, set()).add(name.removesuffix(".yaml"))
    if missing:
        lines = [f"  {p} (needed by {', '.join(sorted(t)[:3])}{' ...' if len(t) > 3 else ''})"
                 for p, t in sorted(missing.items())]
        raise FileNotFoundError(
            f"the data directory {data_dir} lacks files the offline tasks read:\n" + "\n".join(lines)
            + "\nlay it out as in docs/method.md, 'Data directory', or pass data_dir=None "
            "to read the tasks from the Hugging Face hub"
        )


def offline_include_path(data_dir: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the offline task YAMLs for ``data_dir``; return the folder (an lm-eval include path).

    The folder is ``<cache_dir>/<key>``, where ``cache_dir`` defaults to
    ``$NEURALDB_CACHE_DIR/lm_eval_tasks`` or ``~/.cache/neuraldb/lm_eval_tasks`` and ``key`` hashes
    the rendered files (so it changes with the data dir, lm-eval's location and the templates).
    It is written into a temporary sibling and renamed into place, so a folder that exists is
    complete; later calls reuse it. Raises ``FileNotFoundError`` if a data file is missing.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    files = _rendered(data_dir)
    _check_data_files(files, data_dir)
    key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else (
        Path(os.environ["NEURALDB_CACHE_DIR"]) / "lm_eval_tasks" if os.environ.get("NEURALDB_CACHE_DIR")
        else Path.home() / ".cache" / "neuraldb" / "lm_eval_tasks"
    )
    folder = root.expanduser().resolve() / key
    if folder.is_dir():
        return folder
    with atomic_dir(folder, existing="keep") as tmp:  # "keep": another process finished first
        for name, text in files.items():
            (tmp / name).write_text(text)
    return folder
