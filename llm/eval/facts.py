"""Model facts for the comparison table: parameters, bytes in memory and on disk, decoding speed, peak memory.

Peak memory is measured, not estimated. On CUDA it is `torch.cuda.max_memory_allocated` above what was
allocated when the block began. On CPU it is the process's resident-set high-water mark above the RSS
when the block began: Linux resets the mark on request (`/proc/self/clear_refs`, value 5), which catches
a peak however brief; where that is unavailable a thread samples RSS every millisecond instead. Memory a
block frees and re-uses from the allocator's cache shows as no growth, which is what a process needs.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from llm.eval.generate import greedy_generate
from llm.eval.loss import model_device


def _packed_tensors(model: Any) -> list[Any]:
    """Weights and biases that quantized modules keep packed outside `parameters()` (torch.ao dynamic int8
    Linear holds them in `_packed_params`)."""
    out = []
    for m in model.modules():
        if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):
            bias = m.bias() if callable(getattr(m, "bias", None)) else None
            out += [t for t in (m.weight(), bias) if t is not None]
    return out


def param_count(model: Any) -> int:
    """Parameters of a model, tied weights counted once, packed quantized weights included."""
    dense = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return dense + sum(t.numel() for t in _packed_tensors(model))


def weights_bytes(model: Any) -> int:
    """Bytes the model's parameters and buffers take in memory, tied weights counted once, packed quantized
    weights at their own width."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    dense = sum(t.numel() * t.element_size() for t in tensors.values())
    return dense + sum(t.numel() * t.element_size() for t in _packed_tensors(model))


def dir_bytes(path: str | Path) -> int:
    """Total size of the files under a directory (what copying the model costs)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


class PeakMemory:
    """Context manager measuring peak memory growth of the block it wraps: `bytes` after it exits.

    Args:
        device: the torch device the work runs on (`cuda...` measures the GPU, anything else the process).
    """

    def __init__(self, device: Any = "cpu") -> None:
        self.cuda = str(device).startswith("cuda")
        self.device = device
        self.bytes = 0
        self._start = 0
        self._hwm = False
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss()
        self._hwm = self._reset_hwm()
        if not self._hwm:
            self._peak = self._start
            self._thread = threading.Thread(target=self._sample, name="llmray-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm:
            peak = (_status_kb("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._peak, _rss())
        self.bytes = max(peak - self._start, 0)

    @staticmethod
    def _reset_hwm() -> bool:
        """Reset the kernel's RSS high-water mark to the current RSS; False where that is not possible."""
        if _status_kb("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _rss())


def _sync(device: Any) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def tokens_per_second(model: Any, prompt: list[int], batch: int, new_tokens: int, pad: int,
                      repeats: int = 3) -> float:
    """Greedy decoding throughput: `batch` copies of one prompt, exactly `new_tokens` each, after a warm-up.

    Stopping is disabled so every model generates the same number of tokens, and one prompt repeated
    means no padding: the figure is decoding speed, not the luck of where a model stops. The fastest of
    `repeats` timed runs is kept (as `timeit` does): on a shared machine the slower runs measure the
    neighbours, and the first model of a process would otherwise pay for start-up work the next ones skip.

    Returns:
        Generated tokens (batch x new_tokens) per second of wall time.
    """
    prompts = [list(prompt)] * batch
    device = model_device(model)
    best = math.inf
    for run in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        greedy_generate(model, prompts, new_tokens, pad=pad, batch_size=batch, min_new_tokens=new_tokens)
        _sync(device)
        if run:  # run 0 is the warm-up: kernels chosen, caches and lazy imports filled
            best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best
