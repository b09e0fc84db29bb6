"""The store: one key and one residual per fact, read by a gated top-1 retrieval.

Example::

    db = NeuralDB(layer=10, d_key=1536, d_model=576, gamma=0.65)
    db.add(["f1"], keys, residuals)               # keys (1, d_key), residuals (1, d_model)
    with db.attached(model):                      # hook on model.layers.10.mlp.down_proj
        logits = model(**batch).logits
    db.stats()                                    # {'positions': ..., 'fires': ...}
    db.save("facts.safetensors"); NeuralDB.load("facts.safetensors", model=model)

At every token position (except the attention-sink position, the first real
token of each sequence, and padding) the input ``k`` of the MLP output
projection is compared with every stored key; the residual of the most similar
key ``j`` is added to the projection's output when ``cos(k, k_j) > max(gamma,
thresholds[j])`` and, for a fact stored with its subject's tokens (what
``neuraldb.edit`` does, ``EditConfig.word_check``), the tokens ending at that
position spell that subject (:mod:`neuraldb.words`). Where the gate stays shut the
output tensor is the original one, bit for bit.

Per-key thresholds (``thresholds``, -inf = the global ``gamma`` alone) raise the
gate of keys that resemble generic text (:meth:`NeuralDB.calibrate`). Each depends
on its key alone, so adding, removing or updating one fact never changes another
fact's gate. Without calibration the gate is exactly the paper's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Mapping, Sequence

import torch
from torch import nn

from .compat import check_compatible, check_layer, key_module, layer_fingerprint, model_name, residual_module
from .config import check_gamma
from .hook import Firing, StoreHook, attached
from .reach import unreachable
from .retrieval import DeviceIndex, LowRankScreen, max_cosines
from .rows import check_rows, check_thresholds, check_words
from .threads import Lock
from .words import NO_WORD, WORD_WIDTH, same_forms

if TYPE_CHECKING:
    from .identity import EditReport

__all__ = ["NeuralDB", "StoreError", "layer_fingerprint", "model_name"]


class StoreError(ValueError):
    """A store that cannot be used as asked: wrong model or layer, corrupt file, bad input."""


def _firing(name: str, doc: str) -> property:
    """A store attribute that lives on its :class:`~neuraldb.hook.Firing` (read and set)."""
    return property(lambda db: getattr(db.firing, name), lambda db, value: setattr(db.firing, name, value), doc=doc)


class NeuralDB:
    """Keys (N, d_key) and residuals (N, d_model) for one layer, with the gate.

    Keyword-only constructor; ``neuraldb.edit`` builds one for you. Master copies
    live on the CPU in float32; attaching moves a normalised copy to the model's
    device. ``chunk_size`` bounds the memory of one retrieval to
    ``positions x chunk_size`` scores, so 100K keys fit.

    With ``screen_min_keys`` keys or more, the hook proves most positions cannot
    fire with a rank-``screen_rank`` bound (default ``d_key // 3 - 1``, so that with its
    norm column the bound is one ``d_key // 3``-wide product; 0 turns it off)
    and computes the exact top-1 only for the rest (:class:`~neuraldb.retrieval.LowRankScreen`):
    the same fires, non-fires and fired indices as brute force, at a fraction of
    its cost. :meth:`gate` and :meth:`retrieve` are always brute force.
    """

    def __init__(self, *, layer: int, d_key: int, d_model: int, gamma: float = 0.65,
                 module_template: str | None = None, residual_template: str | None = None, model_name: str = "",
                 model_type: str = "", fingerprint: str = "", config: Mapping[str, Any] | None = None,
                 chunk_size: int = 16384, screen_rank: int | None = None, screen_min_keys: int = 4096) -> None:
        gamma = check_gamma(gamma, where="gamma", error=StoreError)
        self.layer = int(layer)
        self.d_key = int(d_key)
        self.d_model = int(d_model)
        self._gamma = float(gamma)
        self.module_template = module_template
        self.residual_template = residual_template or module_template
        self.model_name = model_name
        self.model_type = model_type
        self.fingerprint = fingerprint
        self.path: Path | None = None  # the file it was read from (NeuralDB.load): its fingerprint is then required
        self.config = dict(config or {})
        self.chunk_size = int(chunk_size)
        # the hook's exact screened gate (retrieval.LowRankScreen) for stores of >= screen_min_keys
        self.screen_rank = max(1, self.d_key // 3 - 1) if screen_rank is None else int(screen_rank)
        self.screen_min_keys = int(screen_min_keys)
        # word-checked stores: gate only where a position's tokens can spell a stored subject
        # (neuraldb.wordindex; the same decisions); False gates every position, as before
        self.word_prefilter = True
        self.keys = torch.empty(0, self.d_key)  # (N, d_key) float32, cpu
        self.residuals = torch.empty(0, self.d_model)  # (N, d_model) float32, cpu
        self.thresholds = torch.empty(0)  # (N,) float32, cpu; -inf = global gamma only
        self.words = torch.full((0, 1, WORD_WIDTH), NO_WORD, dtype=torch.long)  # (N, F, width); NO_WORD = no check
        self._word_starts = torch.zeros(0, dtype=torch.bool)  # (vocab,) words.word_start_tokens of the tokenizer
        self.ids: list[str] = []
        self.facts: dict[str, dict[str, Any]] = {}
        self._index: dict[str, int] = {}
        self._device: DeviceIndex | None = None  # the tensors on the gate's device, built at first use
        self._build = Lock()  # one thread builds the device tensors; the others wait and use them
        self._version = 0  # bumped by every change of keys, residuals or thresholds (readers cache on it)
        self._hook: StoreHook | None = None  # the hooks while attached
        self.firing = Firing(len(self.ids))  # the hook's counters: db.stats(), db.last_fire_mask, ...
        self.last_edit: EditReport | None = None  # what the last neuraldb.edit / forget did (not saved)

    @property
    def gamma(self) -> float:
        """Global cosine threshold; setting it takes effect at the next forward pass."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = check_gamma(value, where="gamma", error=StoreError)
        self._device = None

    # ----------------------------------------------------------------- contents
    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, fact_id: object) -> bool:
        return fact_id in self._index

    def __repr__(self) -> str:
        return (
            f"NeuralDB(facts={len(self)}, layer={self.layer}, gamma={self.gamma}, d_key={self.d_key}, "
            f"d_model={self.d_model}, model={self.model_name!r})"
        )

    def add(self, ids: Sequence[str], keys: torch.Tensor, residuals: torch.Tensor, *,
            facts: Sequence[Mapping[str, Any]] | None = None, thresholds: torch.Tensor | Sequence[float] | None = None,
            words: torch.Tensor | None = None) -> None:
        """Append facts. An id already in the store is an error (use :meth:`update`).

        ``thresholds`` (n,) are per-key gate thresholds (see :meth:`calibrate`); None = -inf.
        ``words`` (n, F, width) are the forms of the subjects' names
        (:func:`neuraldb.words.subject_words`); None = no word check for these facts.
        """
        ids = [str(i) for i in ids]
        keys, residuals = check_rows(keys, residuals, len(ids), d_key=self.d_key, d_model=self.d_model,
                                     error=StoreError)
        thresholds = check_thresholds(thresholds, len(ids), error=StoreError)
        words = check_words(words, len(ids), self.words.shape[2], error=StoreError)
        dup = [i for i in ids if i in self._index]
        if dup or len(set(ids)) != len(ids):
            raise StoreError(f"fact id(s) already present or repeated: {dup[:5] or ids}; use update() to replace")
        if facts is not None and len(facts) != len(ids):
            raise StoreError(f"facts has {len(facts)} entries for {len(ids)} ids")
        start = len(self.ids)
        self.keys = torch.cat([self.keys, keys])
        self.residuals = torch.cat([self.residuals, residuals])
        self.thresholds = torch.cat([self.thresholds, thresholds])
        self.words = torch.cat(same_forms(self.words, words))
        for j, fid in enumerate(ids):
            self._index[fid] = start + j
            self.ids.append(fid)
            if facts is not None:
                self.facts[fid] = dict(facts[j])
        self._changed()

    def head(self, n: int) -> "NeuralDB":
        """A new, detached store with the first ``n`` facts (keys, residuals, thresholds,
        fact records) and this store's settings; ``head(0)`` is an empty store like this one.

        Example::

            small = db.head(100)      # the first 100 facts, e.g. one size of a scaling study
        """
        if not 0 <= n <= len(self):
            raise StoreError(f"head({n}): use 0 <= n <= {len(self)} (the store's size)")
        sub = NeuralDB(layer=self.layer, d_key=self.d_key, d_model=self.d_model, gamma=self.gamma,
                       module_template=self.module_template, residual_template=self.residual_template,
                       model_name=self.model_name, model_type=self.model_type, fingerprint=self.fingerprint,
                       config=self.config, chunk_size=self.chunk_size, screen_rank=self.screen_rank,
                       screen_min_keys=self.screen_min_keys)
        sub.word_prefilter = self.word_prefilter
        sub.add(self.ids[:n], self.keys[:n], self.residuals[:n], thresholds=self.thresholds[:n], words=self.words[:n])
        sub.facts = {i: dict(self.facts[i]) for i in sub.ids if i in self.facts}
        sub.word_starts = self.word_starts
        return sub

    def remove(self, ids: str | Sequence[str], *, stale_ok: bool = False) -> None:
        """Delete facts by id; an unknown id is an error and nothing is removed.

        Example::

            db.remove("fact-1a2b3c")                       # a fact with no sibling: its row goes
            neuraldb.forget(model, tok, db, ["fact-1a2b3c"])  # one with siblings: re-fits them

        A fact that shares its residual with other facts about its subject
        (:meth:`siblings`) is refused with a :class:`StoreError`: their residual was
        optimised for its target too, so dropping its row alone would leave the target
        in the store. :func:`neuraldb.forget` removes it and re-fits the siblings (it
        needs the model); ``stale_ok=True`` drops the rows anyway, leaving the
        siblings' residuals as they are.
        """
        ids = [ids] if isinstance(ids, str) else list(ids)
        missing = [i for i in ids if i not in self._index]
        if missing:
            raise StoreError(f"unknown fact id(s) {missing[:5]}; nothing was removed")
        siblings = [] if stale_ok else self.siblings(ids)
        if siblings:
            raise StoreError(
                f"fact(s) {ids[:5]} share their subject's residual with {siblings[:5]}, which still carries "
                "their target; remove and re-fit with neuraldb.forget(model, tokenizer, db, ids), or pass "
                "stale_ok=True to drop the rows alone. Nothing was removed"
            )
        drop = {self._index[i] for i in ids}
        keep = torch.tensor([r for r in range(len(self.ids)) if r not in drop], dtype=torch.long)
        self.keys = self.keys[keep]
        self.residuals = self.residuals[keep]
        self.thresholds = self.thresholds[keep]
        self.words = self.words[keep]
        self.ids = [self.ids[r] for r in keep.tolist()]
        for i in ids:
            self.facts.pop(i, None)
        self._index = {fid: r for r, fid in enumerate(self.ids)}
        self._changed()

    @property
    def shares_residuals(self) -> bool:
        """Whether facts about one subject share one residual: the store was built by
        ``neuraldb.edit`` with ``EditConfig.share_subject_residuals`` (the default)."""
        return bool(self.config) and bool(self.config.get("share_subject_residuals", True))

    def siblings(self, ids: str | Sequence[str]) -> list[str]:
        """The stored facts, other than ``ids``, that share a residual with one of ``ids``:
        the facts about the same subject (their records' ``subject``), in a store that
        :attr:`shares_residuals`; [] otherwise."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        if not self.shares_residuals:
            return []
        subjects = {(self.facts.get(i) or {}).get("subject") for i in ids} - {None}
        gone = set(ids)
        return [f for f in self.ids if f not in gone and (self.facts.get(f) or {}).get("subject") in subjects]

    def find(self, *, subject: str, prompt: str) -> str | None:
        """The id of the stored fact with identity ``(subject, prompt)``, or None.

        Example::

            db.find(subject="LeBron James", prompt="{} plays the sport of")   # 'fact-...'
        """
        from .identity import stored_identities

        found = stored_identities(self).get((subject, prompt))
        return found[-1] if found else None

    def update(self, fact_id: str, *, key: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               fact: Mapping[str, Any] | None = None, threshold: float | None = None,
               words: torch.Tensor | None = None) -> None:
        """Replace one fact's key, residual, per-key threshold and/or word (2, width) in place.

        A new key without a new ``threshold`` resets the fact's threshold to -inf (the
        global gamma): a threshold calibrated for the old key says nothing about the new one.
        """
        if fact_id not in self._index:
            raise StoreError(f"unknown fact id {fact_id!r}; use add() for new facts")
        r = self._index[fact_id]
        k = self.keys[r : r + 1] if key is None else torch.as_tensor(key).reshape(1, -1)
        v = self.residuals[r : r + 1] if residual is None else torch.as_tensor(residual).reshape(1, -1)
        k, v = check_rows(k, v, 1, d_key=self.d_key, d_model=self.d_model, error=StoreError)
        width = self.words.shape[2]
        w = None if words is None else check_words(torch.as_tensor(words).reshape(1, -1, width), 1, width,
                                                   error=StoreError)
        if threshold is not None:
            self.thresholds[r] = check_thresholds([threshold], 1, error=StoreError)[0]
        elif key is not None:
            self.thresholds[r] = float("-inf")
        self.keys[r] = k[0]
        self.residuals[r] = v[0]
        if w is not None:
            self.words, w = same_forms(self.words, w)
            self.words[r] = w[0]
        if fact is not None:
            self.facts[fact_id] = dict(fact)
        self._changed()

    def clear_words(self) -> None:
        """Switch the word check off for every fact (the paper's gate on the same keys and residuals)."""
        self.words = torch.full((len(self), 1, self.words.shape[2]), NO_WORD, dtype=torch.long)
        self._changed(keep_stats=True)

    def unreachable(self) -> dict[str, list[dict[str, str]]]:
        """``{fact_id: [{"text", "reason"}, ...]}``: the facts whose own prompt or paraphrases could
        not fire them when they were edited (``neuraldb.edit``'s self-check, :func:`neuraldb.reach.unreachable`)."""
        return unreachable(self)

    @property
    def word_starts(self) -> torch.Tensor:
        """(vocab,) bool: the tokens after which a word starts (:func:`neuraldb.words.word_start_tokens`)."""
        return self._word_starts

    @word_starts.setter
    def word_starts(self, value: torch.Tensor) -> None:
        self._word_starts = torch.as_tensor(value).detach().to("cpu", torch.bool).reshape(-1)
        self._changed(keep_stats=True)

    @property
    def word_checked(self) -> torch.Tensor:
        """(N,) bool: the facts whose gate also checks their subject's tokens."""
        return (self.words[:, 0] != NO_WORD).any(dim=1)

    @torch.no_grad()
    def calibrate(self, queries: torch.Tensor, *, margin: float = 0.05, ids: Sequence[str] | None = None,
                  chunk_size: int = 8192) -> torch.Tensor:
        """Per-key thresholds from calibration queries (activations of text no fact is about).

        ``thresholds[i] = max_q cos(q, k_i) + margin`` for the facts ``ids`` (default: all),
        so none of them fires on any calibration query again, and a query must be more
        like key ``i`` than anything in the calibration text to fire it. Exact (a max
        over all queries), deterministic, and per key: one fact's threshold never depends
        on another fact. ``queries`` is (M, d_key), on any device. Returns the new
        thresholds of the calibrated rows.
        """
        if not -2.0 <= margin <= 2.0:
            raise StoreError(f"margin={margin} makes no sense for a cosine threshold")
        rows = list(range(len(self))) if ids is None else [self._row(i) for i in ids]
        q = torch.as_tensor(queries).detach().reshape(-1, self.d_key).float()
        if q.shape[0] == 0:
            raise StoreError("calibrate needs at least one query")
        best = max_cosines(self.keys[torch.tensor(rows, dtype=torch.long)], q, chunk_size=chunk_size).cpu()
        new = best + float(margin)
        if rows:
            self.thresholds[torch.tensor(rows, dtype=torch.long)] = new
        self._changed(keep_stats=True)
        return new

    def _row(self, fact_id: str) -> int:
        if fact_id not in self._index:
            raise StoreError(f"unknown fact id {fact_id!r}")
        return self._index[fact_id]

    def gate_thresholds(self) -> torch.Tensor:
        """(N,) the threshold each key's gate uses: ``max(gamma, thresholds)``."""
        return self.thresholds.clamp_min(self.gamma)

    def _changed(self, keep_stats: bool = False) -> None:
        self._version += 1
        self._device = None
        if not keep_stats:
            self.firing.per_fact = torch.zeros(len(self.ids), dtype=torch.long)

    # ---------------------------------------------------------------- retrieval
    def device_index(self, device: torch.device) -> DeviceIndex:
        """The store's tensors on ``device`` (:class:`~neuraldb.retrieval.DeviceIndex`), cached until it changes;
        built once (under a lock) when threads call the model at once."""
        index = self._device
        if index is not None and index.device == device:
            return index
        with self._build:
            index = self._device
            if index is None or index.device != device:
                index = DeviceIndex(self.keys, self.residuals, self.gate_thresholds(), self.words,
                                    self.word_starts, device=device)
                self._device = index
        return index

    def device_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit keys (N, d_key), residuals (N, d_model)) on ``device``, cached until the store changes."""
        index = self.device_index(device)
        return index.keys, index.residuals

    @property
    def screen(self) -> LowRankScreen | None:
        """The hook's low-rank screen since the last change (None until a large store's first call)."""
        index = self._device
        return index.screen if index is not None else None

    def gate(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate's decision ``(fire, index, scores)`` for query rows (M, d_key): :meth:`retrieve`'s
        exact top-1 and ``scores > max(gamma, thresholds[index])`` (:meth:`DeviceIndex.gate
        <neuraldb.retrieval.DeviceIndex.gate>`: no position mask, no word check)."""
        return self.device_index(queries.device).gate(queries, chunk_size=self.chunk_size)

    def retrieve(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-1 cosine ``(scores, index)`` per query row (M, d_key), chunked over the keys:
        (M,) float32 and (M,) long, -inf and -1 for an empty store."""
        return self.device_index(queries.device).retrieve(queries, chunk_size=self.chunk_size)

    def fire(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hook's gate: :meth:`gate`'s ``(fire, index)`` for query rows (M, d_key), computed
        through the exact low-rank screen for stores of ``screen_min_keys`` keys or more."""
        return self.device_index(queries.device).fire(queries, rank=self.screen_rank, min_keys=self.screen_min_keys,
                                                      chunk_size=self.chunk_size)

    def _screened_gate(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`fire` through the screen whatever the store's size."""
        return self.device_index(queries.device).screened_gate(queries, rank=self.screen_rank,
                                                               chunk_size=self.chunk_size)

    def fire_checked(self, queries: torch.Tensor, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hook's gate with the word check: :meth:`fire` shut where :meth:`word_ok` fails at token
        ``windows`` (M, width), through the exact token-id prefilter of ``word_prefilter``
        (:meth:`DeviceIndex.fire_checked <neuraldb.retrieval.DeviceIndex.fire_checked>`)."""
        return self.device_index(queries.device).fire_checked(
            queries, windows, rank=self.screen_rank, min_keys=self.screen_min_keys, chunk_size=self.chunk_size,
            prefilter=self.word_prefilter)

    def checks_words(self, device: torch.device) -> bool:
        """Whether any fact is word-checked (a host flag cached with the device tensors)."""
        return self.device_index(device).checks_words

    def word_ok(self, index: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(M,) bool: the word check for retrieved rows ``index`` (M,) at token ``windows``
        (M, width) (:func:`neuraldb.words.token_windows`); True for facts without a word."""
        return self.device_index(windows.device).word_ok(index, windows)

    # ------------------------------------------------------------------- firing
    def reset_stats(self) -> None:
        """Zero the firing counters (positions seen, fires, fires per fact)."""
        self.firing.reset(len(self.ids))

    def stats(self) -> dict[str, Any]:
        """Firing counters since the last reset: gated positions, fires, rate."""
        return self.firing.stats()

    fires_per_fact = _firing("per_fact", "(N,) long: fires per fact since the last reset or change of rows.")
    last_fire_mask = _firing("last_mask", "(batch, seq) bool: where the last model call fired (None before one).")
    last_fire_index = _firing("last_index", "(batch, seq) long: the fact fired at each position of the last call, "
                                            "-1 where shut (None before one).")

    # ------------------------------------------------------------ attach/detach
    def module_name(self, model: nn.Module | None = None) -> str:
        """The module whose input is the key (the MLP output projection at ``layer``)."""
        return key_module(self, model, error=StoreError)

    def residual_module_name(self, model: nn.Module | None = None) -> str:
        """The module whose output receives the residual (usually the same projection)."""
        return residual_module(self, model)

    def check_compatible(self, model: nn.Module, *, layer: int | None = None) -> None:
        """Raise :class:`StoreError` unless this store was built for ``model`` at ``layer``
        (:func:`neuraldb.compat.check_compatible`: layer, module, key width, weight fingerprint)."""
        check_compatible(self, model, layer=layer, error=StoreError)

    def attach(self, model: nn.Module, *, layer: int | None = None, check: bool = True) -> "NeuralDB":
        """Hook the gate into ``model`` (:meth:`StoreHook.attach <neuraldb.hook.StoreHook.attach>`: checks
        it is the store's model and layer)."""
        if self._hook is not None:
            raise StoreError("this store is already attached; call detach() first")
        self._hook = StoreHook.attach(self, model, layer=layer, check=check, error=StoreError)
        return self

    def detach(self) -> None:
        """Remove the hooks; the model is the original model again."""
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.detach()

    @property
    def is_attached(self) -> bool:
        return self._hook is not None

    @property
    def model(self) -> nn.Module | None:
        """The model this store is attached to (None when detached)."""
        return self._hook.model if self._hook is not None else None

    def attached(self, model: nn.Module, *, layer: int | None = None) -> ContextManager["NeuralDB"]:
        """``with db.attached(model): ...`` attaches, and always detaches on exit."""
        return attached(self, model, layer=layer)

    # -------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write keys, residuals and metadata to one safetensors file, atomically
        (:func:`neuraldb.storefile.write_store`)."""
        from .storefile import write_store

        return write_store(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: nn.Module | None = None, layer: int | None = None) -> "NeuralDB":
        """Read a store saved by :meth:`save`; with ``model``, check it belongs to that model
        (:func:`neuraldb.storefile.read_store`)."""
        from .storefile import read_store

        db = read_store(path, cls=cls)
        if model is not None:
            db.check_compatible(model, layer=layer)
        elif layer is not None:
            check_layer(db, layer, error=StoreError)
        return db
