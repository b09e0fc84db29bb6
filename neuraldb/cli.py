"""The ``neuraldb`` command line.

Example::

    neuraldb demo                                   # edit the shipped facts into SmolLM2
    neuraldb edit --model smollm2-135m --facts facts.json --out store.safetensors
    neuraldb evaluate --model smollm2-135m --dataset counterfact --n 100
    neuraldb gate --model smollm2-135m --store store.safetensors --policy policy.yaml

Sub-commands that need the ``eval`` extra import it lazily. Exit codes: 0 ok,
1 a failed check (``gate``), 2 a usage or input error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main"]

# sub-command -> "module:function" providing add_arguments(parser) and run(args) -> int
_EXTERNAL = {
    "evaluate": ("evals.cli", "evaluate", "edit the first N facts of a dataset and evaluate them (pre/post)"),
    "gate": ("evals.cli", "gate", "decide whether an edited checkpoint may be released"),
    "compare": ("evals.cli", "compare", "compare two saved reports without re-running"),
    "study": ("evals.cli", "study", "scaling study: gated vs linear reader at several sizes"),
    "fire-rate": ("properties.fire_rate", "fire_rate", "the gate's firing rate on unrelated text"),
}


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
        data = json.loads(p.read_text())
        if isinstance(data, list) and data and isinstance(data[0], dict) and "target_new" in data[0] and "{}" in str(data[0].get("prompt", "")):
            return validate_facts(data)
    from evals.datasets import load_any  # any supported dataset format

    return [c.fact for c in load_any(p)]


def _cmd_demo(args: argparse.Namespace) -> int:
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
            mark = "" if t is None else ("  ok" if y.lower().startswith(t.lower()) else "  (target: " + t + ")")
            print(f"  {p:<{width}} | {x!r} -> {y!r}{mark}")
    hit = sum(a.lower().startswith(f.target_new.lower()) for a, f in zip(after[:n], facts))
    print(
        f"\nstore: {len(db)} facts at layer {db.layer} ({db.module_name(model)}), gamma {db.gamma}, "
        f"{db.keys.numel() + db.residuals.numel():,} numbers ({(db.keys.numel() + db.residuals.numel()) * 4 / 1e6:.2f} MB fp32); "
        f"edit took {edit_s:.1f} s ({edit_s / max(n, 1):.1f} s/fact)"
    )
    print(f"edited prompts now giving the new target: {hit}/{n}")
    print(f"gate: {stats['fires']} fires over {stats['positions']} gated positions during the demo generations")
    print(f"unrelated prompts bit-identical with the store attached: {same}")
    if args.save:
        print(f"store saved to {db.save(args.save)}")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from . import EditConfig, edit, load_model

    model, tok = load_model(args.model)
    facts = _load_facts(args.facts)[: args.n]
    cfg = EditConfig(layer=args.layer, residual_dtype=args.residual_dtype, word_check=not args.no_word_check,
                     **({} if args.batch_size is None else {"batch_size": args.batch_size}))
    db = edit(model, tok, facts, config=cfg, checkpoint=args.checkpoint or args.out)
    db.save(args.out)
    print(f"{len(db)} facts -> {args.out}")
    return 0


def _add_builtin(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="edit a handful of facts into the default model, before/after")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--facts", help="a JSON list of facts (default: the shipped demo facts)")
    demo.add_argument("--layer", type=int, default=None)
    demo.add_argument("--save", help="write the store to this .safetensors file")
    demo.set_defaults(func=_cmd_demo)
    ed = sub.add_parser("edit", help="edit facts from a file into a store (resumable)")
    ed.add_argument("--model", default="smollm2-135m")
    ed.add_argument("--facts", required=True, help="JSON list of facts, or a CounterFact/ZsRE file")
    ed.add_argument("--out", required=True, help="store file (.safetensors); also the checkpoint")
    ed.add_argument("--checkpoint", default=None)
    ed.add_argument("--n", type=int, default=None)
    ed.add_argument("--layer", type=int, default=None)
    ed.add_argument("--batch-size", type=int, default=None, help="facts optimised together (default: EditConfig's, 128)")
    ed.add_argument("--residual-dtype", default=None,
                    help="optimise residuals on a copy of the model in this dtype, e.g. bfloat16 (faster on CPUs "
                    "with bfloat16 units); default: the model's own")
    ed.add_argument("--no-word-check", action="store_true",
                    help="the paper's gate: do not store the subjects' tokens (EditConfig.word_check=False)")
    ed.set_defaults(func=_cmd_edit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuraldb", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_builtin(sub)
    for name, (module, attr, help_text) in _EXTERNAL.items():
        try:
            mod = importlib.import_module(module)
            add: Callable = getattr(mod, f"add_{attr.replace('-', '_')}_arguments")
        except (ImportError, AttributeError):
            continue  # that part is not installed (or not built yet)
        p = sub.add_parser(name, help=help_text)
        add(p)
        p.set_defaults(func=getattr(mod, f"run_{attr.replace('-', '_')}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"neuraldb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
