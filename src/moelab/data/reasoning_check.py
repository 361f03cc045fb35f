"""Independent checker for the arithmetic problems: parses the *text* back and evaluates it.

This deliberately shares no code with :mod:`moelab.data.reasoning` (which computes answers from the
structured :class:`~moelab.data.reasoning.Problem`), so agreement between the two is evidence that
both the generator and the rendering are right. Nothing is ever passed to ``eval``.
"""

from __future__ import annotations

import re

_MODULUS = re.compile(r"^Work modulo (\d+)\.$")
_GIVEN = re.compile(r"^Let ([a-z]) = (\d+)\.$")
_DERIVED = re.compile(r"^Let ([a-z]) = ([a-z]) ([-+*]) ([a-z])\.$")
_QUERY = re.compile(r"^What is ([a-z])\?$")
_STEP = re.compile(
    r"^([a-z]) = ([a-z]) ([-+*]) ([a-z]), ([a-z]) = (\d+), ([a-z]) = (\d+), (\d+) ([-+*]) (\d+) = (\d+), ([a-z]) = (\d+)\.$"
)
_FINAL = re.compile(r"^#### (\d+)$")


class CheckFailed(ValueError):
    """The text does not parse or does not add up."""


def _combine(op: str, a: int, b: int, m: int) -> int:
    table = {"+": a + b, "-": a - b, "*": a * b}
    return table[op] % m


def _sentences(question: str) -> list[str]:
    # Sentences end in '.' or '?' followed by a space or the end of the text.
    return [s for s in re.split(r"(?<=[.?])\s+", question.strip()) if s]


def solve_question(question: str) -> int:
    """Parse a problem statement (without ``Question:``) and return the asked value mod the modulus."""
    sents = _sentences(question)
    if len(sents) < 3:
        raise CheckFailed(f"too few sentences in {question!r}")
    m = _MODULUS.match(sents[0])
    q = _QUERY.match(sents[-1])
    if not m or not q:
        raise CheckFailed(f"missing 'Work modulo N.' or 'What is x?' in {question!r}")
    modulus = int(m.group(1))
    env: dict[str, int] = {}
    for s in sents[1:-1]:
        if g := _GIVEN.match(s):
            value = int(g.group(2))
            if value >= modulus:
                raise CheckFailed(f"given {s!r} is not reduced mod {modulus}")
            name = g.group(1)
        elif d := _DERIVED.match(s):
            name, left, op, right = d.groups()
            if left not in env or right not in env:
                raise CheckFailed(f"{s!r} uses an undefined variable")
            value = _combine(op, env[left], env[right], modulus)
        else:
            raise CheckFailed(f"unparsable sentence {s!r}")
        if name in env:
            raise CheckFailed(f"{name} defined twice")
        env[name] = value
    target = q.group(1)
    if target not in env:
        raise CheckFailed(f"asked variable {target} is undefined")
    return env[target]


def split_document(doc: str) -> tuple[str, str]:
    """Split ``"Question: <q>\\nAnswer:<solution>"`` into ``(q, solution)``."""
    if not doc.startswith("Question: ") or "\nAnswer:" not in doc:
        raise CheckFailed("document is not 'Question: ...\\nAnswer: ...'")
    q, sol = doc[len("Question: "):].split("\nAnswer:", 1)
    return q, sol


def check_document(doc: str) -> int:
    """Verify every solution step and the final ``#### n`` line of a full document; return the answer.

    Each step line must restate a derived variable's definition, look its operands up with the values
    the question implies, and give the correct result; the final line must equal :func:`solve_question`.
    """
    question, solution = split_document(doc)
    expected = solve_question(question)
    sents = _sentences(question)
    modulus = int(_MODULUS.match(sents[0]).group(1))
    env: dict[str, int] = {}
    definitions: dict[str, tuple[str, str, str]] = {}
    for s in sents[1:-1]:
        if g := _GIVEN.match(s):
            env[g.group(1)] = int(g.group(2))
        elif d := _DERIVED.match(s):
            definitions[d.group(1)] = (d.group(2), d.group(3), d.group(4))
    lines = solution.strip().split("\n")
    for line in lines[:-1]:
        st = _STEP.match(line)
        if not st:
            raise CheckFailed(f"unparsable step {line!r}")
        name, left, op, right, left2, a, right2, b, a2, op2, b2, result, name2, result2 = st.groups()
        if definitions.get(name) != (left, op, right):
            raise CheckFailed(f"step {line!r} does not match the question's definition of {name}")
        if (left2, right2, name2) != (left, right, name) or op2 != op:
            raise CheckFailed(f"step {line!r} looks up or states the wrong variables")
        if env.get(left) != int(a) or env.get(right) != int(b) or (a2, b2) != (a, b):
            raise CheckFailed(f"step {line!r} misquotes its operands")
        if _combine(op, int(a), int(b), modulus) != int(result) or result2 != result:
            raise CheckFailed(f"step {line!r} is arithmetically wrong mod {modulus}")
        env[name] = int(result)
    if len(lines) - 1 != len(definitions):
        raise CheckFailed(f"{len(lines) - 1} steps for {len(definitions)} derived variables")
    final = _FINAL.match(lines[-1])
    if not final:
        raise CheckFailed(f"last line {lines[-1]!r} is not '#### <answer>'")
    if int(final.group(1)) != expected:
        raise CheckFailed(f"final answer {final.group(1)} != {expected}")
    return expected
