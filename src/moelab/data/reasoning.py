"""Multi-step modular arithmetic word problems in GSM8K format.

A problem defines a few *given* variables (constants in ``[0, modulus)``) and ``n_ops`` *derived*
variables, each ``x = y <op> z`` over earlier variables, then asks for the last derived variable.
The dependency graph is a random DAG in which every variable is an ancestor of the asked one, so
all ``n_ops`` operations are needed: *difficulty = number of operations*. All arithmetic is mod
``modulus`` (results in ``[0, modulus)``).

Rendering (one document)::

    Question: Work modulo 23. Let q = 5. Let f = 17. Let k = q + f. Let z = k * q. What is z?
    Answer: k = q + f, q = 5, f = 17, 5 + 17 = 22, k = 22.
    z = k * q, k = 22, q = 5, 22 * 5 = 18, z = 18.
    #### 18

Each solution step restates the definition, looks every operand up as ``name = value`` -- the same
pattern as the ``Let name = value.`` that defined it, so a lookup is a copy of what followed
``name =`` earlier in the context -- computes, and states the result as ``name = value`` for later
steps to look up. (Writing ``k = q + f = 5 + 17 = 22`` instead, the values sit 8 tokens after their
names: small models then learn this long-range lookup only after a late and seed-dependent phase
change, and stay at chance on reasoning for thousands of steps.)

The eval prompt is everything up to and including ``"Answer:"``; the reference solution is the rest
(starting with a space); the answer is the text after ``"#### "``.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass

VAR_NAMES = string.ascii_lowercase
MAX_OPS = 12  # 2*MAX_OPS + 1 variable names must fit in VAR_NAMES
OPERATIONS = ("+", "-", "*")


@dataclass(frozen=True)
class Problem:
    """Structured problem: ``givens`` are ``(name, value)``; ``steps`` are ``(name, left, op, right)``."""

    modulus: int
    givens: tuple[tuple[str, int], ...]
    steps: tuple[tuple[str, str, str, str], ...]

    @property
    def difficulty(self) -> int:
        return len(self.steps)

    @property
    def target(self) -> str:
        return self.steps[-1][0]


def _apply(op: str, a: int, b: int, modulus: int) -> int:
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    if op == "*":
        return (a * b) % modulus
    raise ValueError(f"unknown operation {op!r}")


def values(problem: Problem) -> dict[str, int]:
    """Value of every variable, computed from the structured form."""
    env = dict(problem.givens)
    for name, left, op, right in problem.steps:
        env[name] = _apply(op, env[left], env[right], problem.modulus)
    return env


def answer(problem: Problem) -> int:
    return values(problem)[problem.target]


def draw_problem(rng: random.Random, n_ops: int, modulus: int, operations: tuple[str, ...] = OPERATIONS) -> Problem:
    """Draw a problem with exactly ``n_ops`` operations, all of which the answer depends on.

    Operands prefer not-yet-used variables; drafts that leave a variable unused are rejected and
    redrawn (consuming ``rng`` deterministically).
    """
    if not 1 <= n_ops <= MAX_OPS:
        raise ValueError(f"n_ops={n_ops} outside [1, {MAX_OPS}]")
    while True:
        n_givens = rng.randint(2, min(n_ops + 1, 4))
        names = rng.sample(VAR_NAMES, n_givens + n_ops)
        givens = tuple((names[i], rng.randrange(modulus)) for i in range(n_givens))
        defined = [g for g, _ in givens]
        unused = list(defined)
        steps = []
        for i in range(n_ops):
            left = rng.choice(unused) if unused else rng.choice(defined)
            rest = [v for v in unused if v != left]
            right = rng.choice(rest) if rest and rng.random() < 0.7 else rng.choice(defined)
            if rng.random() < 0.5:
                left, right = right, left
            name = names[n_givens + i]
            steps.append((name, left, rng.choice(operations), right))
            unused = [v for v in unused if v not in (left, right)] + [name]
            defined.append(name)
        if unused == [steps[-1][0]]:
            return Problem(modulus, givens, tuple(steps))


def question_text(p: Problem) -> str:
    """The problem statement (no ``Question:`` prefix)."""
    parts = [f"Work modulo {p.modulus}."]
    parts += [f"Let {name} = {value}." for name, value in p.givens]
    parts += [f"Let {name} = {left} {op} {right}." for name, left, op, right in p.steps]
    parts.append(f"What is {p.target}?")
    return " ".join(parts)


def solution_text(p: Problem) -> str:
    """Step-by-step solution followed by ``\\n#### <answer>``; begins with a space (it follows ``Answer:``)."""
    env = values(p)
    lines = [
        f"{n} = {l} {op} {r}, {l} = {env[l]}, {r} = {env[r]}, {env[l]} {op} {env[r]} = {env[n]}, {n} = {env[n]}."
        for n, l, op, r in p.steps
    ]
    return " " + "\n".join(lines) + f"\n#### {env[p.target]}"


def prompt_text(p: Problem) -> str:
    return f"Question: {question_text(p)}\nAnswer:"


def document(p: Problem) -> str:
    """The full training document: prompt followed by solution."""
    return prompt_text(p) + solution_text(p)


def problem_hash(question: str) -> str:
    """sha256 of the canonical question text (whitespace runs collapsed to one space, stripped)."""
    return hashlib.sha256(" ".join(question.split()).encode("utf-8")).hexdigest()
