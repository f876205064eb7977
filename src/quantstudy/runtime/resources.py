"""Peak memory of one stage, as it ran: sampled process RSS on CPU, allocator peak on CUDA.

ru_maxrss is the peak over the whole process life, so it cannot separate two stages that
ran in one process; a sampling thread can (10 ms resolution: a spike shorter than that
may be missed, which the label says).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil


@dataclass
class PeakMemory:
    bytes: int = 0
    measured: str = ""

    def info(self) -> dict[str, str]:
        return {"measured": self.measured}


class track_peak_memory:
    """`with track_peak_memory(device) as peak: ...` then peak.bytes, peak.measured."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.01):
        self.device, self.interval_s = device, interval_s
        self.peak = PeakMemory()
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.peak.measured = "CUDA allocator peak (torch.cuda.max_memory_allocated)"
            return self.peak
        self.peak.measured = "process RSS peak, sampled every 10 ms (includes Python, libraries, data)"
        proc = psutil.Process()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak.bytes = max(self.peak.bytes, proc.memory_info().rss)
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self.peak

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            import torch

            self.peak.bytes = int(torch.cuda.max_memory_allocated())
            return
        self._stop.set()
        self._thread.join()
        self.peak.bytes = max(self.peak.bytes, psutil.Process().memory_info().rss)
