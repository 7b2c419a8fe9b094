"""The one progress bar of the library (tqdm), for every long job: save, convert, validate,
from_dask, the command line."""

from __future__ import annotations

from typing import Any


class Bar:
    """A tqdm bar, a caller's own bar, or nothing; :meth:`close` closes only its own."""

    def __init__(self, bar: Any = None, owned: bool = False) -> None:
        self._bar, self._owned = bar, owned

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._owned and self._bar is not None:
            self._bar.close()
        self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_bar(progress: Any, total: int | None, desc: str, unit: str = "rows") -> Bar:
    """A bar for ``progress``: ``False`` none, ``None`` on a terminal only, ``True`` always,
    or any object with ``update``/``close`` (a caller's bar, used and left open)."""
    if progress is False:
        return Bar()
    if progress is not None and progress is not True:
        return Bar(progress) if hasattr(progress, "update") else Bar()
    from tqdm.auto import tqdm

    return Bar(tqdm(total=total, desc=desc, unit=unit, unit_scale=True,
                    disable=None if progress is None else False), owned=True)
