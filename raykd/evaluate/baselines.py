"""Answers that need no model, as floors for the scores of code tasks.

**The signature stub** (:func:`stub_answer`): the function the prompt asks for, with its
signature repeated and a body of ``pass``::

    def name(args):
        pass

It is always valid code that stops cleanly, shares the signature's tokens with the reference
(Rouge-L of 30-40 on short functions) and passes no test, so a model's parse rate, clean-stop
rate and Rouge-L mean something only where they beat it. The signature comes from the prompt's
first backticked ``name(args)`` (stdlib / site-packages functions, generated function tasks),
else from the ``def`` line of ``meta["entry_point"]`` in ``meta["setup"]`` (HumanEval), else
``name()`` from ``meta["name"]``.
"""

from __future__ import annotations

import re

from raykd.batch import Example

_SIGNATURE_RE = re.compile(r"`([A-Za-z_]\w*\(.*?\)(?:\s*->\s*[^`]+)?)`", re.DOTALL)
_DEF_RE = r"^[ \t]*(?:async[ \t]+)?def[ \t]+{name}[ \t]*\((.*?)\)[ \t]*(->[^:]+)?:"


def stub_answer(example: Example) -> str:
    """``def <signature>:\\n    pass`` for the function ``example`` asks for."""
    name = example.meta.get("entry_point") or example.meta.get("name")
    match = _SIGNATURE_RE.search(example.prompt_text)
    if match and (name is None or match.group(1).startswith(f"{name}(")):
        return f"def {match.group(1).strip()}:\n    pass"
    setup = example.meta.get("setup") or ""
    if name and setup:
        found = re.search(_DEF_RE.format(name=re.escape(name)), setup, re.MULTILINE | re.DOTALL)
        if found:
            returns = f" {found.group(2).strip()}" if found.group(2) else ""
            return f"def {name}({found.group(1)}){returns}:\n    pass"
    return f"def {name or 'solution'}():\n    pass"


def stub_answers(examples: list[Example]) -> list[str]:
    return [stub_answer(ex) for ex in examples]
