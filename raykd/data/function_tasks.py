"""Generated function tasks with exact tests: small problems for execution rewards (offline).

Each problem comes from a **family** (add a constant, count a character, keep the even
numbers, ...) instantiated with random constants, a function name and random inputs. The
family supplies a reference implementation; the parent runs that reference (trusted code of
this module, in-process) on the inputs to get the expected outputs, so the tests are exact and
unlimited in number::

    prompt     Write a Python function `add_7(x)` that: returns x plus 7.
    reference  def add_7(x):
                   return x + 7
    tests      ["assert add_7(3) == 10", "assert add_7(-5) == 2", ...]

``meta``: ``family``, ``name``/``entry_point`` (the function), ``tests`` (assert strings, see
:mod:`raykd.evaluate.execution`), ``format: "code"``. The prompt mirrors the ``stdlib_code``
task's (``Write a Python function `sig` that: ...``), so a student distilled on that task
already answers in the expected form (the bare function).

:func:`generate_function_tasks` is deterministic for a given ``seed``. Splits:
``function_tasks`` holds out a share of the *problems* (new constants, names and inputs of
families also seen in training); ``function_tasks_by_family`` holds out whole *families*
(``stable_fraction(family)``), a harder generalisation test.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from raykd.data.records import TaskRecord
from raykd.data.split import check_fraction, split_by_uid, stable_fraction

Family = Callable[[random.Random], tuple[str, str, str, str, list[tuple]]]
#: family(rng) -> (name, parameters, what it returns, body, argument tuples of the tests)

_WORDS = ("apple", "banana", "level", "raykd", "python", "kayak", "sandbox", "tree", "noon",
          "reward", "stats", "hello", "world", "abc", "racecar", "data", "model", "token")  # fmt: skip


def _ints(rng: random.Random, n: int = 5, lo: int = -20, hi: int = 20) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _lists(rng: random.Random, n: int = 5, lo: int = -9, hi: int = 9) -> list[tuple]:
    return [([rng.randint(lo, hi) for _ in range(rng.randint(1, 6))],) for _ in range(n)]


def _strs(rng: random.Random, n: int = 5) -> list[tuple]:
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append((rng.choice(_WORDS),))
        else:
            out.append(("".join(rng.choice("abcdeio") for _ in range(rng.randint(1, 8))),))
    return out


def _f_add(rng):
    c = rng.randint(2, 99)
    return f"add_{c}", "x", f"returns x plus {c}", f"return x + {c}", [(v,) for v in _ints(rng)]


def _f_sub(rng):
    c = rng.randint(2, 99)
    return (f"minus_{c}", "x", f"returns x minus {c}", f"return x - {c}",
            [(v,) for v in _ints(rng)])  # fmt: skip


def _f_mul(rng):
    c = rng.randint(2, 20)
    return (f"times_{c}", "x", f"returns x multiplied by {c}", f"return x * {c}",
            [(v,) for v in _ints(rng)])  # fmt: skip


def _f_power(rng):
    p = rng.randint(2, 5)
    return (f"power_{p}", "x", f"returns x raised to the power {p}", f"return x ** {p}",
            [(v,) for v in _ints(rng, lo=-6, hi=6)])  # fmt: skip


def _f_affine(rng):
    a, b = rng.randint(2, 9), rng.randint(1, 20)
    return (f"line_{a}_{b}", "x", f"returns {a} times x plus {b}", f"return {a} * x + {b}",
            [(v,) for v in _ints(rng)])  # fmt: skip


def _f_divisible(rng):
    c = rng.randint(2, 12)
    return (f"divisible_by_{c}", "n", f"returns True if n is divisible by {c}, else False",
            f"return n % {c} == 0", [(v,) for v in _ints(rng, 8, 0, 60)])  # fmt: skip


def _f_clamp(rng):
    lo = rng.randint(-10, 0)
    hi = lo + rng.randint(max(3, 1 - lo), 15)  # hi >= 1: a valid name
    return (f"clamp_{abs(lo)}_{hi}", "x", f"returns x limited to the range {lo} to {hi}",
            f"return max({lo}, min({hi}, x))", [(v,) for v in _ints(rng, 6, -30, 30)])  # fmt: skip


def _f_sum_list(rng):
    name = rng.choice(["sum_list", "total", "list_sum", "add_all"])
    return (
        name,
        "numbers",
        "returns the sum of the numbers in the list",
        "return sum(numbers)",
        _lists(rng),
    )


def _f_count_greater(rng):
    c = rng.randint(-3, 6)
    return (f"count_above_{abs(c)}" if c >= 0 else f"count_above_minus_{-c}", "numbers",
            f"returns how many numbers in the list are greater than {c}",
            f"return sum(1 for n in numbers if n > {c})", _lists(rng))  # fmt: skip


def _f_evens(rng):
    odd = rng.random() < 0.5
    kind = "odd" if odd else "even"
    return (f"keep_{kind}", "numbers", f"returns a list of the {kind} numbers in the list, in "
            "order", f"return [n for n in numbers if n % 2 == {int(odd)}]", _lists(rng))  # fmt: skip


def _f_extreme(rng):
    big = rng.random() < 0.5
    word, fn = ("largest", "max") if big else ("smallest", "min")
    name = rng.choice([f"{word}", f"{fn}_of", f"find_{word}"])
    return (
        name,
        "numbers",
        f"returns the {word} number in a non-empty list",
        f"return {fn}(numbers)",
        _lists(rng),
    )


def _f_scale(rng):
    c = rng.randint(2, 12)
    return (f"scale_by_{c}", "numbers", f"returns a new list with every number multiplied by {c}",
            f"return [n * {c} for n in numbers]", _lists(rng))  # fmt: skip


def _f_reverse(rng):
    name = rng.choice(["reverse", "reverse_string", "backwards", "flip"])
    return name, "s", "returns the string s reversed", "return s[::-1]", _strs(rng)


def _f_count_char(rng):
    ch = rng.choice("abcdeio")
    return (f"count_{ch}", "s", f"returns how many times the letter '{ch}' appears in s",
            f"return s.count({ch!r})", _strs(rng))  # fmt: skip


def _f_repeat(rng):
    c = rng.randint(2, 6)
    return (f"repeat_{c}", "s", f"returns the string s repeated {c} times", f"return s * {c}",
            _strs(rng))  # fmt: skip


def _f_case(rng):
    up = rng.random() < 0.5
    word, m = ("upper", "upper") if up else ("lower", "lower")
    return (f"to_{word}", "s", f"returns s with every letter in {word} case",
            f"return s.{m}()", [(w.upper() if i % 2 else w,) for i, (w,) in
                                enumerate(_strs(rng))])  # fmt: skip


def _f_vowels(rng):
    name = rng.choice(["count_vowels", "vowel_count", "num_vowels"])
    return (name, "s", "returns the number of vowels (a, e, i, o, u) in the lowercase string s",
            "return sum(1 for c in s if c in 'aeiou')", _strs(rng))  # fmt: skip


def _f_first_n(rng):
    c = rng.randint(1, 4)
    return (f"first_{c}", "items", f"returns a list of the first {c} elements of the list "
            f"(all of them if it is shorter)", f"return items[:{c}]", _lists(rng))  # fmt: skip


def _f_last(rng):
    name = rng.choice(["last", "last_item", "final_element"])
    return (
        name,
        "items",
        "returns the last element of a non-empty list",
        "return items[-1]",
        _lists(rng),
    )


def _f_factorial(rng):
    name = rng.choice(["factorial", "fact"])
    body = "result = 1\nfor i in range(2, n + 1):\n    result *= i\nreturn result"
    return (
        name,
        "n",
        "returns n factorial (n! for n >= 0)",
        body,
        [(v,) for v in rng.sample(range(0, 11), 5)],
    )


def _f_triangle(rng):
    name = rng.choice(["sum_to", "sum_up_to", "triangle"])
    return (name, "n", "returns the sum of the integers from 1 to n (0 if n < 1)",
            "return sum(range(1, n + 1))", [(v,) for v in _ints(rng, 5, -2, 40)])  # fmt: skip


def _f_digit_sum(rng):
    name = rng.choice(["digit_sum", "sum_of_digits"])
    return (name, "n", "returns the sum of the decimal digits of the non-negative integer n",
            "return sum(int(d) for d in str(n))", [(v,) for v in _ints(rng, 5, 0, 99999)])  # fmt: skip


def _f_palindrome(rng):
    name = rng.choice(["is_palindrome", "palindrome"])
    return (name, "s", "returns True if the string s reads the same backwards, else False",
            "return s == s[::-1]", _strs(rng, 6))  # fmt: skip


def _f_length(rng):
    name = rng.choice(["length", "string_length", "count_chars"])
    return name, "s", "returns the number of characters in s", "return len(s)", _strs(rng)


def _f_replace(rng):
    a, b = rng.sample("aeiox", 2)
    return (f"replace_{a}_with_{b}", "s", f"returns s with every '{a}' replaced by '{b}'",
            f"return s.replace({a!r}, {b!r})", _strs(rng))  # fmt: skip


def _f_max2(rng):
    big = rng.random() < 0.5
    word, fn = ("larger", "max") if big else ("smaller", "min")
    return (f"{word}_of_two", "a, b", f"returns the {word} of the numbers a and b",
            f"return {fn}(a, b)", [tuple(_ints(rng, 2)) for _ in range(5)])  # fmt: skip


def _f_absdiff(rng):
    name = rng.choice(["abs_diff", "distance", "absolute_difference"])
    return (name, "a, b", "returns the absolute difference between a and b",
            "return abs(a - b)", [tuple(_ints(rng, 2)) for _ in range(5)])  # fmt: skip


def _f_words(rng):
    name = rng.choice(["count_words", "word_count"])
    inputs = [(" ".join(rng.sample(_WORDS, rng.randint(1, 5))),) for _ in range(5)]
    return (
        name,
        "text",
        "returns the number of words in text (separated by spaces)",
        "return len(text.split())",
        inputs,
    )


def _f_join(rng):
    sep = rng.choice(["-", ",", " ", "+", "/"])
    label = {"-": "dashes", ",": "commas", " ": "spaces", "+": "plus signs", "/": "slashes"}[sep]
    inputs = [(rng.sample(_WORDS, rng.randint(1, 4)),) for _ in range(5)]
    return (f"join_with_{label.replace(' ', '_')}", "words",
            f"returns the strings in the list joined with {label} between them",
            f"return {sep!r}.join(words)", inputs)  # fmt: skip


def _f_prefix(rng):
    p = "".join(rng.choice(string.ascii_lowercase[:6]) for _ in range(rng.randint(1, 2)))
    words = [w for (w,) in _strs(rng, 6)]
    inputs = [(p + w if i % 2 else w,) for i, w in enumerate(words)]
    return (f"starts_with_{p}", "s", f"returns True if s starts with '{p}', else False",
            f"return s.startswith({p!r})", inputs)  # fmt: skip


def _f_mod(rng):
    c = rng.randint(2, 20)
    return (f"mod_{c}", "n", f"returns the remainder of n divided by {c}", f"return n % {c}",
            [(v,) for v in _ints(rng, 5, 0, 200)])  # fmt: skip


def _f_floordiv(rng):
    c = rng.randint(2, 20)
    return (f"div_{c}", "n", f"returns n divided by {c}, rounded down to an integer",
            f"return n // {c}", [(v,) for v in _ints(rng, 5, 0, 200)])  # fmt: skip


def _f_greater(rng):
    c = rng.randint(0, 50)
    return (f"above_{c}", "x", f"returns True if x is greater than {c}, else False",
            f"return x > {c}", [(v,) for v in [*_ints(rng, 4, c - 10, c + 10), c]])  # fmt: skip


def _f_count_equal(rng):
    c = rng.randint(0, 9)
    inputs = [([rng.choice([c, c, rng.randint(0, 9)]) for _ in range(rng.randint(1, 7))],)
              for _ in range(5)]  # fmt: skip
    return (f"count_{c}s", "numbers", f"returns how many times the number {c} appears in the "
            "list", f"return numbers.count({c})", inputs)  # fmt: skip


def _f_contains(rng):
    c = rng.randint(0, 9)
    inputs = [([rng.randint(0, 9) for _ in range(rng.randint(1, 5))],) for _ in range(6)]
    return (f"has_{c}", "numbers", f"returns True if the list contains the number {c}, else "
            "False", f"return {c} in numbers", inputs)  # fmt: skip


def _f_append(rng):
    c = rng.randint(0, 20)
    return (f"append_{c}", "items", f"returns a new list: the list with {c} added at the end",
            f"return items + [{c}]", _lists(rng))  # fmt: skip


def _f_remove(rng):
    c = rng.randint(0, 5)
    inputs = [([rng.randint(0, 5) for _ in range(rng.randint(1, 7))],) for _ in range(5)]
    return (f"remove_{c}s", "numbers", f"returns a new list without any occurrence of {c}",
            f"return [n for n in numbers if n != {c}]", inputs)  # fmt: skip


def _f_truncate(rng):
    c = rng.randint(1, 6)
    return (f"first_{c}_chars", "s", f"returns the first {c} characters of s (all of s if it "
            "is shorter)", f"return s[:{c}]", _strs(rng))  # fmt: skip


def _f_shift(rng):
    c = rng.randint(1, 30)
    return (f"shift_by_{c}", "numbers", f"returns a new list with {c} added to every number",
            f"return [n + {c} for n in numbers]", _lists(rng))  # fmt: skip


def _f_last_n(rng):
    c = rng.randint(1, 4)
    return (f"last_{c}", "items", f"returns a list of the last {c} elements of the list (all "
            "of them if it is shorter)", f"return items[-{c}:]", _lists(rng))  # fmt: skip


def _f_multiples(rng):
    c = rng.randint(2, 9)
    return (f"multiples_of_{c}", "numbers", f"returns a list of the numbers in the list that "
            f"are divisible by {c}, in order", f"return [n for n in numbers if n % {c} == 0]",
            _lists(rng, hi=30, lo=0))  # fmt: skip


def _f_sign(rng):
    name = rng.choice(["sign", "signum"])
    body = "if x > 0:\n    return 1\nif x < 0:\n    return -1\nreturn 0"
    return (
        name,
        "x",
        "returns 1 if x is positive, -1 if it is negative and 0 if it is zero",
        body,
        [(v,) for v in [*_ints(rng, 4), 0]],
    )


FAMILIES: dict[str, Family] = {
    f.__name__[3:]: f
    for f in (_f_add, _f_sub, _f_mul, _f_power, _f_affine, _f_divisible, _f_clamp, _f_sum_list,
              _f_count_greater, _f_evens, _f_extreme, _f_scale, _f_reverse, _f_count_char,
              _f_repeat, _f_case, _f_vowels, _f_first_n, _f_last, _f_factorial, _f_triangle,
              _f_digit_sum, _f_palindrome, _f_length, _f_replace, _f_max2, _f_absdiff,
              _f_words, _f_join, _f_prefix, _f_sign, _f_mod, _f_floordiv, _f_greater,
              _f_count_equal, _f_contains, _f_append, _f_remove, _f_truncate, _f_shift,
              _f_last_n, _f_multiples)
}  # fmt: skip


def _reference(name: str, params: str, body: str) -> str:
    return f"def {name}({params}):\n" + "\n".join("    " + line for line in body.splitlines())


def _call(name: str, args: tuple) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


def generate_function_tasks(per_family: int = 40, seed: int = 0) -> list[TaskRecord]:
    """Up to ``per_family`` problems of every family (fewer where the family has fewer
    distinct instances: problems with the same prompt are kept once); deterministic in
    ``seed``. Expected outputs come from running each reference in this process."""
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}")
    records: list[TaskRecord] = []
    seen: set[str] = set()
    for fam, make in FAMILIES.items():
        rng = random.Random(f"{seed}/{fam}")
        for _ in range(per_family):
            name, params, summary, body, inputs = make(rng)
            prompt = f"Write a Python function `{name}({params})` that: {summary}."
            if prompt in seen:
                continue
            seen.add(prompt)
            reference = _reference(name, params, body)
            namespace: dict = {}
            exec(compile(reference, f"<reference {fam}>", "exec"), namespace)  # our own code
            fn = namespace[name]
            tests, calls = [], set()
            for args in inputs:
                call = _call(name, args)
                if call not in calls:
                    calls.add(call)
                    tests.append(f"assert {call} == {fn(*args)!r}")
            records.append(TaskRecord(
                uid=f"fn/{fam}/{name}", prompt=prompt, reference=reference,
                meta={"family": fam, "name": name, "entry_point": name, "tests": tests,
                      "format": "code"},
            ))  # fmt: skip
    return records


def split_function_tasks(
    records: list[TaskRecord], eval_fraction: float, seed: int, by_family: bool = False
) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """Problems held out by uid, or (``by_family``) whole families, the lowest
    ``stable_fraction(family, seed)`` ones until their problems reach ``eval_fraction``."""
    check_fraction(eval_fraction)
    if not by_family:
        return split_by_uid(records, eval_fraction, seed)
    families = sorted({r.meta["family"] for r in records}, key=lambda f: stable_fraction(f, seed))
    held: set[str] = set()
    for fam in families:
        if sum(r.meta["family"] in held for r in records) >= eval_fraction * len(records):
            break
        held.add(fam)
    return ([r for r in records if r.meta["family"] not in held],
            [r for r in records if r.meta["family"] in held])  # fmt: skip
