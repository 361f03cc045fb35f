"""A synthetic world of people with facts to memorise.

Each of ``n_entities`` people has a unique two-word pronounceable name (e.g. "Zorvan Keltap") and one
value per attribute, drawn uniformly from the attribute's finite value set (:data:`ATTRIBUTES`).
A *fact* is one ``(entity, attribute, value)`` triple. Facts are rendered as

* biography sentences, through several templated paraphrases per attribute
  (``biography(fact, paraphrase)``), and
* question/answer pairs ``"Question: What is the birth year of Zorvan Keltap?\\nAnswer: 1923"``
  (``qa_prompt`` + ``" " + value``).

The QA form is part of the training text by default so that a tiny model learns the answering
format; the memorisation test asks the same questions (see :mod:`moelab.data.synthetic`).

``information_bits()`` is the information a model must store to know every fact:
``sum over facts of log2(|value set of the fact's attribute|)``. Names are *not* counted (they are
given in the prompt; the model need not generate them).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "k", "m", "t"]

ATTRIBUTES: dict[str, dict] = {
    "birth_year": {
        "values": [str(y) for y in range(1900, 2000)],
        "question": "What is the birth year of {name}?",
        "templates": [
            "{name} was born in {value}.",
            "The birth year of {name} is {value}.",
            "In {value}, {name} came into the world.",
            "{name} celebrates a birthday every year since {value}, the year of their birth.",
        ],
    },
    "birth_city": {
        "values": ["Lisbon", "Osaka", "Toronto", "Nairobi", "Lima", "Oslo", "Dublin", "Seoul", "Cairo", "Denver",
                   "Hanoi", "Quito", "Vienna", "Perth", "Dakar", "Kraków", "Tucson", "Bergen", "Recife", "Tbilisi"],
        "question": "What is the birth city of {name}?",
        "templates": [
            "{name} was born in the city of {value}.",
            "The birth city of {name} is {value}.",
            "{name} is a native of {value}.",
            "{name} spent their early childhood in {value}, where they were born.",
        ],
    },
    "employer": {
        "values": ["Nortex", "Valmont Labs", "Quillon Foods", "Aster Rail", "Brightwell Bank", "Corvid Systems",
                   "Duneway Motors", "Elmstone Press", "Fenwick Energy", "Galloway Health", "Harbor Textiles",
                   "Ironleaf Games", "Juniper Air", "Kestrel Mining", "Lumen Optics", "Marlow Shipping",
                   "Nimbus Cloud", "Orchid Pharma", "Pinecrest Hotels", "Quarry Steel"],
        "question": "Who is the employer of {name}?",
        "templates": [
            "{name} works for {value}.",
            "The employer of {name} is {value}.",
            "{name} is employed by {value}.",
            "Every weekday {name} goes to work at {value}.",
        ],
    },
    "favourite_colour": {
        "values": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink"],
        "question": "What is the favourite colour of {name}?",
        "templates": [
            "{name}'s favourite colour is {value}.",
            "The favourite colour of {name} is {value}.",
            "{name} likes the colour {value} more than any other.",
            "Of all colours, {name} prefers {value}.",
        ],
    },
    "favourite_sport": {
        "values": ["football", "tennis", "chess", "rowing", "cycling", "swimming", "golf", "boxing", "fencing", "skiing"],
        "question": "What is the favourite sport of {name}?",
        "templates": [
            "{name}'s favourite sport is {value}.",
            "The favourite sport of {name} is {value}.",
            "{name} loves {value} more than any other sport.",
            "Of all sports, {name} enjoys {value} the most.",
        ],
    },
}
MAX_PARAPHRASES = min(len(a["templates"]) for a in ATTRIBUTES.values())


@dataclass(frozen=True)
class Fact:
    """One memorisable fact: ``entity``'s ``attribute`` is ``value``."""

    entity: str
    attribute: str
    value: str


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _word(rng: random.Random) -> str:
    return (_syllable(rng) + _syllable(rng)).capitalize()


def random_names(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct "First Last" names made of two pronounceable syllables each."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = f"{_word(rng)} {_word(rng)}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


class World:
    """``n_entities`` people, each with one value per attribute; a pure function of ``(seed, n_entities, attributes)``."""

    def __init__(self, seed: int, n_entities: int, attributes: list[str] | None = None):
        self.attributes = list(attributes or ATTRIBUTES)
        rng = random.Random(f"moelab-world:{seed}")
        self.names = random_names(n_entities, rng)
        self.values: dict[str, dict[str, str]] = {
            name: {a: rng.choice(ATTRIBUTES[a]["values"]) for a in self.attributes} for name in self.names
        }

    def facts(self) -> list[Fact]:
        """All facts, entity-major in name-generation order."""
        return [Fact(n, a, self.values[n][a]) for n in self.names for a in self.attributes]

    def information_bits(self) -> float:
        """Sum over facts of log2(|value set|): the bits needed to store every fact (names excluded)."""
        per_entity = sum(math.log2(len(ATTRIBUTES[a]["values"])) for a in self.attributes)
        return per_entity * len(self.names)

    def __len__(self) -> int:
        return len(self.names)


def biography(fact: Fact, paraphrase: int) -> str:
    """Biography sentence for ``fact`` using template number ``paraphrase`` of its attribute."""
    return ATTRIBUTES[fact.attribute]["templates"][paraphrase].format(name=fact.entity, value=fact.value)


def qa_prompt(entity: str, attribute: str) -> str:
    """``"Question: <question>\\nAnswer:"`` — the model's continuation is ``" " + value``."""
    return "Question: " + ATTRIBUTES[attribute]["question"].format(name=entity) + "\nAnswer:"


def qa_document(fact: Fact) -> str:
    """The QA pair as trained on: ``qa_prompt(...) + " " + value``."""
    return qa_prompt(fact.entity, fact.attribute) + " " + fact.value
