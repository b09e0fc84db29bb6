"""Editing across processes and GPUs: ``torch.distributed`` shards the facts, rank 0 gets one store.

Example (a script launched with ``torchrun --nproc-per-node 2 edit.py``)::

    from neuraldb.distributed import local_device
    model, tok = neuraldb.load_model("smollm2-135m", device=local_device())
    db = neuraldb.edit(model, tok, facts, distributed=True)   # every rank runs the same call
    if db is not None:                                         # rank 0: the whole store
        db.save("store.safetensors")

or from the command line: ``torchrun --nproc-per-node 2 -m neuraldb edit --facts f.json --out s.safetensors``.

Every key and residual is computed on the unedited model, so facts are independent and the
work splits with no approximation. The unit of work is one batch of the single-process run
(``EditConfig.batch_size`` facts, in the facts' order); batches that share a subject are one
unit (their facts share a residual: ``EditConfig.share_subject_residuals``), so every fact about
a subject is edited on one rank. Units go to ranks by size (largest first, to the least loaded
rank); each rank edits its units in their original order with :func:`neuraldb.edit`, so it
optimises exactly the batches the single process would, and rank 0 gathers the shards
(safetensors bytes in a ``uint8`` tensor; nothing is unpickled) in the single-process order.
The store equals the single-process store: same ids, order, records and config; keys and
residuals bitwise equal on CPUs with the same thread count (measured: README, "Distributed
editing"). The edit-time self-check runs on rank 0, on the whole store.

Each rank checkpoints its shard to its own file (:func:`rank_checkpoint`); rerunning the same
command after a kill continues every rank where its file stops (same facts, config and number of
processes, or an error says what differs).

Backend: NCCL when the model is on CUDA, gloo on the CPU (``torch.distributed.Backend``'s map
from the model's device type). A process group the caller initialised is used as it is; one
initialised here (from torchrun's environment) gets a long timeout (:data:`TIMEOUT`), since a rank
that finishes first waits in the gather for the slowest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .arch import resolve_arch
from .config import EditConfig
from .facts import Fact, check_conflicts, validate_facts
from .identity import EditReport
from .residuals import settle_residual_dtype
from .settings import resolve_settings
from .store import NeuralDB, StoreError, layer_fingerprint

__all__ = ["TIMEOUT", "DistributedEditError", "edit_distributed", "launched", "local_device", "rank_checkpoint",
           "run_edit_cli", "shard"]

log = logging.getLogger(__name__)

TIMEOUT = timedelta(hours=24)  # of a process group initialised here: ranks wait in the gather for the slowest


class DistributedEditError(StoreError):
    """A distributed edit that cannot run as asked (the same on every rank: raised by all of them)."""


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1), or
    ``torch.distributed`` is initialised with more than one rank."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
    return torch.device("cpu")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _init(model: nn.Module) -> None:
    """Initialise the default process group from torchrun's environment, backend from the model's device."""
    if dist.is_initialized():
        return
    device = _device(model)
    backend = dist.Backend.default_device_backend_map.get(device.type, "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.info("initialised torch.distributed: backend %s, rank %d of %d", backend, dist.get_rank(),
             dist.get_world_size())


def _comm_device(model: nn.Module) -> torch.device:
    """Where the collectives' tensors live: the model's device for NCCL, else the CPU."""
    return _device(model) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard(facts: Sequence[Fact], *, batch_size: int, world_size: int, share_subjects: bool = True) -> list[list[int]]:
    """Fact indices per rank: whole batches of ``batch_size`` (in order), batches sharing a subject
    kept together (``share_subjects``), units assigned largest first to the least loaded rank,
    each rank's indices ascending. A :class:`DistributedEditError` when there are fewer units than ranks.

    Example::

        shard(facts, batch_size=2, world_size=2)   # [[0, 1, 4], [2, 3]]: batches 0 and 2 share a subject
    """
    n_batches = -(-len(facts) // batch_size)
    parent = list(range(n_batches))

    def root(b: int) -> int:
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        return b

    if share_subjects:
        first: dict[str, int] = {}
        for i, f in enumerate(facts):
            b = i // batch_size
            a = first.setdefault(f.subject, b)
            parent[root(b)] = root(a)
    units: dict[int, list[int]] = {}
    for b in range(n_batches):
        units.setdefault(root(b), []).append(b)
    if len(units) < world_size:
        raise DistributedEditError(
            f"{len(facts)} facts make {len(units)} unit(s) of work (batches of EditConfig.batch_size={batch_size}; "
            f"batches sharing a subject count as one) for {world_size} processes: use at most {len(units)} "
            "processes (--nproc-per-node), or a smaller batch_size (--batch-size)")
    load = [0] * world_size
    mine: list[list[int]] = [[] for _ in range(world_size)]
    size = {u: sum(min(batch_size, len(facts) - b * batch_size) for b in bs) for u, bs in units.items()}
    for u in sorted(units, key=lambda u: (-size[u], u)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        load[r] += size[u]
        mine[r] += units[u]
    return [[i for b in sorted(bs) for i in range(b * batch_size, min((b + 1) * batch_size, len(facts)))]
            for bs in mine]


def rank_checkpoint(checkpoint: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Rank ``rank``'s checkpoint: ``run.safetensors`` -> ``run.rank0-of-2.safetensors``."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{path.suffix or '.safetensors'}")


def _other_checkpoints(checkpoint: Path, world_size: int) -> list[Path]:
    """Rank checkpoints beside ``checkpoint`` written by a run with another number of processes."""
    own = {rank_checkpoint(checkpoint, r, world_size).name for r in range(world_size)}
    pattern = f"{checkpoint.stem}.rank*-of-*{checkpoint.suffix or '.safetensors'}"
    return sorted(p for p in checkpoint.parent.glob(pattern) if p.name not in own)


def _agree(problem: str | None) -> None:
    """Raise the same :class:`DistributedEditError` on every rank if any rank found a problem."""
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    lines = [f"rank {r}: {p}" for r, p in enumerate(found) if p]
    if lines:
        raise DistributedEditError("distributed edit stopped before any work:\n" + "\n".join(lines))


def _signature(model: nn.Module, config: EditConfig, layer: int, facts: Sequence[Fact], mlp_out: str) -> dict:
    """What every rank must share: config, layer, model weights at the layer, the facts."""
    ids = hashlib.sha256(json.dumps([f.to_dict() for f in facts], sort_keys=True).encode()).hexdigest()
    return {"config": config.to_dict(), "layer": layer, "fingerprint": layer_fingerprint(model, mlp_out),
            "facts": f"{len(facts)} facts, sha256 {ids[:16]}"}


def _check_same(sig: dict) -> None:
    """A :class:`DistributedEditError` (on every rank) naming the field that differs between ranks."""
    sigs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(sigs, sig)
    for field in sig:
        for r, other in enumerate(sigs):
            if other[field] != sigs[0][field]:
                raise DistributedEditError(
                    f"rank {r} has another {field} than rank 0 ({other[field]!r} vs {sigs[0][field]!r}): every rank "
                    "must run the same edit (same model, EditConfig, layer and facts)")


def _store_bytes(db: NeuralDB) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = db.save(Path(tmp) / "shard.safetensors")
        return path.read_bytes()


def _read_shard(data: bytes) -> NeuralDB:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.safetensors"
        path.write_bytes(data)
        return NeuralDB.load(path)


def _gather_bytes(data: bytes, device: torch.device) -> list[bytes] | None:
    """Every rank's ``data`` on rank 0 (None elsewhere), as padded uint8 tensors."""
    world = dist.get_world_size()
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    out = [torch.empty_like(buf) for _ in range(world)] if dist.get_rank() == 0 else None
    dist.gather(buf, out, dst=0)
    if out is None:
        return None
    return [bytes(t[: int(s.item())].cpu().numpy()) for t, s in zip(out, sizes)]


def _merge(shards: Sequence[NeuralDB], order: Sequence[str]) -> NeuralDB:
    """One store with the shards' rows in ``order`` (the single-process order), rank 0's settings."""
    every = shards[0].head(0)
    for s in shards:
        every.add(s.ids, s.keys, s.residuals, thresholds=s.thresholds, words=s.words)
        every.facts.update(s.facts)
    missing = [i for i in order if i not in every]
    if missing or len(every) != len(order):
        raise DistributedEditError(f"the gathered shards hold {len(every)} facts, not the {len(order)} asked "
                                   f"(missing: {missing[:5]}); rerun with the same facts")
    rows = torch.tensor([every._row(i) for i in order], dtype=torch.long)
    db = shards[0].head(0)
    db.add(list(order), every.keys[rows], every.residuals[rows], facts=[every.facts.get(i, {}) for i in order],
           thresholds=every.thresholds[rows], words=every.words[rows])
    db.facts = {i: every.facts[i] for i in order if every.facts.get(i)}
    starts = [s.word_starts for s in shards if s.word_starts.numel()]
    if starts:
        db.word_starts = starts[0]
    return db


def edit_distributed(
    model: nn.Module,
    tokenizer: Any,
    facts: Iterable[Fact | Mapping[str, Any]],
    *,
    config: EditConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    progress: bool = True,
    check: bool = True,
    strict: bool = False,
) -> NeuralDB | None:
    """:func:`neuraldb.edit` with the facts sharded across the ranks of ``torch.distributed``.

    Example (every rank runs it: ``torchrun --nproc-per-node 2 script.py``)::

        db = edit_distributed(model, tok, facts, config=EditConfig(batch_size=64), checkpoint="run.safetensors")
        if db is not None:          # rank 0
            db.save("store.safetensors")

    Every rank calls it with the same model, facts and config (checked: a rank that differs is
    an error on every rank). Returns the whole store on rank 0, None on the other ranks.
    ``checkpoint``: each rank writes :func:`rank_checkpoint` of it and, when that file exists,
    continues from it. ``check`` / ``strict``: the self-check, on rank 0 over the whole store.
    Initialises the process group from torchrun's environment when it is not (NCCL for a CUDA
    model, else gloo); in a process that torchrun did not start (no ``RANK`` in the environment)
    and without a process group, it is :func:`neuraldb.edit` in this one process (a warning says so).
    An existing store (``db=``) is not supported here: edit into a new store, then add it with
    a single process.
    """
    from .editor import _check_lengths, _chat_contexts, _eval_mode, edit
    from .hook import detached
    from .keys import context_templates

    config = resolve_settings(model, config=config).config  # layer / lr / steps: yours, else the model's row
    facts = list(validate_facts(facts))
    check_conflicts(facts)
    if not dist.is_initialized() and "RANK" not in os.environ:
        log.warning("distributed editing asked for, but this process was not started by torchrun and "
                    "torch.distributed is not initialised: editing in this one process")
        return edit(model, tokenizer, facts, config=config, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                    progress=progress, check=check, strict=strict)
    _init(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = settle_residual_dtype(model, config)  # "auto": this machine's choice, checked equal on every rank below
    arch = resolve_arch(model, layers=config.layers_template, mlp_out=config.mlp_out_template,
                        residual_out=config.residual_out_template)
    layer = arch.check_layer(config.layer)
    _check_same(_signature(model, config, layer, facts, arch.mlp_out_at(layer)))
    with detached(model), _eval_mode(model):
        templates = context_templates(model, tokenizer, prefixes=config.context_prefixes,
                                      length=config.context_length, seed=config.context_seed) if rank == 0 else None
    box = [templates]
    dist.broadcast_object_list(box, src=0)  # a list of strings: every rank uses rank 0's templates
    templates = list(box[0])
    _check_lengths(model, tokenizer, facts, templates + _chat_contexts(tokenizer, config))  # same on every rank
    parts = shard(facts, batch_size=config.batch_size, world_size=world,
                  share_subjects=config.share_subject_residuals)
    mine = [facts[i] for i in parts[rank]]
    base, ckpt, problem = _start(model, config, layer, templates, mine, checkpoint, rank, world)
    _agree(problem)
    log.info("rank %d of %d: %d of %d facts (%d already in its checkpoint)", rank, world, len(mine), len(facts),
             len(base))
    shard_db = edit(model, tokenizer, mine, config=config, db=base, checkpoint=ckpt, checkpoint_every=checkpoint_every,
                    progress=progress and rank == 0, check=False)
    gathered = _gather_bytes(_store_bytes(shard_db), _comm_device(model))
    if gathered is None:
        return None
    db = _merge([_read_shard(b) for b in gathered], [f.id for f in facts])
    db.last_edit = EditReport(added=tuple(f.id for f in facts))
    if check or strict:
        from .editor import _self_check

        with detached(model), _eval_mode(model):
            _self_check(model, tokenizer, db, facts, strict=strict, batch_size=config.batch_size)
    return db


def _start(model: nn.Module, config: EditConfig, layer: int, templates: list[str], mine: Sequence[Fact],
           checkpoint: str | os.PathLike | None, rank: int, world: int) -> tuple[NeuralDB, Path | None, str | None]:
    """This rank's starting store (its checkpoint, or a new one with rank 0's templates), its checkpoint
    path, and what is wrong with them (None when nothing is)."""
    from .editor import _new_store, _resume

    base = _new_store(model, config, layer, templates)
    if checkpoint is None:
        return base, None, None
    ckpt = rank_checkpoint(checkpoint, rank, world)
    others = _other_checkpoints(Path(checkpoint), world)
    if others:
        return base, ckpt, (f"{others[0]} is the checkpoint of a run with another number of processes: rerun with "
                            "that --nproc-per-node, or delete it to start over")
    if not ckpt.exists():
        return base, ckpt, None
    try:
        saved = NeuralDB.load(ckpt, model=model, layer=layer)
        _resume(model, config, layer, saved, None)  # the same EditConfig, or a StoreError
    except StoreError as exc:
        return base, ckpt, f"{ckpt}: {exc}"
    if list(saved.config.get("context_templates") or []) != templates:
        return base, ckpt, f"{ckpt} was made with other context templates (another model or EditConfig); delete it"
    foreign = [i for i in saved.ids if i not in {f.id for f in mine}]
    if foreign:
        return base, ckpt, (f"{ckpt} holds {len(foreign)} facts that are not this rank's share (e.g. {foreign[0]!r}): "
                            "the facts, --batch-size or number of processes changed; rerun as before or delete it")
    log.info("rank %d: resuming from %s (%d facts done)", rank, ckpt, len(saved))
    return saved, ckpt, None


def run_edit_cli(args: Any) -> int:
    """``neuraldb edit`` under torchrun: every rank loads the model on :func:`local_device` (or
    ``--device``), edits its share, rank 0 writes ``--out``; then each rank removes its checkpoint."""
    from .cli import _edit_config, _edit_summary, _load_facts, _print_settings, checkpoint_path
    from .models import load_model

    if args.append:
        raise ValueError("--append is not supported under torchrun: edit the new facts into a new --out, then add "
                         "them to the store with a single process (neuraldb edit --append)")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n {args.n}: give the number of facts to edit (>= 1), or leave --n out to edit them all")
    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint_path(out)
    model, tok = load_model(args.model, device=args.device or local_device())
    _init(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    own = rank_checkpoint(ckpt, rank, world)
    problem = None
    if own.exists() and not args.resume:
        problem = (f"{own} is the checkpoint of an unfinished run: pass --resume to continue it (same facts, options "
                   "and number of processes), or delete the rank checkpoints to start over")
    elif rank == 0 and out.exists():
        problem = f"{out} already exists: choose another --out (--append needs a single process)"
    _agree(problem)
    facts = _load_facts(args.facts)[: args.n]
    if rank == 0:
        _print_settings(model, _edit_config(args))
    db = edit_distributed(model, tok, facts, config=_edit_config(args), checkpoint=ckpt, progress=rank == 0)
    if db is not None:
        db.save(out)
        for line in _edit_summary(db.last_edit):
            print(line)
        print(f"{len(db)} facts -> {out} ({world} processes)")
    dist.barrier()  # the store is written: the rank checkpoints may go
    own.unlink(missing_ok=True)
    dist.destroy_process_group()
    return 0
