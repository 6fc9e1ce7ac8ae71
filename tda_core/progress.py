"""A tiny progress protocol shared by the CLI (tqdm) and the app (st.progress)."""
from __future__ import annotations

from collections.abc import Callable

# progress(done, total, label): called as work advances; None means silent.
Progress = Callable[[int, int, str], None]


def tqdm_progress() -> Progress:
    """A Progress that draws tqdm bars, one per label."""
    from tqdm.auto import tqdm

    bars: dict[str, tqdm] = {}

    def update(done: int, total: int, label: str) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = bars[label] = tqdm(total=total, desc=label, leave=False)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def report(progress: Progress | None, done: int, total: int, label: str) -> None:
    """Call `progress` if given."""
    if progress is not None:
        progress(done, total, label)
