"""Memory: a budget for the methods and metrics that run many forward passes, and a fallback
when a chunk does not fit.

Integrated gradients, SmoothGrad, Score-/Ablation-CAM, occlusion and the metrics run their
model on many inputs (path points, noisy copies, masked images, perturbations) in chunks.

* ``memory_budget("2GB")`` (a context manager) caps every chunk so that its estimated memory
  stays under the budget. The estimate comes from one probe pass of a single input: the bytes
  of every module output (what autograd keeps for a backward pass), or the largest ones for a
  forward pass without gradients.
* Whatever the chunk size, a chunk that runs out of memory (CUDA, or the CPU allocator) is
  split in half and retried, down to one input at a time: an input that fits alone never fails
  for lack of memory. Only a single input that does not fit raises, with a clear message.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import gc
import re
import sys
import time
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import InvalidInputError, SrdxaiError

Tensor = torch.Tensor

_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "srdxai_memory_budget", default=None)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory",
                 "defaultcpuallocator")


class OutOfMemoryError(SrdxaiError, MemoryError):
    """A single input does not fit in memory."""


def parse_size(size: int | float | str) -> int:
    """Bytes from ``2_000_000_000``, ``"2GB"``, ``"1.5 GiB"`` or ``"512MB"``."""
    if isinstance(size, bool):
        raise InvalidInputError(f"a memory size must be bytes or text like '2GB', got {size!r}.")
    if isinstance(size, int | float):
        value = float(size)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidInputError(
                f"cannot read the memory size {size!r}; write e.g. '2GB', '512MB' or '1.5GiB'.")
        value = float(match.group(1)) * _UNITS[unit]
    if not value >= 1:
        raise InvalidInputError(f"a memory budget must be at least one byte, got {size!r}.")
    return int(value)


@contextlib.contextmanager
def memory_budget(limit: int | float | str | None) -> Iterator[None]:
    """Inside this context, chunks of many-forward methods and metrics are sized to stay under
    ``limit`` (bytes or text such as ``"2GB"``; None: no budget, the defaults)."""
    token = _BUDGET.set(None if limit is None else parse_size(limit))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def current_budget() -> int | None:
    """The budget in bytes set by :func:`memory_budget`, or None."""
    return _BUDGET.get()


# --- default chunk sizes -------------------------------------------------------------------

#: Default chunk of a many-forward method or metric: at most this many input elements per
#: pass. On a CPU, 2 Mi elements (13 images at 3x224x224, 2730 at 3x16x16): larger chunks fall
#: out of the caches and run slower per image; passes with a backward, which keep every
#: activation (ResNet50 at 224 x 224: about 90 MB per image), get half (6 images at 224:
#: integrated gradients on ResNet50 and EfficientNet-Lite0 and max-sensitivity's explain calls
#: ran 1.2-5x faster than with 13, 2026-12-05). On a GPU, 32 Mi elements (222 images at
#: 3x224x224); passes with a backward get 8 times fewer (27 images).
CPU_ELEMENT_BUDGET = 2**21
CPU_BACKWARD_ELEMENT_BUDGET = 2**20
GPU_ELEMENT_BUDGET = 2**25
GPU_BACKWARD_ELEMENT_BUDGET = 2**22


def element_chunk(x: Tensor, backward: bool) -> int:
    """How many inputs like ``x[0]`` one pass takes by default on ``x``'s device."""
    if x.device.type == "cpu":
        budget = CPU_BACKWARD_ELEMENT_BUDGET if backward else CPU_ELEMENT_BUDGET
    else:
        budget = GPU_BACKWARD_ELEMENT_BUDGET if backward else GPU_ELEMENT_BUDGET
    return max(1, budget // max(1, x[0].numel()))


# --- estimates ------------------------------------------------------------------------------

#: model -> {(input shape, dtype, device): (sum, max)}; forgotten with the model
_ESTIMATES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[int, int]]] = (
    weakref.WeakKeyDictionary())


def activation_bytes(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """(sum, max) of the bytes of every leaf module's output for one input ``x[:1]``: what a
    backward pass keeps, and the largest single activation. Measured once per model, input
    shape, dtype and device (a no-grad probe pass)."""
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    known = _ESTIMATES.setdefault(model, {})
    found = known.get(key)
    if found is not None:
        return found
    sizes: list[int] = []

    def record(module: nn.Module, args: object, out: object) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(record) for m in model.modules()
               if next(m.children(), None) is None]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    one = x[:1].numel() * x.element_size()
    found = (sum(sizes) + one, max(sizes, default=0) + one)
    known[key] = found
    return found


#: A forward-only chunk on a CPU keeps its largest activation within this many bytes. Measured
#: on a 2-core AMD EPYC (1 MiB L2 per core, 32 MiB L3), 2026-12-05: EfficientNet-Lite0 at 224 px
#: ran 16-19 ms per image in chunks of 1-2 images against 29 ms in the input-size default of
#: 13, a small CNN at 3x32x32 28 us per image in chunks of 64 against 95 us in 682 (per-image
#: time jumps 2x once the chunk's largest activation passes about 5 MB).
CPU_CACHE_BYTES = 4 * 2**20


def cache_chunk(model: nn.Module, x: Tensor, default: int) -> int:
    """``default`` inputs per forward-only chunk, fewer on a CPU where the chunk's largest
    activation would not stay within :data:`CPU_CACHE_BYTES` (activations measured once per
    model and input shape, :func:`activation_bytes`)."""
    if x.device.type != "cpu":
        return default
    _, largest = activation_bytes(model, x)
    return max(1, min(default, CPU_CACHE_BYTES // max(1, largest)))


def budget_chunk(model: nn.Module, x: Tensor, default: int, backward: bool) -> int:
    """``default`` (inputs per chunk), capped by the :func:`memory_budget` if one is set.

    Per input: twice the sum of activations for a pass with a backward (kept activations and
    their gradients), three times the largest activation for a forward pass without gradients.
    """
    budget = current_budget()
    if budget is None:
        return default
    total, largest = activation_bytes(model, x)
    per_input = 2 * total if backward else 3 * largest
    return max(1, min(default, budget // max(1, per_input)))


# --- tuned chunks --------------------------------------------------------------------------

class DefaultChunk(int):
    """A chunk size the caller did not choose (the defaults above) for inputs like ``like``:
    forward-only passes on a CPU may replace it by the fastest size measured on the run's own
    first chunks (:func:`run_tuned`). A plain ``int`` is the caller's choice and is kept
    exactly. Arithmetic on it gives plain ints."""

    key: tuple
    cap: int

    def __new__(cls, size: int, like: Tensor) -> DefaultChunk:
        chunk = super().__new__(cls, max(1, int(size)))
        chunk.key = (tuple(like.shape[1:]), like.dtype, like.device)
        chunk.cap = element_chunk(like, backward=False)
        return chunk


#: model -> {(input shape, dtype, device, threads): the fastest forward-only chunk measured}
_TUNED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()
#: model -> {(input shape, dtype, device, threads, what): whole-run trials under way}, one per
#: kind of run (``what``: the metric), since runs of different metrics cost different amounts
#: per input besides the passes and must not be compared with each other
_TRIALS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, RunTrials]] = (
    weakref.WeakKeyDictionary())

#: tuning runs only when the candidates' chunks (two of each) are at most this part of the work
TUNE_SHARE = 0.5
#: a chunk (or, for whole-run trials, a run) faster than this is not timed reliably on a busy
#: machine (a small CNN's 53 images of 3x32x32 take about 2 ms)
TUNE_MIN_SECONDS = 0.02
#: another size replaces the default only when it is at least this much faster per input
TUNE_MARGIN = 0.05
#: a whole-run trial needs at least this many chunks of its size (a run of one or two partial
#: chunks says little about a size's speed)
TRIAL_MIN_CHUNKS = 4


def chunk_candidates(size: int, cap: int) -> list[int]:
    """The chunk sizes tried around a default ``size``: half, itself, twice and four times it,
    at most ``cap`` (the element budget's chunk)."""
    sizes = {max(1, size // 2), size, 2 * size, 4 * size}
    return sorted(s for s in sizes if s <= max(size, cap))


def _choice(per_input: dict[int, float], default: int) -> int:
    """The fastest size per input, unless it does not beat the default by the margin."""
    best = min(per_input, key=per_input.__getitem__)
    reference = per_input.get(default)
    if reference is not None and per_input[best] > (1 - TUNE_MARGIN) * reference:
        return default
    return best


class RunTrials:
    """Chunk sizes timed over whole runs, one size per run, for chunks too quick to time one
    by one: each candidate twice (round robin over the runs), then the fastest per input.

    Only the candidates the longest run seen can time (:data:`TRIAL_MIN_CHUNKS` chunks of
    them) are waited for: a metric whose runs are all shorter than four chunks of the largest
    candidate (a small CNN's infidelity: 816 inputs, candidates up to 212) settles among the
    others instead of never settling."""

    def __init__(self, candidates: list[int], default: int, per_input: float | None = None):
        self.candidates, self.default = list(candidates), default
        self.times: dict[int, list[float]] = {c: [] for c in candidates}
        #: seconds per input at the default size (an estimate of a run's length), once known
        self.per_input = per_input
        #: inputs in the longest run seen (:meth:`next_size`)
        self.longest = 0

    def worth_trying(self, total: int, size: int) -> bool:
        """A run of ``total`` inputs is long enough to time at ``size``: enough chunks of it,
        and, at the default's speed, at least :data:`TUNE_MIN_SECONDS`."""
        return (self.per_input is not None and total >= TRIAL_MIN_CHUNKS * size
                and self.per_input * total >= TUNE_MIN_SECONDS)

    def timeable(self, total: int | None = None) -> list[int]:
        """The candidates a run of ``total`` inputs (default: the longest run seen) has enough
        chunks of."""
        inputs = self.longest if total is None else total
        return [c for c in self.candidates if TRIAL_MIN_CHUNKS * c <= inputs]

    def next_size(self, total: int) -> int:
        """For a run of ``total`` inputs: the candidate it can time with the fewest recorded
        runs (the smaller on ties), or the default where it can time none."""
        self.longest = max(self.longest, total)
        fits = self.timeable(total)
        if not fits:
            return self.default
        return min(fits, key=lambda c: (len(self.times[c]), c))

    def record(self, size: int, seconds_per_input: float) -> int | None:
        """Note one run; the chosen size once every candidate the longest run seen can time
        (at least two of them) has two runs, else None."""
        self.times[size].append(seconds_per_input)
        ready = self.timeable()
        if len(ready) < 2 or any(len(self.times[c]) < 2 for c in ready):
            return None
        return _choice({c: min(self.times[c]) for c in ready}, self.default)

    def drop(self, size: int) -> None:
        """A size that ran out of memory, and every larger one, are not candidates."""
        self.candidates = [c for c in self.candidates if c < size] or [1]
        self.times = {c: self.times.get(c, []) for c in self.candidates}


_FIXED_CHUNKS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "srdxai_fixed_chunks", default=False)


@contextlib.contextmanager
def fixed_chunks() -> Iterator[None]:
    """Inside, default chunk sizes are used as they are, never tuned (:func:`run_tuned`).

    Which size a tuning picks depends on timing, and results differ by float rounding between
    sizes (about 1e-7 relative): the experiment runner computes every unit inside, so that a
    killed run, resumed, stores the very numbers an uninterrupted one does."""
    token = _FIXED_CHUNKS.set(True)
    try:
        yield
    finally:
        _FIXED_CHUNKS.reset(token)


def tuned_chunk(model: nn.Module, size: DefaultChunk) -> int | None:
    """The fastest chunk measured in this process for ``model`` on the inputs ``size`` was
    chosen for (with the current number of threads), if the trials are done."""
    return _TUNED.get(model, {}).get(_tuning_key(size))


def _tuning_key(size: DefaultChunk) -> tuple:
    """What a chosen size is remembered under: the inputs ``size`` was chosen for and the
    current number of threads."""
    return (*size.key, torch.get_num_threads())


def run_tuned(model: nn.Module, total: int, size: int, run: Callable[[int, int], None],
              what: str) -> None:
    """``run(start, stop)`` over ``0..total`` like :func:`run_in_chunks`, with the chunk size
    tuned when ``size`` is a :class:`DefaultChunk` of forward-only passes on a CPU.

    Which chunk runs fastest depends on the CPU's caches, the model and the threads: one image
    of 3x224x224 ran 21 ms per image on EfficientNet-Lite0 and four 18.5 ms on one day,
    the reverse on another (2026-12-05). So the run's first chunks try :func:`chunk_candidates`
    (two rounds, a new shape's first pass also builds oneDNN's kernels) and the rest runs at
    the fastest per input; the choice is remembered for the model and input shape
    (:func:`tuned_chunk`). Where the default's chunks are too quick to time one by one
    (:data:`TUNE_MIN_SECONDS`: a noisy trial once picked a 1.4x slower size for a small CNN),
    whole runs are timed instead, one candidate per run of the same kind (``what``: runs of
    different metrics are never compared; :class:`RunTrials`; runs shorter than that, or with
    fewer than :data:`TRIAL_MIN_CHUNKS` chunks, use the default and are not counted, and a size
    no run so far was long enough to time is not waited for). The default stays unless a size
    beats it by :data:`TUNE_MARGIN`. The work is the same whatever the sizes; only float
    rounding differs between batch sizes (about 1e-7 relative): pass a ``batch_size`` to fix
    the chunks.
    """
    if not isinstance(size, DefaultChunk) or size.key[2].type != "cpu" or (
            _FIXED_CHUNKS.get()):
        run_in_chunks(total, int(size), run, what)
        return
    tuned = _TUNED.setdefault(model, {})
    key = _tuning_key(size)
    known = tuned.get(key)
    if known is not None:
        run_in_chunks(total, known, run, what)
        return
    default = int(size)
    candidates = chunk_candidates(default, size.cap)
    if len(candidates) < 2:
        run_in_chunks(total, size, run, what)
        return
    trials = _TRIALS.setdefault(model, {})

    def settle(choice: int) -> None:
        """The size for every run on these inputs from now on; no trials left for them."""
        tuned[key] = choice
        for done in [k for k in trials if k[:len(key)] == key]:
            del trials[done]

    state = trials.get((*key, what))
    if state is None and 2 * sum(candidates) <= TUNE_SHARE * total:
        start, best, per_input = _tune_within_run(candidates, default, total, run, what)
        if best is None:  # chunks too quick to time: whole runs from the next run on
            trials[(*key, what)] = RunTrials(candidates, default, per_input)
            best = default
        else:
            settle(best)
        run_in_chunks(total - start, best, lambda a, b: run(start + a, start + b), what)
        return
    if state is None:
        state = trials[(*key, what)] = RunTrials(candidates, default)
    trial = state.next_size(total)
    if not state.worth_trying(total, trial):
        # at the default size, timed: how long runs are (and a sample of the default)
        trial = default
    began = time.perf_counter()
    used = run_in_chunks(total, trial, run, what)
    seconds = time.perf_counter() - began
    if used < trial:
        state.drop(trial)
        return
    if trial == default:
        state.per_input = seconds / total
    if seconds >= TUNE_MIN_SECONDS and total >= TRIAL_MIN_CHUNKS * trial:
        choice = state.record(trial, seconds / total)
        if choice is not None:
            settle(choice)


def _tune_within_run(candidates: list[int], default: int, total: int,
                     run: Callable[[int, int], None], what: str
                     ) -> tuple[int, int | None, float | None]:
    """Run the first chunks at each candidate, round robin, twice (a slow spell of the machine
    then hits every size alike, and the second round runs on kernels oneDNN has built
    already): (inputs done, the chosen size or None where the default's chunks are too quick
    to time, seconds per input at the default)."""
    start, per_input = 0, {}
    chunk_seconds: dict[int, float] = {}
    fits = total
    for candidate in candidates * 2:
        if candidate > fits:  # a smaller chunk ran out of memory already
            continue
        offset = start
        began = time.perf_counter()
        used = run_in_chunks(candidate, candidate, lambda a, b, o=offset: run(o + a, o + b),
                             what)
        seconds = time.perf_counter() - began
        start += candidate
        per_input[used] = min(per_input.get(used, float("inf")), seconds / candidate)
        chunk_seconds[used] = min(chunk_seconds.get(used, float("inf")), seconds)
        if used < candidate:  # out of memory: larger chunks will not fit either
            fits = used
    if default in chunk_seconds and chunk_seconds[default] < TUNE_MIN_SECONDS:
        return start, None, per_input[default]
    return start, _choice(per_input, default), per_input.get(default)


# --- the C allocator ---------------------------------------------------------------------

#: glibc's ``mallopt`` parameters (malloc.h) and the largest mmap threshold it accepts on a
#: 64-bit system (DEFAULT_MMAP_THRESHOLD_MAX)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20
_KEPT: list[bool] = []  # [True] once keep_freed_memory has applied


def keep_freed_memory() -> bool:
    """Ask the C library's allocator (glibc on Linux) to keep freed memory for reuse, for the
    rest of the process: blocks up to 32 MiB come from the heap, and the heap is never given
    back to the system. Returns whether it applied (False on other systems and allocators).

    Why: glibc returns freed memory at the top of its heap to the system and serves large
    blocks by fresh mappings, with a threshold it moves as the program runs. Depending on the
    order of a process's allocations, every chunk of forward passes then faults its activations
    in page by page again: a small CNN's pixel flipping (1040 inputs of 3x32x32) took 75-105
    ms per call in such a process against 31-46 ms here (2026-12-07, 2-core AMD EPYC; about
    30 000 page faults per call against none), the same code in two processes. The price is a
    process that keeps its peak heap. ``srdxai`` (the command line) calls it at start; call it
    once in your own script before evaluating small models on a CPU.
    """
    if _KEPT:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; other C libraries (musl) accept the call and do nothing
    if mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) != 1 or (
            mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1):
        return False
    _KEPT.append(True)
    return True


# --- the fallback ---------------------------------------------------------------------------

def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error or a failed CPU allocation."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(
        text in str(error).lower() for text in _OOM_MESSAGES)


def run_in_chunks(total: int, size: int, run: Callable[[int, int], None], what: str,
                  on_split: Callable[[int], None] | None = None) -> int:
    """Call ``run(start, stop)`` on consecutive ranges of at most ``size`` items covering
    ``0..total``. A range that runs out of memory is retried in halves (and every later range
    is that small too), down to one item; one item that does not fit raises
    :class:`OutOfMemoryError`. ``run`` must not keep partial results of a failed range.
    Returns the chunk size that was used last. ``on_split(new_size)`` is told of each split.
    """
    size = max(1, int(size))
    start = 0
    while start < total:
        stop = min(total, start + size)
        try:
            run(start, stop)
        except Exception as error:  # noqa: BLE001 - re-raised unless it is out of memory
            if not is_out_of_memory(error):
                raise
            del error
            _release()
            if stop - start == 1:
                raise OutOfMemoryError(
                    f"{what}: a single input does not fit in memory. Free memory, use a "
                    "smaller input, or run on a device with more memory.") from None
            size = max(1, (stop - start) // 2)
            if on_split is not None:
                on_split(size)
            continue
        start = stop
    return size


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["DefaultChunk", "OutOfMemoryError", "activation_bytes", "budget_chunk",
           "cache_chunk", "chunk_candidates", "current_budget", "element_chunk",
           "is_out_of_memory", "keep_freed_memory", "memory_budget", "parse_size",
           "run_in_chunks", "run_tuned", "tuned_chunk"]
