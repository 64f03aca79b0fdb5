"""One progress display for every long stage: a bar with an ETA on a terminal, periodic lines when piped.

On a terminal (stderr is a TTY) :class:`Progress` is a tqdm bar whose line always shows elapsed time, the
estimated time left and the rate. When stderr is a file or a pipe (CI logs, ``nohup``, ``| tee``) a bar
would print nothing useful, so a stage that runs longer than ``PMOD_PROGRESS_INTERVAL`` seconds (default 30)
writes a plain line at most once per interval while it runs, and a last line with the total time; shorter
stages print nothing::

    finetune: 41/180 steps (23%), 2m01s elapsed, ETA 6m52s, loss=0.4123
    finetune: 83/180 steps (46%), 4m02s elapsed, ETA 4m43s, loss=0.3987
    finetune: done, 180/180 steps in 8m47s

:func:`quiet_library_bars` turns off transformers' and huggingface_hub's own per-file bars ("Loading
weights", "Writing ...") so they do not interleave with ours; the command line does this for every command.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

INTERVAL_ENV = "PMOD_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0  # seconds between plain lines when not on a terminal


def _interval() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m`` (seconds rounded down)."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Progress of one stage of ``total`` units (``None``: unknown total, no ETA).

    ``disable``: show nothing. ``initial``: units already done (a resumed run); the ETA uses only the rate
    of this run. ``stream``: where to write (default ``sys.stderr``, read at construction). ``interval``:
    seconds between plain lines when ``stream`` is not a TTY (default ``PMOD_PROGRESS_INTERVAL`` or 30).
    ``leave``: keep the finished bar on a terminal. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *, initial: int = 0,
                 disable: bool = False, stream: TextIO | None = None, interval: float | None = None,
                 leave: bool = False) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.disable = disable
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self._initial = initial
        self._postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._closed = False
        self._printed = False
        self._bar = None
        if disable:
            return
        if _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=leave,
                             dynamic_ncols=True,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
                             if total else None)
        # Not a terminal: nothing until the stage has run ``interval`` seconds (short stages stay silent).

    # ---- updates ---------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.disable:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._printed = True
                self._write(self._line())

    def set_postfix(self, **values: Any) -> None:
        """Short ``key=value`` figures shown after the counts (loss, accuracy, ...)."""
        self._postfix = {k: v for k, v in values.items() if v is not None}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif not self.disable and (self._printed or time.monotonic() - self._start >= self.interval):
            elapsed = format_seconds(time.monotonic() - self._start)
            total = f"/{self.total}" if self.total is not None else ""
            self._write(f"{self.desc}: done, {self.n}{total} {self.unit}s in {elapsed}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- plain lines -----------------------------------------------------------------------------
    def eta_seconds(self) -> float | None:
        """Seconds left at this run's rate so far, or None (unknown total or nothing done yet)."""
        done = self.n - self._initial
        if self.total is None or done <= 0:
            return None
        return (time.monotonic() - self._start) / done * max(self.total - self.n, 0)

    def _line(self) -> str:
        parts = [f"{self.n}/{self.total} {self.unit}s" if self.total is not None else f"{self.n} {self.unit}s"]
        if self.total and self.n > self._initial:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
            parts.append(f"{format_seconds(time.monotonic() - self._start)} elapsed")
            parts.append(f"ETA {format_seconds(self.eta_seconds() or 0)}")
        elif self.n > self._initial:
            parts.append(f"{format_seconds(time.monotonic() - self._start)} elapsed")
        if self._postfix:
            parts.append(", ".join(f"{k}={v}" for k, v in self._postfix.items()))
        return f"{self.desc}: " + ", ".join(parts)

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not stop the work
            self.disable = True


def progress_iter(iterable: Iterable[Any], desc: str = "", unit: str = "it", *, total: int | None = None,
                  disable: bool = False) -> Iterator[Any]:
    """Iterate over ``iterable`` while showing a :class:`Progress` (``total`` defaults to ``len(iterable)``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total=total, desc=desc, unit=unit, disable=disable) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, leave: bool = False, initial: int = 0, dynamic_ncols: bool = True) -> Any:
    """tqdm's calling convention over :class:`Progress`: with ``iterable``, an iterator over it with a
    display; without, a :class:`Progress` of ``total`` units (``update``, ``set_postfix``,
    ``set_description``, ``close``). ``dynamic_ncols`` is accepted for tqdm compatibility (always on)."""
    if iterable is None:
        return Progress(total=total, desc=desc, unit=unit, disable=disable, leave=leave, initial=initial)
    return progress_iter(iterable, desc=desc, unit=unit, total=total, disable=disable)


@contextlib.contextmanager
def quiet_library_bars() -> Iterator[None]:
    """Turn off transformers' and huggingface_hub's own progress bars inside the block (restored after)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# Known library notices that say nothing a user can act on, each matched exactly (logger, message start).
QUIETED = (
    # bitsandbytes >= 0.49 on CPUs with AVX512-BF16, at import (peft imports bitsandbytes whenever it is
    # installed, so every finetune printed it): the optional `kernels` package is absent and bitsandbytes
    # uses its own CPU 4-bit kernel instead.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropMessage:
    """A logging filter that drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record: Any) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_noise() -> None:
    """Drop the :data:`QUIETED` library log records (and only those); safe to call more than once, before or
    after the libraries are imported."""
    import logging

    for name, prefix in QUIETED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
