"""Hypothesis strategies for NeuralDB's properties.

Example::

    from hypothesis import given
    from properties.strategies import fact_sets, unrelated_prompts, key_sets

    @given(facts=fact_sets(min_size=2, max_size=8))
    def test_something(facts): ...

    @given(ks=key_sets(size=100_000, dim=1536))
    def test_store(ks): ks.keys, ks.residuals, ks.ids

Every public strategy takes keyword-only options, validates them, and returns a small
``@st.composite`` strategy (so a bad option is a ``ValueError`` where the test is
defined, not a confusing failure inside a test). Each docstring says
how its examples shrink, so a failure reads as a minimal case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from hypothesis import strategies as st

from evals.firing import vocabulary
from neuraldb import Fact

__all__ = [
    "COMMON_WORDS", "KEY_STRUCTURES", "RELATIONS", "SYLLABLES", "KeySet", "fact_sets", "key_sets",
    "names", "relations", "unrelated_prompts",
]

# Syllables of generated names (:data:`evals.firing.vocabulary.SYLLABLES`, shared with the
# generated facts of the firing measurements): names shrink towards the first one, "ka".
SYLLABLES = vocabulary.SYLLABLES

# Relation templates ("{}" is the subject) and plausible targets: the shared
# :data:`evals.firing.vocabulary.RELATIONS`, subject-first templates first (a stable sort).
# Subjects at position 0 of the bare prompt are the known source of false fires
# (docs/method.md, 'False fires on SmolLM2'), so examples shrink towards them.
RELATIONS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    sorted(vocabulary.RELATIONS, key=lambda relation: not relation[0].startswith("{}"))
)

# Everyday English, punctuation and quotes: the tokens on which false fires were measured to land.
COMMON_WORDS = (
    "the the the a a of of to to and and in in is was he she it they you I we that this his her "
    "their for on with as at by from but not what all were when there can said one so up out if about "
    "who them then she'd he'd don't it's looked back again said, asked. replied. ! ? . , ; : - "
    "\" ' \" ' ( ) time day night house door room hand eyes face head voice way man woman girl boy "
    "mother father friend water light window car road city river mountain book story song game "
    "red old new little long good great small first last other same right left next "
    "walked turned smiled knew thought felt saw heard came went took made looked wanted needed "
    "slowly quickly never always still just only even very really too"
).split()

KEY_STRUCTURES = ("gaussian", "anisotropic", "clustered", "near_duplicates")


def _check_size(name: str, lo: int, hi: int | None) -> None:
    if not isinstance(lo, int) or lo < 0:
        raise ValueError(f"{name}: min_size={lo!r} must be an int >= 0")
    if hi is not None and (not isinstance(hi, int) or hi < lo):
        raise ValueError(f"{name}: max_size={hi!r} must be an int >= min_size ({lo})")


# ------------------------------------------------------------------- facts
def names(*, min_words: int = 1, max_words: int = 3, min_syllables: int = 2, max_syllables: int = 3) -> st.SearchStrategy[str]:
    """Generated proper names like ``"Kavor Delbri"``: capitalised words made of :data:`SYLLABLES`.

    Shrinks towards one word of ``min_syllables`` copies of the first syllable ("Kaka").
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"names: need 1 <= min_words ({min_words}) <= max_words ({max_words})")
    if not 1 <= min_syllables <= max_syllables:
        raise ValueError(f"names: need 1 <= min_syllables ({min_syllables}) <= max_syllables ({max_syllables})")
    word = st.lists(st.sampled_from(SYLLABLES), min_size=min_syllables, max_size=max_syllables).map(
        lambda s: "".join(s).capitalize()
    )
    return st.lists(word, min_size=min_words, max_size=max_words).map(" ".join)


def relations(*, subject_first: bool | None = None) -> st.SearchStrategy[tuple[str, tuple[str, ...]]]:
    """One of :data:`RELATIONS` as ``(template, targets)``.

    ``subject_first`` True / False keeps only templates that start / do not start with the
    subject; None keeps all. Shrinks towards the first template (subject first).
    """
    if subject_first is not None and not isinstance(subject_first, bool):
        raise ValueError(f"relations: subject_first={subject_first!r} must be True, False or None")
    pool = [r for r in RELATIONS if subject_first is None or r[0].startswith("{}") == subject_first]
    return st.sampled_from(pool)


def fact_sets(
    *,
    min_size: int = 1,
    max_size: int = 10,
    subject_first: bool | None = None,
    with_paraphrases: bool = True,
    id_prefix: str = "fact",
) -> st.SearchStrategy[list[Fact]]:
    """A list of :class:`neuraldb.Fact` with unique subjects (no subject inside another one).

    Subjects come from :func:`names`, prompts from :func:`relations`; ``target_new`` and
    ``target_true`` are two different targets of the relation. With ``with_paraphrases``, each
    fact has one paraphrase: an unrelated sentence, then the relation about the same subject
    (CounterFact's paraphrase prompts have this shape). Ids are ``{id_prefix}-{i}``.

    Shrinks towards fewer facts, shorter names, the first relation (subject first) and the
    first targets.
    """
    _check_size("fact_sets", min_size, max_size)
    if min_size < 1:
        raise ValueError("fact_sets: min_size must be >= 1 (a fact set is never empty)")
    if not isinstance(id_prefix, str) or not id_prefix:
        raise ValueError(f"fact_sets: id_prefix={id_prefix!r} must be a non-empty string")
    relations(subject_first=subject_first)  # validates subject_first
    return _fact_sets(min_size=min_size, max_size=max_size, subject_first=subject_first,
                      with_paraphrases=with_paraphrases, id_prefix=id_prefix)


@st.composite
def _fact_sets(draw, *, min_size, max_size, subject_first, with_paraphrases, id_prefix) -> list[Fact]:
    subjects = draw(
        st.lists(names(), min_size=min_size, max_size=max_size, unique_by=str.lower).filter(_no_nesting)
    )
    facts = []
    for i, subject in enumerate(subjects):
        template, targets = draw(relations(subject_first=subject_first))
        new = draw(st.sampled_from(targets))
        true = draw(st.sampled_from([t for t in targets if t != new]))
        paraphrases: tuple[str, ...] = ()
        if with_paraphrases:
            lead = draw(st.sampled_from(_PARAPHRASE_LEADS))
            other, _ = draw(relations())
            paraphrases = (f"{lead} {other.format(subject)}",)
        facts.append(Fact(prompt=template, subject=subject, target_new=new, target_true=true,
                          paraphrases=paraphrases, id=f"{id_prefix}-{i}"))
    return facts


_PARAPHRASE_LEADS = (
    "Last updated on 4 February 2017.",
    "It rained all day.",
    "Here is a fact.",
    "The meeting ended early.",
    "Read the notes below.",
)


def _no_nesting(subjects: Sequence[str]) -> bool:
    low = [s.lower() for s in subjects]
    return not any(a != b and a in b for a in low for b in low)


# --------------------------------------------------------------- unrelated text
def _mentions(text: str, subjects: Sequence[str]) -> bool:
    low = text.lower()
    # a subject's words (and their syllable stems) must not appear: the text is about nothing stored
    for s in subjects:
        if s.lower() in low:
            return True
        for w in s.lower().split():
            if re.search(r"\b" + re.escape(w), low):
                return True
    return False


def unrelated_prompts(
    *,
    subjects: Sequence[str] = (),
    corpus: Sequence[str] | None = None,
    min_words: int = 1,
    max_words: int = 40,
    min_size: int = 1,
    max_size: int = 4,
) -> st.SearchStrategy[list[str]]:
    """A list of texts that mention none of ``subjects`` (not even one word of a subject).

    Each text is either words drawn from :data:`COMMON_WORDS` (everyday English, punctuation
    and quotes: where false fires were measured to land) or, when ``corpus`` is given, a
    window of whole words from one of its passages. Texts that mention a subject are
    rejected (filtered), so keep ``subjects`` to names that are not English words.

    Shrinks towards fewer and shorter texts, the first words of :data:`COMMON_WORDS`
    ("the the ..."), and the start of the first corpus passage.
    """
    _check_size("unrelated_prompts", min_size, max_size)
    if not 1 <= min_words <= max_words:
        raise ValueError(f"unrelated_prompts: need 1 <= min_words ({min_words}) <= max_words ({max_words})")
    if corpus is not None and not [p for p in corpus if p.split()]:
        raise ValueError("unrelated_prompts: corpus has no passage with words")
    subjects = [s for s in subjects if s.strip()]
    passages = [p.split() for p in corpus if p.split()] if corpus is not None else None
    return _unrelated_prompts(subjects, passages, min_words, max_words, min_size, max_size)


@st.composite
def _unrelated_prompts(draw, subjects, passages, min_words, max_words, min_size, max_size) -> list[str]:

    def one() -> st.SearchStrategy[str]:
        words = st.lists(st.sampled_from(COMMON_WORDS), min_size=min_words, max_size=max_words).map(_join)
        if passages is None:
            return words

        @st.composite
        def window(d) -> str:
            p = passages[d(st.integers(0, len(passages) - 1))]
            n = d(st.integers(min(min_words, len(p)), min(max_words, len(p))))
            start = d(st.integers(0, len(p) - n))
            return " ".join(p[start: start + n])

        return st.one_of(window(), words)

    texts = draw(st.lists(one().filter(lambda t: not _mentions(t, subjects)), min_size=min_size, max_size=max_size))
    return texts


def _join(words: Sequence[str]) -> str:
    text = " ".join(words)
    return re.sub(r" ([,.;:!?])", r"\1", text)


# ------------------------------------------------------------------------ keys
@dataclass(frozen=True)
class KeySet:
    """Synthetic store contents: ``ids`` (n), ``keys`` (n, dim), ``residuals`` (n, d_model).

    ``seed`` and ``structure`` regenerate it; keys are float32 and pairwise distinct in
    direction (``min_gap``: the largest off-diagonal cosine is below 1 - min_gap, checked
    on a sample for large n).
    """

    ids: list[str]
    keys: torch.Tensor
    residuals: torch.Tensor
    seed: int
    structure: str

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:  # what a failing example prints
        return f"KeySet(n={len(self)}, dim={self.keys.shape[1]}, structure={self.structure!r}, seed={self.seed})"


def make_keys(n: int, dim: int, *, seed: int, structure: str) -> torch.Tensor:
    """Deterministic (n, dim) float32 keys of one of :data:`KEY_STRUCTURES`.

    gaussian: isotropic. anisotropic: a shared mean direction plus a decaying spectrum, so
    keys have cosines ~0.3-0.8 to each other (like real MLP activations). clustered: 32
    tight clusters. near_duplicates: pairs of keys at cosine ~0.99.
    """
    g = torch.Generator().manual_seed(seed)
    if structure == "gaussian":
        return torch.randn(n, dim, generator=g)
    if structure == "anisotropic":
        scale = torch.linspace(1.0, 0.05, dim).pow(2)
        mean = torch.randn(dim, generator=g) * 0.6
        return mean + torch.randn(n, dim, generator=g) * scale * 2.0
    if structure == "clustered":
        centres = torch.randn(32, dim, generator=g) * 3
        which = torch.randint(0, 32, (n,), generator=g)
        return centres[which] + torch.randn(n, dim, generator=g)
    if structure == "near_duplicates":
        base = torch.randn((n + 1) // 2, dim, generator=g)
        twin = base + 0.12 * torch.randn(base.shape, generator=g)
        return torch.stack([base, twin], dim=1).reshape(-1, dim)[:n].contiguous()
    raise ValueError(f"unknown key structure {structure!r}; choose one of {KEY_STRUCTURES}")


def key_sets(
    *,
    size: int | None = None,
    min_size: int = 1,
    max_size: int = 64,
    dim: int = 64,
    d_model: int = 16,
    structures: Sequence[str] = KEY_STRUCTURES,
) -> st.SearchStrategy[KeySet]:
    """A :class:`KeySet` of ``size`` keys (or between ``min_size`` and ``max_size``) of ``dim`` dims.

    The tensors are generated from a drawn seed (Hypothesis never draws 10^8 floats one by
    one), so a 100,000 x 1536 set costs about a second. Shrinks towards fewer keys, seed 0
    and the first structure in ``structures`` (gaussian by default).
    """
    if size is not None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"key_sets: size={size!r} must be an int >= 1")
        min_size = max_size = size
    _check_size("key_sets", min_size, max_size)
    if min_size < 1:
        raise ValueError("key_sets: min_size must be >= 1")
    if not isinstance(dim, int) or dim < 2 or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"key_sets: dim={dim!r} must be an int >= 2 and d_model={d_model!r} >= 1")
    bad = [s for s in structures if s not in KEY_STRUCTURES]
    if bad or not structures:
        raise ValueError(f"key_sets: unknown structure(s) {bad}; choose from {KEY_STRUCTURES}")
    return _key_sets(min_size, max_size, dim, d_model, tuple(structures))


@st.composite
def _key_sets(draw, min_size, max_size, dim, d_model, structures) -> KeySet:
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**31 - 1))
    structure = draw(st.sampled_from(list(structures)))
    keys = make_keys(n, dim, seed=seed, structure=structure)
    g = torch.Generator().manual_seed(seed + 1)
    residuals = torch.randn(n, d_model, generator=g)
    return KeySet([f"k{i}" for i in range(n)], keys, residuals, seed, structure)
