"""Exception groups from trio nurseries: the one error worth reporting."""

from __future__ import annotations

from collections.abc import Sequence

import trio

__all__ = ["first_error", "leaf_errors"]


def leaf_errors(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every non-group exception inside ``group``, depth first, in order."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    return leaves


def first_error(
    group: BaseExceptionGroup[BaseException],
    prefer: Sequence[type[BaseException]] = (),
) -> BaseException:
    """The first leaf of a preferred type (in ``prefer`` order), else the first that is not
    ``trio.Cancelled`` (a failed task cancels its siblings: their Cancelled is not the story),
    else the first leaf."""
    leaves = leaf_errors(group)
    for kind in prefer:
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return leaves[0]
