"""lm-eval model ``neuraldb``: a Hugging Face model evaluated with a NeuralDB store attached.

Example (Python)::

    import lm_eval
    from evals.harness import NeuralDBLM
    lm = NeuralDBLM(pretrained="smollm2-135m", db="facts.safetensors", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["sciq"], limit=50, bootstrap_iters=0)
    lm.firing_summary()          # {'sciq': {'fires': .., 'positions': .., 'rate': .., 'examples_fired': .., ...}}
    lm.edited = False            # the same instance with the store off: the original model

Example (command line; lm-eval 0.4.13 loads no plugins, so this module registers the model and
then runs lm-eval's own command line with the arguments it was given; ``neuraldb harness [--data_dir
DIR] -- ARGS`` and ``neuraldb-lm-eval ARGS`` do the same)::

    python -m evals.harness --model neuraldb \\
        --model_args pretrained=smollm2-135m,db=facts.safetensors,firing_log=out/firing.json \\
        --tasks sciq,arc_challenge --limit 50 --output_path out [--data_dir "$NEURALDB_DATA_DIR"]

``--data_dir`` (ours, not lm-eval's) points the built-in tasks at local files
(:func:`evals.tasks.offline_include_path`) and passes that folder as ``--include_path``.

This follows lm-eval's ``hf_steered`` pattern: :class:`NeuralDBLM` subclasses ``HFLM`` and runs
``_model_call`` / ``_model_generate`` with the store attached (attached on entry, detached in
``finally``), so where the gate stays shut the scores are the plain ``hf`` model's, bit for bit.
It also records, per request, how many gated positions of that request's input fired
(:attr:`NeuralDBLM.firing`); positions follow the store's rule (padding and the first token of
each sequence never fire; loglikelihood inputs are right-padded by lm-eval and that padding is not
counted).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import get_rolling_token_windows

from neuraldb import Trace
from neuraldb.config import check_gamma
from neuraldb.hook import attached_reader
from neuraldb.store import NeuralDB, StoreError

__all__ = ["NeuralDBLM", "RequestFiring", "main", "add_harness_arguments", "run_harness"]

log = logging.getLogger(__name__)
Tokens = tuple[int, ...]
Key = tuple[int, int]


@dataclass(frozen=True)
class RequestFiring:
    """Gate firing on one request's input: ``fires`` of ``positions`` gated positions.

    ``task``/``doc_id``/``idx`` identify the request as lm-eval does (``idx``: the answer choice
    of a multiple-choice document). ``fires`` is ``None`` when the request's forward pass could
    not be matched to it (only possible for generation requests, see ``generate_until``).
    """

    task: str | None
    doc_id: int | None
    idx: int
    request_type: str
    fires: int | None
    positions: int


def _register(cls: type) -> type:
    # `python -m evals.harness` runs this file as __main__; main() imports evals.harness, which
    # registers the class once, under its importable name.
    return cls if __name__ == "__main__" else register_model("neuraldb")(cls)


@_register
class NeuralDBLM(HFLM):
    """``HFLM`` with a NeuralDB store attached during every forward pass.

    Args:
        pretrained: a neuraldb alias (``"smollm2-135m"``: loaded with :func:`neuraldb.load_model`),
            a ``save_pretrained`` folder or hub id (loaded by ``HFLM``), or a model object.
        db: a store file (checked against the model: :class:`neuraldb.StoreError` if it belongs to
            another model or layer), a :class:`neuraldb.NeuralDB`, or ``None`` (plain ``hf``).
        tokenizer: a tokenizer object or name; an alias brings its own.
        device: for names; ``None`` = CUDA when available, else CPU. A model object keeps its own.
        dtype: for names (``"bfloat16"``, ...); ``None``/``"auto"`` = the loader's default.
        gamma: override the store's gate threshold (this changes ``db.gamma`` of the store given).
        firing_log: a JSON file rewritten after each batch of requests with :meth:`firing_summary`
            and the per-request records (handy from the command line).
        **kwargs: passed on to ``HFLM`` (``batch_size``, ``max_length``, ...).

    ``edited`` switches the store on and off between runs (default: on when there is a store).
    """

    def __init__(
        self,
        pretrained: Any,
        db: str | os.PathLike[str] | NeuralDB | None = None,
        *,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        gamma: float | None = None,
        firing_log: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(pretrained, (str, os.PathLike)):
            from neuraldb.models import ALIASES, load_model

            if str(pretrained).strip().lower() in ALIASES:
                model, tok = load_model(str(pretrained), dtype=None if dtype in (None, "auto") else dtype, device=device)
                pretrained, tokenizer = model, tokenizer or tok
            else:
                pretrained = str(pretrained)
                kwargs["dtype"] = "auto" if dtype is None else dtype
        if isinstance(pretrained, str):
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, device=device, **kwargs)
        else:  # a model object: HFLM takes device and dtype from it
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        if isinstance(db, (str, os.PathLike)):
            db = NeuralDB.load(db, model=self.model)
        elif db is not None:
            if not all(hasattr(db, a) for a in ("attach", "detach", "check_compatible", "stats")):
                raise TypeError(f"db must be a store file, a NeuralDB or a reader of one (e.g. "
                                f"neuraldb.linear.LinearReader), not {type(db).__name__}")
            db.check_compatible(self.model)
        if db is not None and gamma is not None:
            db.gamma = check_gamma(gamma, where="gamma", error=StoreError)
        self.db: NeuralDB | None = db
        self.edited = db is not None
        self.firing: list[RequestFiring] = []
        self.firing_log = Path(firing_log) if firing_log else None
        self._wanted: set[Key] | None = None  # inputs of the loglikelihood requests being run
        self._table: dict[Key, tuple[int, int]] = {}  # input -> (fires, gated positions)
        self._token_firing: list[tuple[int, int] | None] = []  # per _loglikelihood_tokens request
        self._gen_rows: dict[Tokens, tuple[int, int]] | None = None

    # ------------------------------------------------------------------ the store
    @property
    def store_active(self) -> bool:
        """True when forward passes run with the store (there is one and ``edited`` is on)."""
        return self.db is not None and self.edited

    @contextmanager
    def _attached(self) -> Iterator[NeuralDB | None]:
        """The store attached for one call (compatibility was checked once, in ``__init__``)."""
        db = self.db
        if not self.store_active or db is None:
            yield None
            return
        if attached_reader(self.model) is db:  # the caller attached it already
            yield db
            return
        db.attach(self.model, check=False)
        try:
            yield db
        finally:
            db.detach()

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        with self._attached() as db:
            if db is not None:
                db.last_fire_mask = None
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            if db is not None and self._wanted is not None:
                mask = db.last_fire_mask  # (batch, seq); None when the store is empty
                fired = torch.zeros(inps.shape, dtype=torch.bool) if mask is None else mask.cpu()
                self._table.update(_match_rows(inps.cpu(), fired, self._wanted))
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        with self._attached() as db:
            if db is None or self._gen_rows is None:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            fires = torch.zeros(context.shape[0], dtype=torch.long, device=context.device)

            def count(out: Any, _x: Any) -> Any:  # after every forward pass (prompt, then each new token)
                mask = db.last_fire_mask
                if mask is not None and mask.shape[0] == fires.shape[0]:
                    fires.add_(mask.sum(dim=1).to(fires.device))
                db.last_fire_mask = None
                return out

            db.last_fire_mask = None
            with Trace(self.model, "", retain_output=False, edit_output=count):
                out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        mask = generation_kwargs.get("attention_mask")
        steps = max(out.shape[1] - context.shape[1] - 1, 0)  # the last new token is never fed back
        for r, n in enumerate(fires.tolist()):
            row = context[r][mask[r].bool()] if mask is not None else context[r]
            self._gen_rows[tuple(row.tolist())] = (n, max(row.shape[0] - 1, 0) + steps)
        return out

    # ----------------------------------------------------------- per-request firing
    def _causal_input(self, context_enc: list[int], continuation_enc: list[int]) -> Tokens:
        """The tokens HFLM feeds the model for one loglikelihood request (its own formula)."""
        return tuple((context_enc + continuation_enc)[-(self.max_length + 1) :][:-1])

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list:
        if not self.store_active or self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        keys = [_key(self._causal_input(ctx, cont)) for _, ctx, cont in requests]
        self._wanted, self._table = set(keys), {}
        try:
            out = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            self._token_firing.extend(self._table.get(k) for k in keys)
        finally:
            self._wanted, self._table = None, {}
        return out

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        self._token_firing = []
        out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        if self.store_active:
            self._record(requests, self._token_firing, "loglikelihood")
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        self._token_firing = []
        out = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        if self.store_active:  # windows come back in request order; sum them per request
            per_request, pos = [], 0
            for req in requests:
                n = len(list(get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )))
                windows = self._token_firing[pos : pos + n]
                pos += n
                per_request.append(None if any(w is None for w in windows)
                                   else (sum(w[0] for w in windows), sum(w[1] for w in windows)))
            self._record(requests, per_request, "loglikelihood_rolling")
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        if not self.store_active:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._gen_rows = rows = {}
        try:
            out = super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self._gen_rows = None
        found = []
        for req in requests:  # match by prompt tokens; a left-truncated prompt matches as a suffix
            full = tuple(self.tok_batch_encode([req.args[0]])[0][0].tolist())
            hit = rows.get(full) or next((v for k, v in rows.items() if k and full[-len(k):] == k), None)
            found.append(hit)
        if any(h is None for h in found):
            log.warning("could not match %d generation request(s) to their forward pass; their firing is unknown",
                        sum(h is None for h in found))
        self._record(requests, found, "generate_until")
        return out

    def _record(self, requests: Sequence[Any], counts: Sequence[tuple[int, int] | None], request_type: str) -> None:
        for req, c in zip(requests, counts, strict=True):
            self.firing.append(RequestFiring(
                task=req.task_name, doc_id=req.doc_id, idx=int(req.idx), request_type=request_type,
                fires=None if c is None else int(c[0]), positions=0 if c is None else int(c[1]),
            ))
        if self.firing_log is not None:
            self.firing_log.parent.mkdir(parents=True, exist_ok=True)
            payload = {"summary": self.firing_summary(), "requests": [asdict(f) for f in self.firing]}
            self.firing_log.write_text(json.dumps(payload, indent=1) + "\n")

    def reset_firing(self) -> None:
        """Forget the per-request firing records (and zero the store's own counters)."""
        self.firing = []
        if self.db is not None:
            self.db.reset_stats()

    def firing_summary(self) -> dict[str, dict[str, Any]]:
        """Per task: fires / gated positions over its requests, and the documents with any fire.

        ``rate`` sums over requests, so an input shared by several requests (the answer choices
        of one question) counts once per request. ``unmatched`` counts requests whose firing is
        unknown (generation only).
        """
        by_task: dict[str, dict[str, Any]] = defaultdict(lambda: {"fires": 0, "positions": 0, "requests": 0, "unmatched": 0,
                                                                   "docs": set(), "fired_docs": set()})
        for f in self.firing:
            t = by_task[str(f.task)]
            t["requests"] += 1
            t["docs"].add(f.doc_id)
            if f.fires is None:
                t["unmatched"] += 1
                continue
            t["fires"] += f.fires
            t["positions"] += f.positions
            if f.fires:
                t["fired_docs"].add(f.doc_id)
        out = {}
        for task, t in sorted(by_task.items()):
            fired = sorted(t["fired_docs"], key=lambda d: (d is None, d))
            out[task] = {
                "fires": t["fires"], "positions": t["positions"],
                "rate": t["fires"] / t["positions"] if t["positions"] else 0.0,
                "requests": t["requests"], "unmatched": t["unmatched"], "examples": len(t["docs"]),
                "examples_fired": len(fired), "fired_doc_ids": fired,
            }
        return out


def _key(tokens: Sequence[int]) -> Key:
    """A small stand-in for a token sequence (its length and hash), to match forward rows to requests."""
    tokens = tuple(tokens)
    return len(tokens), hash(tokens)


def _match_rows(inps: torch.Tensor, fired: torch.Tensor, wanted: set[Key]) -> dict[Key, tuple[int, int]]:
    """(fires, gated positions) per wanted input, from one right-padded batch and its fire mask.

    lm-eval pads with token 0, which may also be a real token: a row's input is the shortest
    prefix that is a wanted input and is followed by zeros only.
    """
    table: dict[Key, tuple[int, int]] = {}
    for tokens, row in zip(inps.tolist(), fired, strict=True):
        n = len(tokens)
        while n and tokens[n - 1] == 0:
            n -= 1
        for length in range(n, len(tokens) + 1):
            key = _key(tokens[:length])
            if key in wanted:  # positions 1.. are gated; position 0 is the sink
                table[key] = (int(row[:length].sum()), max(length - 1, 0))
                break
    return table


# ----------------------------------------------------------------------------- command line


def _pop_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    out, value, i = [], None, 0
    while i < len(argv):
        if argv[i] == name and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith(name + "="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            out.append(argv[i])
            i += 1
    return value, out


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's command line with the ``neuraldb`` model registered.

    Takes lm-eval's own arguments, plus ``--data_dir DIR`` to read the built-in tasks from local
    files (it becomes ``--include_path``; give one or the other).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    data_dir, args = _pop_option(args, "--data_dir")
    if data_dir is not None:
        if any(a == "--include_path" or a.startswith("--include_path=") for a in args):
            print("evals.harness: give --data_dir or --include_path, not both", file=sys.stderr)
            return 2
        from evals.tasks import offline_include_path

        args += ["--include_path", str(offline_include_path(data_dir))]
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse errors and --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def add_harness_arguments(parser: Any) -> None:
    """``neuraldb harness [--data_dir DIR] -- LM_EVAL_ARGS`` (registered in ``neuraldb.cli.COMMANDS``)."""
    import argparse

    parser.add_argument("--data_dir", default=None, help="read the built-in tasks from this data directory")
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's own arguments (after --)")


def run_harness(args: Any) -> int:
    """:func:`main` on the sub-command's arguments; lm-eval's exit code."""
    rest = list(args.lm_eval_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return main(([f"--data_dir={args.data_dir}"] if args.data_dir else []) + rest)


if __name__ == "__main__":
    from evals.harness import main as _main

    sys.exit(_main())
