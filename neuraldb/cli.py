"""The ``neuraldb`` command line.

Example::

    neuraldb demo                                   # edit the shipped facts into SmolLM2
    neuraldb edit --model smollm2-135m --facts facts.json --out store.safetensors
    neuraldb evaluate --model smollm2-135m --dataset counterfact --n 100
    neuraldb gate --model smollm2-135m --store store.safetensors --policy policy.yaml
    neuraldb settings --config llama3/config.json --model-name meta-llama/Meta-Llama-3-8B
    neuraldb harness -- --model neuraldb --model_args pretrained=smollm2-135m --tasks sciq --limit 20

Sub-commands are data: :data:`COMMANDS` maps each name to its help line and two
``"module:function"`` targets (one adds the sub-command's arguments to its parser, one
runs it and returns the exit code), named lazily as lm-eval's registry names its models.
A target is imported only when its sub-command runs: ``neuraldb --help`` imports nothing
more and lists every sub-command, and a sub-command whose module cannot be imported (a
missing optional dependency, a broken module) fails when it is run, loudly: the traceback,
then one line naming the module and the exception, exit code 3. ``COMMANDS`` (and
``_load_facts`` reading a CounterFact/ZsRE file with ``evals.datasets``) are the only
places the core names ``evals``; it names no ``properties`` module.

Exit codes: 0 ok, 1 a failed check (``gate``), 2 a usage or input error, 3 the
sub-command could not be loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["COMMANDS", "Command", "CommandLoadError", "build_parser", "load_command", "main"]

EXIT_INPUT_ERROR = 2
EXIT_NOT_LOADED = 3


@dataclass(frozen=True)
class Command:
    """A sub-command: its help line and two ``"module:function"`` targets.

    ``arguments(parser)`` adds the sub-command's arguments to its ``argparse`` parser;
    ``run(args) -> int`` runs it on the parsed ``argparse.Namespace`` and returns the exit code.
    """

    help: str
    arguments: str
    run: str


# Sub-command -> targets, imported only when that sub-command runs.
COMMANDS: dict[str, Command] = {
    "demo": Command("edit a handful of facts into the default model, before/after",
                    "neuraldb.cli:_add_demo_arguments", "neuraldb.cli:_run_demo"),
    "edit": Command("edit facts from a file into a store (resumable)",
                    "neuraldb.cli:_add_edit_arguments", "neuraldb.cli:_run_edit"),
    "forget": Command("remove facts from a store as if never edited (re-fits the facts sharing their residual)",
                      "neuraldb.cli:_add_forget_arguments", "neuraldb.cli:_run_forget"),
    "settings": Command("the edit settings (layer, lr, steps) a model gets and where each comes from",
                        "neuraldb.cli:_add_settings_arguments", "neuraldb.cli:_run_settings"),
    "evaluate": Command("edit the first N facts of a dataset and evaluate them (pre/post)",
                        "evals.cli:add_evaluate_arguments", "evals.cli:run_evaluate"),
    "gpu-evals": Command("the paper's scale in one job: CounterFact (10,000) and ZsRE edited and evaluated, then the gate",
                         "evals.gpu_evals:add_gpu_evals_arguments", "evals.gpu_evals:run_gpu_evals"),
    "compare": Command("compare two saved reports without re-running",
                       "evals.cli:add_compare_arguments", "evals.cli:run_compare"),
    "gate": Command("the release gate: decide whether an edited checkpoint may be released",
                    "evals.gate:add_gate_arguments", "evals.gate:run_gate"),
    "study": Command("scaling study: gated vs linear reader at several sizes (--sequential RxK: edits in rounds)",
                     "evals.study:add_study_arguments", "evals.study:run_study_cli"),
    "fire-rate": Command("the gate's false fires on unrelated text and its paraphrase recall",
                         "evals.firing.fire_rate:add_fire_rate_arguments", "evals.firing.fire_rate:run_fire_rate"),
    "gate-variants": Command("candidate gate fixes: false fires vs paraphrase recall on the same activations",
                             "evals.firing.gate_variants:add_gate_variants_arguments",
                             "evals.firing.gate_variants:run_gate_variants"),
    "harness": Command("lm-eval's own command line with the neuraldb model registered (its arguments after --)",
                       "evals.harness:add_harness_arguments", "evals.harness:run_harness"),
}


class CommandLoadError(RuntimeError):
    """A sub-command's target could not be imported or found (``__cause__``: the import's exception)."""

    def __init__(self, command: str, target: str, what: str) -> None:
        self.command, self.target, self.module = command, target, target.partition(":")[0]
        super().__init__(f"sub-command {command!r} cannot be loaded ({target}): {what}")


def _packages() -> set[str]:
    """The top-level packages of the table's targets (a module missing there is not an extra)."""
    return {t.partition(":")[0].partition(".")[0] for c in COMMANDS.values() for t in (c.arguments, c.run)}


def load_command(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """``(arguments, run)`` of sub-command ``name``: :class:`CommandLoadError` if either cannot be loaded."""
    command = COMMANDS[name]
    found = []
    for target in (command.arguments, command.run):
        module, _, function = target.partition(":")
        try:
            loaded = importlib.import_module(module)
        except Exception as exc:  # whatever the module raised on import: reported, never skipped
            what = f"importing {module} raised {type(exc).__name__}: {exc}"
            missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
            if missing and missing.partition(".")[0] not in _packages():
                what += "; is the 'eval' extra installed? pip install 'neuraldb[eval]'"
            raise CommandLoadError(name, target, what) from exc
        if not callable(getattr(loaded, function, None)):
            raise CommandLoadError(name, target, f"{module} has no function {function!r}")
        found.append(getattr(loaded, function))
    return found[0], found[1]


def _says(answer: str, target: str) -> bool:
    """The demo's judge: the answer, less a leading article, starts with the target ("a footballer" says football)."""
    words = answer.lower().split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words).startswith(target.lower())


def _generate(model: Any, tok: Any, prompts: Sequence[str], n: int = 4) -> list[str]:
    import torch

    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt").to(next(model.parameters()).device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, enc.input_ids.shape[1] :], skip_special_tokens=True).split("\n")[0].strip())
    return out


def _load_facts(path: str | None) -> list[Any]:
    from .facts import validate_facts

    if path is None:
        text = resources.files("neuraldb").joinpath("data/demo_facts.json").read_text()
        return validate_facts(json.loads(text))
    p = Path(path)
    if p.suffix == ".json":
        data = _read_json(p)
        if isinstance(data, list) and data and isinstance(data[0], dict) and "target_new" in data[0] and "{}" in str(data[0].get("prompt", "")):
            return validate_facts(data)
    from evals.datasets import load_any  # any supported dataset format

    return [c.fact for c in load_any(p)]


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; a ValueError naming the file, line and column when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno} "
                         "(truncated or edited by hand?); fix or regenerate the file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); give a JSON file") from None


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from . import EditConfig, edit, load_model

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    facts = _load_facts(args.facts)
    print(f"model {args.model}: loaded in {time.perf_counter() - t0:.1f} s; {len(facts)} facts to edit")
    prompts = [f.text for f in facts]
    paraphrases = [f.paraphrases[0] if f.paraphrases else f.text for f in facts]
    unrelated = [n for f in facts for n in f.neighborhood][:6]
    before = _generate(model, tok, prompts + paraphrases + unrelated)
    t1 = time.perf_counter()
    db = edit(model, tok, facts, config=EditConfig(layer=args.layer), progress=True)
    edit_s = time.perf_counter() - t1
    enc = tok(unrelated, return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = model(**enc).logits
    with db.attached(model):
        db.reset_stats()
        after = _generate(model, tok, prompts + paraphrases + unrelated)
        with torch.no_grad():
            same = torch.equal(model(**enc).logits, base_logits)
        stats = db.stats()
    n = len(facts)
    rows = [("edit", prompts, before[:n], after[:n], [f.target_new for f in facts]),
            ("paraphrase", paraphrases, before[n : 2 * n], after[n : 2 * n], [f.target_new for f in facts]),
            ("unrelated", unrelated, before[2 * n :], after[2 * n :], [None] * len(unrelated))]
    width = max(len(p) for _, ps, *_ in rows for p in ps)
    for kind, ps, b, a, targets in rows:
        print(f"\n{kind} prompts{'':<{width - len(kind) - 8}} | before -> after")
        for p, x, y, t in zip(ps, b, a, targets):
            mark = "" if t is None else ("  ok" if _says(y, t) else "  (target: " + t + ")")
            print(f"  {p:<{width}} | {x!r} -> {y!r}{mark}")
    hit = sum(_says(a, f.target_new) for a, f in zip(after[:n], facts))
    para = [(a, f.target_new) for a, f in zip(after[n : 2 * n], facts)]
    print(
        f"\nstore: {len(db)} facts at layer {db.layer} ({db.module_name(model)}), gamma {db.gamma}, "
        f"{db.keys.numel() + db.residuals.numel():,} numbers ({(db.keys.numel() + db.residuals.numel()) * 4 / 1e6:.2f} MB fp32); "
        f"edit took {edit_s:.1f} s ({edit_s / max(n, 1):.1f} s/fact)"
    )
    print(f"edited prompts now giving the new target: {hit}/{n}")
    print(f"paraphrase prompts now giving the new target: {sum(_says(a, t) for a, t in para)}/{len(para)}")
    print(f"gate: {stats['fires']} fires over {stats['positions']} gated positions during the demo generations")
    print(f"unrelated prompts bit-identical with the store attached: {same}")
    if args.save:
        print(f"store saved to {db.save(args.save)}")
    return 0


def checkpoint_path(out: str | Path) -> Path:
    """Where ``neuraldb edit --out OUT`` keeps its checkpoint: ``OUT``'s name with ``.partial`` before
    the suffix (``store.safetensors`` -> ``store.partial.safetensors``). It exists only while a run is
    unfinished: the finished store is written to ``OUT`` and the checkpoint removed."""
    out = Path(out)
    return out.with_name(f"{out.stem}.partial{out.suffix or '.safetensors'}")


def _edit_plan(args: argparse.Namespace) -> tuple[Path, Path, bool]:
    """``(out, checkpoint, append)`` of ``neuraldb edit``; a ValueError (exit 2) naming the flag that
    is needed when the command would otherwise mix its facts with an earlier store or run."""
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n {args.n}: give the number of facts to edit (>= 1), or leave --n out to edit them all")
    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint_path(out)
    if ckpt.resolve() == out.resolve():
        raise ValueError(f"--checkpoint {ckpt} is the --out file; leave --checkpoint out "
                         f"(default {checkpoint_path(out)})")
    resuming = args.resume and ckpt.exists()
    if ckpt.exists() and not args.resume:
        raise ValueError(f"{ckpt} is the checkpoint of an unfinished run: pass --resume to continue it (same "
                         "facts and options), or delete it to start over")
    if out.exists() and not (args.append or resuming):
        raise ValueError(f"{out} already exists: pass --append to add these facts to its store, or choose another "
                         "--out (an interrupted run is continued with --resume)")
    return out, ckpt, bool(args.append and out.exists() and not resuming)


def add_early_stop_argument(p: argparse.ArgumentParser) -> None:
    """``--early-stop nll|loss`` (``EditConfig.early_stop``), for every command that edits."""
    from .config import EARLY_STOP

    p.add_argument("--early-stop", choices=EARLY_STOP, default=None,
                   help="stop a fact's optimisation once its target NLL (nll, the default) or its whole loss "
                        "(loss: NLL + KL + weight decay, the paper's rule) is below 5e-2 (EditConfig.early_stop)")


def early_stop_of(args: argparse.Namespace) -> dict[str, Any]:
    """``{"early_stop": ...}`` when ``--early-stop`` was given, else ``{}`` (EditConfig's default)."""
    return {} if getattr(args, "early_stop", None) is None else {"early_stop": args.early_stop}


def add_residual_dtype_argument(p: argparse.ArgumentParser, *, when: str = "") -> None:
    """``--residual-dtype auto|model|float32|bfloat16|...`` (``EditConfig.residual_dtype``), for every
    command that edits; ``when`` prefixes the help (e.g. "when editing: ")."""
    p.add_argument("--residual-dtype", choices=RESIDUAL_DTYPE_CHOICES, default=None,
                   help=f"{when}the dtype the residuals are optimised in (EditConfig.residual_dtype): auto (the "
                        "default) = bfloat16 for a float32 model on a CPU with bfloat16 units, else the model's; "
                        "model = the model's own dtype; or a dtype")


RESIDUAL_DTYPE_CHOICES = ("auto", "model", "float32", "bfloat16", "float16", "float64")


def residual_dtype_of(args: argparse.Namespace) -> dict[str, Any]:
    """``{"residual_dtype": ...}`` when ``--residual-dtype`` was given ("model" is None), else ``{}``."""
    value = getattr(args, "residual_dtype", None)
    return {} if value is None else {"residual_dtype": None if value == "model" else value}


def _edit_config(args: argparse.Namespace) -> Any:
    """The :class:`~neuraldb.config.EditConfig` of ``neuraldb edit``'s options."""
    from . import EditConfig

    return EditConfig(layer=args.layer, word_check=not args.no_word_check,
                      chat_residuals=args.chat_residuals,
                      **early_stop_of(args), **residual_dtype_of(args),
                      **({} if args.batch_size is None else {"batch_size": args.batch_size}),
                      **({} if args.memory_budget_gb is None else
                         {"memory_budget_gb": args.memory_budget_gb or None}))


def _run_edit(args: argparse.Namespace) -> int:
    from .distributed import launched, run_edit_cli

    if launched():  # started by torchrun with more than one process: neuraldb.distributed
        return run_edit_cli(args)
    out, ckpt, append = _edit_plan(args)
    from . import NeuralDB, edit, load_model

    model, tok = load_model(args.model, device=args.device)
    facts = _load_facts(args.facts)[: args.n]
    cfg = _edit_config(args)
    base = NeuralDB.load(out, model=model) if append else None
    _print_settings(model, cfg)
    db = edit(model, tok, facts, config=cfg, db=base, checkpoint=ckpt)
    db.save(out)
    ckpt.unlink(missing_ok=True)  # the run is finished: no checkpoint left to resume
    for line in _edit_summary(db.last_edit):
        print(line)
    print(f"{len(db)} facts -> {out}")
    return 0


def _forget_ids(db: Any, args: argparse.Namespace) -> list[str]:
    """The stored ids ``neuraldb forget`` removes: ``--id`` as given, and the stored fact of each
    ``--subject``/``--prompt`` pair or each fact of ``--facts`` (by identity, whatever its target);
    a ValueError (exit 2) naming what is not stored, before anything is removed."""
    ids = list(args.id or [])
    wanted: list[tuple[str, str]] = []
    if args.subject is not None or args.prompt is not None:
        if args.subject is None or args.prompt is None:
            raise ValueError("--subject and --prompt go together: give both (e.g. --subject 'LeBron James' "
                             "--prompt '{} plays the sport of'), or use --id")
        wanted.append((args.subject, args.prompt))
    if args.facts:
        wanted += [(f.subject, f.prompt) for f in _load_facts(args.facts)]
    if not ids and not wanted:
        raise ValueError("nothing to forget: give --id ID (repeatable), --subject with --prompt, or --facts FILE")
    missing = [i for i in ids if i not in db.ids]
    for subject, prompt in wanted:
        found = db.find(subject=subject, prompt=prompt)
        if found is None:
            missing.append(f"(subject {subject!r}, prompt {prompt!r})")
        else:
            ids.append(found)
    if missing:
        raise ValueError(f"{args.store} does not hold {len(missing)} of the facts to forget: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}; nothing was removed (see the stored facts' "
                         "subjects and prompts with neuraldb.NeuralDB.load(path).facts)")
    return list(dict.fromkeys(ids))


def _run_forget(args: argparse.Namespace) -> int:
    from . import NeuralDB, forget, load_model

    store = Path(args.store)
    if not store.exists():
        raise ValueError(f"--store {store} does not exist; give the store file written by neuraldb edit")
    out = Path(args.out) if args.out else store
    model, tok = load_model(args.model)
    db = NeuralDB.load(store, model=model)
    ids = _forget_ids(db, args)
    report = forget(model, tok, db, ids, restore=not args.no_restore)
    db.save(out)
    print(f"{len(report.removed)} removed, {len(report.refit)} re-fitted (facts about the same subjects); "
          f"{len(db)} facts -> {out}")
    for i in report.removed:
        print(f"  removed {i}")
    for i in report.refit:
        print(f"  re-fitted {i}")
    return 0


def _print_settings(model: Any, config: Any) -> None:
    """The layer / lr / steps ``neuraldb.edit`` will use for ``model`` and where each comes from."""
    from .settings import resolve_settings

    print("edit settings:\n  " + "\n  ".join(resolve_settings(model, config=config).lines()))


def _edit_summary(report: Any) -> list[str]:
    """What ``neuraldb edit`` did to the store: a line per replaced fact (old and new target), then the counts."""
    if report is None:
        return []
    lines = [r.describe() for r in report.replaced]
    lines.append(f"{len(report.added)} added ({len(report.replaced)} replacing a stored fact of the same subject and "
                 f"prompt), {len(report.unchanged)} already stored, {len(report.refit)} re-fitted")
    return lines


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--facts", help="a JSON list of facts (default: the shipped demo facts)")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--save", help="write the store to this .safetensors file")


def _add_forget_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="the model the store was edited with (checked)")
    p.add_argument("--store", required=True, help="store file (.safetensors) written by neuraldb edit")
    p.add_argument("--out", default=None, help="write the new store here (default: replace --store, atomically)")
    p.add_argument("--id", action="append", help="id of a stored fact to forget (repeatable)")
    p.add_argument("--subject", help="with --prompt: forget the stored fact of this subject and relation prompt")
    p.add_argument("--prompt", help="the relation prompt with {} for the subject, e.g. '{} plays the sport of'")
    p.add_argument("--facts", help="JSON list of facts or a CounterFact/ZsRE file: forget the stored fact of each "
                   "one's subject and prompt (whatever its target)")
    p.add_argument("--no-restore", action="store_true",
                   help="re-fit the siblings on their own prompts only (exactly a fresh edit of them); by default "
                        "the re-fit also holds each forgotten prompt to the unedited model's answer")


def _add_edit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--facts", required=True,
                   help="JSON list of facts, or a CounterFact/ZsRE file; a fact whose subject and prompt are "
                   "already stored with another target replaces it, two such facts in the file are an error")
    p.add_argument("--out", required=True,
                   help="store file (.safetensors), written when the run finishes; an existing one needs --append")
    p.add_argument("--append", action="store_true",
                   help="add the facts to the store already at --out (upsert: the same fact again is skipped, a new "
                        "target for a stored subject and prompt replaces the old one)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run whose checkpoint is there (a run without a checkpoint starts)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint of an unfinished run, written after every batch (default: --out with .partial "
                        "before the suffix); removed when the run finishes")
    p.add_argument("--n", type=int, default=None, help="edit the first N facts (N >= 1; default: all)")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--device", default=None,
                   help="device of the model, e.g. cuda:0 (default: cpu; under torchrun, cuda:LOCAL_RANK when CUDA is "
                        "available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="facts optimised together (default: EditConfig's, 128)")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="bound on what one optimisation batch adds to memory, in GB: fewer facts per batch "
                        "(default: EditConfig's, 2.0; 0 = no bound, batches of --batch-size)")
    add_residual_dtype_argument(p)
    p.add_argument("--no-word-check", action="store_true",
                   help="the paper's gate: do not store the subjects' tokens (EditConfig.word_check=False)")
    add_early_stop_argument(p)
    p.add_argument("--chat-residuals", action="store_true",
                   help="also optimise each residual on the prompt asked as a chat turn, so the edit carries into "
                   "chat use (EditConfig.chat_residuals; README, 'Mentions, chat use')")


def _add_settings_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="built-in alias, local model folder or hub id (read from the local cache); "
                     "only its config is read, never its weights")
    src.add_argument("--config", help="a config.json (or the folder holding it)")
    p.add_argument("--model-name", default=None,
                   help="the name the table's rows are matched against (default: --model, or --config's path)")
    p.add_argument("--layer", type=int, default=None, help="as EditConfig(layer=...): your value wins")
    p.add_argument("--lr", type=float, default=None, help="as EditConfig(lr=...): your value wins")
    p.add_argument("--steps", type=int, default=None, help="as EditConfig(steps=...): your value wins")
    p.add_argument("--json", action="store_true", help="print the resolved fields and their sources as JSON")


def settings_config(args: argparse.Namespace) -> Any:
    """The EditConfig of ``--layer`` / ``--lr`` / ``--steps`` (None: the model's setting)."""
    from .config import EditConfig

    return EditConfig(layer=args.layer, lr=args.lr, steps=args.steps)


def _run_settings(args: argparse.Namespace) -> int:
    from .models import model_config
    from .settings import resolve_settings

    hf_config, where = model_config(args.model or args.config)
    if hf_config is None:
        raise ValueError(f"{where}; pass --config with its config.json")
    resolved = resolve_settings(hf_config, config=settings_config(args), name=args.model_name or args.model)
    if args.json:
        print(json.dumps({"model": resolved.model_name, "model_type": resolved.model_type,
                          "n_layers": resolved.n_layers, "config_file": where, "row": resolved.row,
                          "row_source": resolved.row_source,
                          "settings": {k: {"value": getattr(resolved.config, k), "source": resolved.sources[k]}
                                       for k in resolved.sources}}, indent=1))
        return 0
    print(f"model {resolved.model_name or '(no name)'}: {resolved.model_type}, {resolved.n_layers} layers "
          f"(config: {where})")
    for line in resolved.lines():
        print(f"  {line}")
    return 0


def _command_in(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names (its first non-option word), or None (help, or none given)."""
    for arg in argv:
        if arg in ("-h", "--help", "--"):
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser listing every sub-command; only ``command``'s targets are imported (its
    arguments added, ``func`` set to its run). :class:`CommandLoadError` if they cannot be."""
    parser = argparse.ArgumentParser(
        prog="neuraldb", description=__doc__.split("\n")[0],
        epilog="exit codes: 0 ok, 1 a failed check (gate), 2 a usage or input error, 3 the sub-command "
               "could not be loaded")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        if name == command:
            add_arguments, run = load_command(name)
            add_arguments(p)
            p.set_defaults(func=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    try:
        parser = build_parser(command)
    except CommandLoadError as exc:
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"neuraldb {command}: error: {exc}", file=sys.stderr)
        return EXIT_NOT_LOADED
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"neuraldb {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
