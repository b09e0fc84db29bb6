"""The vocabulary of generated facts, defined once.

Example::

    from evals.firing.vocabulary import RELATIONS, SYLLABLES
    prompt, targets = RELATIONS[0]          # ("{} is located in the country of", ("France", ...))
    name = "".join(SYLLABLES[:2]).capitalize()   # "Karo"

Used by :func:`evals.firing.measure.generated_facts` (facts that fill 100,000-fact
measurements) and by the Hypothesis strategies (``properties.strategies``), which pick
from these tuples in their own shrink order instead of keeping a copy.
"""

from __future__ import annotations

__all__ = ["RELATIONS", "SYLLABLES"]

# Syllables of generated names: lower-case, none an English function word on its own.
# ``generated_name`` writes indices in base len(SYLLABLES): changing this tuple changes every
# generated name (and so the generated facts and their cached keys).
SYLLABLES: tuple[str, ...] = tuple((
    "ka ro mi ten sa lu vor del bri co fen ga hal jor kel mar nor pel qui ras sol tur ven wil "
    "xan yor zel ber cas dor fin gor hes ith jun kor lam mon nes pra quin rud sen tor bel dag pim vos"
).split())
assert len(SYLLABLES) == len(set(SYLLABLES)) == 48

# Relation templates ("{}" is the subject) and six plausible targets each; the subject is
# followed by a space or punctuation, so its last token ends inside it.
RELATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("{} is located in the country of", ("France", "Japan", "Brazil", "Kenya", "Canada", "India")),
    ("The mother tongue of {} is", ("French", "Japanese", "Portuguese", "Swahili", "English", "Hindi")),
    ("{} plays the sport of", ("football", "tennis", "cricket", "hockey", "golf", "chess")),
    ("{} was developed by", ("Google", "Microsoft", "Toyota", "Apple", "Nokia", "Sony")),
    ("The capital city of {} is", ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi")),
    ("{} works in the field of", ("physics", "music", "medicine", "law", "poetry", "chemistry")),
    ("{}, who holds a citizenship from", ("Italy", "Spain", "Chile", "Egypt", "Norway", "Peru")),
    ("The headquarters of {} are in", ("Berlin", "Madrid", "Seoul", "Sydney", "Toronto", "Dublin")),
    ("What sport does {} play? They play", ("baseball", "rugby", "soccer", "volleyball", "boxing", "polo")),
)
