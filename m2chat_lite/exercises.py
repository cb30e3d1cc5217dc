"""Self-checks for the notebooks' exercises.

Every notebook ends with exercises; each one is a cell where the student writes an answer (``None``
until they do) followed by ``check(...)``. An unanswered exercise prints a nudge instead of failing, so
the notebook still runs top to bottom (and under the test suite); a wrong answer prints the hint.
"""

from __future__ import annotations

from typing import Any, Callable


def check(name: str, answer: Any, test: Callable[[Any], bool], hint: str) -> bool | None:
    """Print whether ``answer`` passes ``test``: True (right), False (wrong, with the hint), None (not tried)."""
    if answer is None:
        print(f"○ {name}: not answered yet; replace the None above with your answer.")
        return None
    try:
        ok = bool(test(answer))
    except Exception as error:  # a malformed answer is a wrong answer, with the reason
        print(f"✗ {name}: checking your answer raised {type(error).__name__}: {error}. Hint: {hint}")
        return False
    print(f"✓ {name}: correct!" if ok else f"✗ {name}: not quite. Hint: {hint}")
    return ok
