"""Measure a block of code's peak resident memory above where it started."""

from __future__ import annotations

import threading

import psutil


class PeakMemory:
    """Context manager: samples this process's RSS every `interval` seconds in a thread.
    `peak_bytes` is the highest RSS seen minus the RSS at entry."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._process = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self._start = self._highest = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._highest = max(self._highest, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._highest = max(self._highest, self._process.memory_info().rss)
        self.peak_bytes = self._highest - self._start
