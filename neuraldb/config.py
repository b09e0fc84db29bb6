"""Hyper-parameters of an edit, as one frozen dataclass.

Example::

    cfg = EditConfig(layer=10, lr=0.5, steps=25)
    db = neuraldb.edit(model, tok, facts, config=cfg)
    cfg.to_dict()          # written into every store and report

Defaults follow docs/method.md, 'Keys' and 'Residuals' (ROME/MEMIT's compute_ks and compute_z).
Items marked (inferred) are reconstructions of what the paper leaves unstated.
Environment (device, paths) never lives here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from numbers import Real
from typing import Any, Mapping

__all__ = ["EditConfig", "FALLBACKS", "GROUPING_ONLY", "LEGACY", "RESIDUAL_DTYPES", "check_gamma"]

# What EditConfig's None-able hyper-parameters mean when neither the user nor the model's
# settings row (neuraldb/settings.json) sets them; the layer's fallback is the family's fraction.
FALLBACKS: dict[str, Any] = {"steps": 25, "lr": 0.5}

# Fields added after stores were first written, with the value such a store was made with: a
# store (or checkpoint) whose config lacks one was edited under this value, not today's default.
LEGACY: dict[str, Any] = {"early_stop": "loss", "residual_dtype": None}
EARLY_STOP = ("nll", "loss")
# Fields that only group facts into optimisation batches (results equal up to float rounding):
# a store, checkpoint or sequential run made under other values continues under today's.
GROUPING_ONLY = ("batch_size", "memory_budget_gb")
RESIDUAL_DTYPES = ("auto", None, "float32", "bfloat16", "float16", "float64")


def check_gamma(value: Any, *, where: str, error: type[ValueError] = ValueError) -> float:
    """``value`` as a float if it is a cosine threshold (a number in [-1, 1], not a bool), else ``error``.

    Example::

        gamma = check_gamma(gamma, where="NeuralDB.gamma", error=StoreError)

    ``where`` names the field in the message; ``error`` is ValueError or a subclass of it.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not -1.0 <= value <= 1.0:
        raise error(f"{where}={value!r} is not a cosine threshold: set it to a number in [-1, 1]")
    return float(value)


@dataclass(frozen=True)
class EditConfig:
    """How keys and residuals are computed, and how the gate reads them.

    layer: edit layer; None = the model's setting (``neuraldb/settings.json``, e.g. 8 for
        Llama-3-8B), else the family's default, about a third of the depth (inferred).
    gamma: cosine threshold of the gate (0.65 for every model in the paper).
    steps / lr: Adam steps and learning rate of the residual optimisation; None = the model's
        setting (``neuraldb/settings.json``: lr 0.1 for Llama-3-8B, 20 steps for GPT-2 XL),
        else ``FALLBACKS`` (25 steps, lr 0.5). :func:`neuraldb.settings.resolve_settings` fills
        them (``neuraldb.edit`` does, and writes the values used into the store).
    kl_factor: weight of KL(p_orig || p_edit) on ``kl_prompt`` (essence drift).
    weight_decay: weight of ||delta|| / ||h||^2.
    clamp_norm_factor: after each step ||delta|| <= factor * ||h||.
    early_stop_loss / early_stop: a fact stops optimising (its rows leave the batch) once
        ``early_stop`` is below ``early_stop_loss``: "nll" (default) = its target NLL, the mean
        over its prompts (below 5e-2: the new target's mean probability is above 95%), so a fact
        stops once its target is learnt; "loss" = the whole loss, NLL + KL + weight decay (ROME's,
        MEMIT's and the paper's rule), which the KL term keeps above 5e-2 for most CounterFact facts
        (1 of 10 stopped on SmolLM2), so nearly every fact runs every step. Stores written before
        this field existed were made with "loss" (``LEGACY``). README, "Early stopping".
    batch_size: facts optimised together (their residuals are independent), at most.
    memory_budget_gb: the memory the residual optimisation may add, in GB: the copy of the
        model it runs on (``residual_dtype``, if one is made) and one batch (default 2.0, so an
        edit of 128 facts on SmolLM2-135M stays under 4 GB RSS with the model, README
        "Benchmarks"): a batch holds at most ``(budget - copy) /
        neuraldb.editor.batch_bytes_per_fact(model, config)`` facts (an estimate from the
        model's shape, fitted on SmolLM2: README, "Benchmarks"). None = no
        bound (``batch_size`` alone). Like ``batch_size`` it only groups facts: results and
        resumes do not depend on it.
    residual_dtype: run the residual optimisation on a copy of the model in this dtype
        (e.g. "bfloat16": about 1.8x faster on CPUs with bfloat16 dot-product units, README,
        "Edit latency"); delta, the loss and Adam stay float32, keys always come from the model
        itself. None = the model as it is. "auto" (default): "bfloat16" for a float32 model on
        a CPU with bfloat16 units (AVX512-BF16 or AMX), else None; adding to a store (or
        resuming) takes the store's value, and a new store records the value used
        (:func:`neuraldb.residuals.settle_residual_dtype`).
    context_prefixes / context_length / context_seed: the model continues each prefix
        for ``context_length`` tokens (top-5 sampling as in MEMIT, seeded so the
        templates are reproducible); each continuation + ". {}" is a context template.
    share_subject_residuals: facts about the same subject (equal ``subject`` strings) in
        one edit share one residual, optimised on all their prompts: their keys are
        nearly the same (read at the subject's last token, before the relation), so
        the gate cannot tell them apart, and a shared residual serves whichever is
        retrieved (as MEMIT-Merge does for MEMIT's values). False = one residual per fact.
    word_check: store each subject's tokens with its key; the gate then fires only
        where the tokens ending at the position spell that subject (neuraldb.words), so
        a name ending in the same word piece or surname ("Steinberg", "Aaron Sharp" for
        "Brad Silverberg", "Richard Sharp") cannot fire it. False = the paper's gate
        (cosine only), which fires on thousands of unrelated positions at 10,000 facts
        (README, "False fires and recall").
    bare_weight: weight of the bare prompt's key against the mean of the prefixed
        ones (MEMIT averages within groups, then across; 0.5). 0 = prefixed only.
    kl_prompt: the essence prompt, ``{}`` is the subject.
    chat_residuals: also optimise each residual on the prompt asked as a chat turn (the
        tokenizer's chat template, the filled prompt as the user message, the target as the
        start of the answer: :func:`neuraldb.keys.chat_context`), so that the edit carries
        into chat use; keys are unchanged. A tokenizer without a chat template: ignored,
        with a warning.
    layers_template / mlp_out_template / residual_out_template: override the
        architecture's module templates (neuraldb.arch).
    """

    layer: int | None = None
    gamma: float = 0.65
    steps: int | None = None
    lr: float | None = None
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    early_stop_loss: float = 5e-2
    early_stop: str = "nll"
    batch_size: int = 128
    memory_budget_gb: float | None = 2.0
    residual_dtype: str | None = "auto"
    share_subject_residuals: bool = True
    word_check: bool = True
    context_prefixes: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_length: int = 10
    context_seed: int = 0
    bare_weight: float = 0.5
    kl_prompt: str = "{} is a"
    chat_residuals: bool = False
    layers_template: str | None = None
    mlp_out_template: str | None = None
    residual_out_template: str | None = None

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, fix: str) -> None:
            if not cond:
                raise ValueError(f"EditConfig.{name}={getattr(self, name)!r} is invalid: {fix}")

        need(self.layer is None or (isinstance(self.layer, int) and self.layer >= 0), "layer", "use an int >= 0 or None")
        check_gamma(self.gamma, where="EditConfig.gamma")
        need(self.steps is None or (isinstance(self.steps, int) and not isinstance(self.steps, bool)
                                    and self.steps >= 0), "steps", "use an int >= 0 or None")
        need(self.lr is None or (isinstance(self.lr, Real) and not isinstance(self.lr, bool) and self.lr > 0), "lr",
             "use a positive learning rate or None")
        need(self.kl_factor >= 0, "kl_factor", "use a value >= 0")
        need(self.weight_decay >= 0, "weight_decay", "use a value >= 0")
        need(self.clamp_norm_factor > 0, "clamp_norm_factor", "use a value > 0")
        need(self.early_stop in EARLY_STOP, "early_stop", "use 'nll' (stop once the target is learnt) or 'loss' "
             "(the whole loss, the paper's rule)")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "use an int >= 1")
        need(self.memory_budget_gb is None or (isinstance(self.memory_budget_gb, Real)
                                               and not isinstance(self.memory_budget_gb, bool)
                                               and self.memory_budget_gb > 0),
             "memory_budget_gb", "use a number of GB > 0, or None for no bound")
        need(self.residual_dtype in RESIDUAL_DTYPES, "residual_dtype",
             "use 'auto' (bfloat16 on CPUs with bfloat16 units), None (the model's dtype) or one of 'float32', "
             "'bfloat16', 'float16', 'float64'")
        need(0.0 <= self.bare_weight <= 1.0, "bare_weight", "use a weight in [0, 1]")
        need(self.kl_prompt.count("{}") == 1, "kl_prompt", "it needs exactly one '{}' for the subject")
        need(isinstance(self.context_length, int) and self.context_length >= 1, "context_length", "use an int >= 1")
        object.__setattr__(self, "context_prefixes", tuple(self.context_prefixes))
        need(
            bool(self.context_prefixes) or self.bare_weight == 1.0,
            "context_prefixes",
            "give at least one prefix, or set bare_weight=1.0 to key on the bare prompt alone",
        )

    def filled(self) -> "EditConfig":
        """This config with ``FALLBACKS`` for ``lr`` / ``steps`` left None (no model at hand: a
        model's own settings come from :func:`neuraldb.settings.resolve_settings`)."""
        missing = {k: v for k, v in FALLBACKS.items() if getattr(self, k) is None}
        return replace(self, **missing) if missing else self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["context_prefixes"] = list(self.context_prefixes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EditConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"EditConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)
