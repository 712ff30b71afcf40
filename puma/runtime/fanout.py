"""Call every party at once, wait for all, fail fast and name the party: the one fan-out all
meshes use (``sim`` threads, ``nodes`` control connections, ``ray`` actor calls)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from puma.errors import PumaError


def first_line(err: BaseException) -> str:
    """The first meaningful line of an error (SPU's messages carry a stack trace after it)."""
    text = str(err).strip() or type(err).__name__
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Stacktrace"):
            break
        if line and line != "what:":
            return line[:300]
    return text[:300]


def fan_out(
    calls: list[Callable[[], Any]],
    who: list[str],
    what: str,
    timeout: float | None = None,
    explain: Callable[[BaseException], str] | None = None,
    fail_fast: bool = True,
    timeout_hint: str | None = None,
) -> list:
    """Run ``calls[i]`` for every party i in a thread of its own; their results, in order.

    A call that raises :class:`PumaError` has named its own failure, which is raised as it is;
    any other error becomes ``PumaError("<who[i]> <explain(err)>")`` (default: "failed to
    <what>: <its first line>"). With ``fail_fast`` the first failure ends the wait (the other
    calls finish in their threads); otherwise every call is waited for and the first failure
    raised. With ``timeout`` (seconds), the parties that have not answered by then are named,
    followed by ``timeout_hint`` (what to check) when given.
    """
    explain = explain or (lambda err: f"failed to {what}: {first_line(err)}")
    count = len(calls)
    results: list = [None] * count
    failures: list[tuple[int, BaseException]] = []
    finished = [False] * count
    done = threading.Condition()

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as err:  # reported to the caller below
            failures.append((i, err))
        with done:
            finished[i] = True
            done.notify_all()

    for i in range(count):
        threading.Thread(target=run, args=(i,), name=f"fan-out-{i}", daemon=True).start()
    deadline = None if timeout is None else time.monotonic() + timeout
    with done:
        while not all(finished) and not (fail_fast and failures):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                slow = ", ".join(who[i] for i in range(count) if not finished[i])
                hint = f": {timeout_hint}" if timeout_hint else ""
                raise PumaError(f"{slow} did not {what} within {timeout:.0f} s{hint}")
            done.wait(1.0 if left is None else min(left, 1.0))
    if failures:
        i, err = failures[0]  # the first failure seen; later ones are usually its fallout
        if isinstance(err, PumaError):
            raise err
        raise PumaError(f"{who[i]} {explain(err)}") from err
    return results
