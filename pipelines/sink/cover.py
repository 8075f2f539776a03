"""Which committed files make up an input file's rows: an exact cover of its row ranges.

Retries and reruns can leave files that overlap (a task retried with its rows cut differently).
The output is consistent when some of the files hold every row of the input exactly once; the
rest then only repeat rows and can be removed. :func:`exact_cover` finds such a subset whenever
one exists (a search over the files that start at the first row not yet covered), not only when
a greedy pass happens to.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

MAX_STEPS = 200_000  # search steps before giving up (the files of one input are few; not reached in practice)


class _GaveUp(Exception):
    """The search ran :data:`MAX_STEPS` steps without deciding."""


def merge_ranges(ranges: Sequence[Sequence[int]]) -> list[list[int]]:
    """``[start, end)`` ranges -> sorted, merged ranges."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def exact_cover(rows: int, files: list[Any]) -> tuple[list[Any], list[Any], Optional[str]]:
    """Files whose ranges hold each of ``rows`` rows exactly once, the redundant rest, and a problem if none do.

    Args:
        rows: Rows of the input file.
        files: Committed files of that input (each with ``ranges`` and ``name``).

    Returns:
        ``(chosen, extra, problem)``. With a cover, ``problem`` is None and every file not chosen
        repeats only rows the chosen ones hold. Without one, ``chosen`` are files that do not
        overlap (for counting), ``extra`` is empty (nothing is removed) and ``problem`` says what
        is wrong.
    """
    files = sorted(files, key=lambda f: (min((a for a, _ in f.ranges), default=0), f.name))
    by_start: dict[int, list[int]] = {}
    for i, f in enumerate(files):
        if f.ranges:
            by_start.setdefault(min(a for a, _ in f.ranges), []).append(i)
    gave_up = False
    try:
        found = _search(rows, files, by_start)
    except _GaveUp:
        found, gave_up = None, True
    if found is not None:
        chosen = [files[i] for i in sorted(found)]
        return chosen, [f for i, f in enumerate(files) if i not in found], None
    union = sum(b - a for a, b in merge_ranges([r for f in files for r in f.ranges if r[1] > r[0]]))
    disjoint: list[Any] = []
    taken: list[list[int]] = []
    for f in files:
        if not any(a < d and c < b for a, b in f.ranges for c, d in taken):
            disjoint.append(f)
            taken += f.ranges
    if union < rows:
        return disjoint, [], f"{rows - union} of its {rows} rows are not in the output"
    if gave_up:
        return disjoint, [], (f"its committed files overlap and the search for a subset holding each row once gave up "
                              f"after {MAX_STEPS:,} steps (none was found, none was ruled out); rerun with overwrite=true")
    return disjoint, [], "its committed files overlap and no subset of them holds each row once; rerun with overwrite=true"


def _search(rows: int, files: list[Any], by_start: dict[int, list[int]]) -> Optional[set[int]]:
    """Depth-first search for files covering ``[0, rows)`` exactly once; None if there is none.

    Raises:
        _GaveUp: After :data:`MAX_STEPS` steps without an answer.

    The common case (files that do not overlap) takes one pass. The search is iterative, so an
    input with thousands of files does not hit Python's recursion limit.
    """
    all_ranges = sorted(r for f in files for r in f.ranges if r[1] > r[0])
    if all(a == (all_ranges[k - 1][1] if k else 0) for k, (a, _) in enumerate(all_ranges)) and (all_ranges[-1][1] if all_ranges else 0) == rows:
        return set(range(len(files)))
    if all(len([r for r in f.ranges if r[1] > r[0]]) == 1 for f in files):
        return _interval_path(rows, files, by_start)
    failed: set[tuple] = set()
    # A frame: (files used, ranges taken, candidates left at the first gap, the state's key).
    stack: list[tuple[list[int], list[list[int]], list[int], tuple]] = []

    def frame(used: list[int], taken: list[list[int]]) -> Optional[tuple]:
        pos = _first_gap(taken)
        if pos >= rows:
            return None
        key = (pos, tuple(sorted((a, b) for a, b in taken if b > pos)))
        return (used, taken, list(by_start.get(pos, [])), key) if key not in failed else (used, taken, [], key)

    start = frame([], [])
    if start is None:
        return set() if rows == 0 else None
    stack.append(start)
    steps = 0
    while stack:
        used, taken, candidates, key = stack[-1]
        if not candidates:
            failed.add(key)
            stack.pop()
            continue
        i = candidates.pop(0)
        steps += 1
        if steps > MAX_STEPS:
            raise _GaveUp()
        ranges = [list(r) for r in files[i].ranges if r[1] > r[0]]
        if i in used or any(r[1] > rows for r in ranges) or any(a < d and c < b for a, b in ranges for c, d in taken):
            continue
        nxt_used, nxt_taken = used + [i], taken + ranges
        nxt = frame(nxt_used, nxt_taken)
        if nxt is None:
            return set(nxt_used)
        stack.append(nxt)
    return None


def _interval_path(rows: int, files: list[Any], by_start: dict[int, list[int]]) -> Optional[set[int]]:
    """Files of one range each: an exact cover is a path of ranges from row 0 to ``rows`` (each row position visited once)."""
    came_from: dict[int, tuple[int, int]] = {}  # position -> (previous position, file)
    stack, seen = [0], {0}
    while stack:
        pos = stack.pop()
        if pos == rows:
            chosen: set[int] = set()
            while pos:
                pos, i = came_from[pos]
                chosen.add(i)
            return chosen
        for i in by_start.get(pos, []):
            end = max(b for a, b in files[i].ranges if b > a)
            if end <= rows and end not in seen:
                seen.add(end)
                came_from[end] = (pos, i)
                stack.append(end)
    return None


def _first_gap(taken: list[list[int]]) -> int:
    pos = 0
    for a, b in merge_ranges(taken):
        if a > pos:
            return pos
        pos = max(pos, b)
    return pos
