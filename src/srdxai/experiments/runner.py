"""``srdxai bench``: the registered experiments on their models, resumable and sharded.

The runner plans, shards and resumes; what an experiment computes and reports lives in its
own module (``srdxai.experiments.suite``, found through ``srdxai.experiments.registry``).

A run is a list of *units* (experiment, model, method, batch of samples), enumerated in one
fixed order from the configuration. Each process (``torchrun`` rank) takes every
``world_size``-th unit, skips those its database already holds (resume), and writes each
finished unit atomically (``store.py``). The random draws of a unit depend only on the run seed,
the experiment, the model and the batch, never on the method or on which process runs it, so
every method sees the same perturbations and a sharded run computes what one process does.
When all ranks are done, rank 0 merges their databases into ``results.sqlite``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.memory import fixed_chunks
from ..errors import InvalidInputError
from .config import BenchConfig
from .data import Source, source_batch, source_model
from .registry import Job, UnitInputs, UnitResult, experiment, matching, unit_seed
from .store import ResultStore, merge, rank_path

__all__ = ["code_version", "jobs", "run", "run_job", "sources"]


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    from .. import __version__

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).parent)
        if head.returncode == 0 and head.stdout.strip():
            return f"{__version__}+g{head.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


# --- planning -------------------------------------------------------------------------------

def sources(name: str, config: BenchConfig) -> list[Source]:
    """The models (and data) of experiment ``name``, narrowed to ``config.models``."""
    return matching(experiment(name).sources(config), config.models)


def jobs(config: BenchConfig) -> list[Job]:
    """Every unit of the run, in the one fixed order all ranks agree on."""
    return [job for name in config.experiments for source in sources(name, config)
            for job in experiment(name).plan(source, config)]


def run_job(job: Job, config: BenchConfig) -> UnitResult:
    """One unit: its model and batch loaded, computed by its experiment."""
    model = source_model(job.source, config)
    x, y, masks = source_batch(job.source, list(job.samples), config)
    unit = UnitInputs(job, config, model, x, y, masks, unit_seed(config, job))
    # chunk sizes fixed, not tuned by timing: a resumed run stores the same numbers
    with fixed_chunks():
        return experiment(job.unit.experiment).run(unit)


# --- the run --------------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    initialised: bool = False


def _distributed() -> Distributed:
    """torchrun's rank and world size; a gloo process group when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Distributed(rank, world, True)


def run(run_dir: Path, config: BenchConfig, progress: bool = True,
        stop_after: int | None = None) -> Path | None:
    """Run (or resume) the benchmark into ``run_dir``; returns the merged database on rank 0.

    ``stop_after``: finish at most that many new units and return without merging (used to
    test resuming)."""
    for name in config.experiments:
        experiment(name)  # an unknown name is an error listing the known ones
    run_dir = Path(run_dir)
    dist = _distributed()
    if dist.world_size > 1 and config.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
    every = jobs(config)
    if not every:
        raise InvalidInputError(
            f"nothing to run: no model of {', '.join(config.experiments)} matches --models "
            f"{','.join(config.models or [])}.")
    mine = [j for i, j in enumerate(every) if i % dist.world_size == dist.rank]
    with ResultStore(rank_path(run_dir, dist.rank), config.public(), config.hash(),
                     code_version()) as store:
        todo = [j for j in mine if not store.done(j.unit)]
        done_now = 0
        for job in _progress(todo, progress and dist.rank == 0, len(mine) - len(todo),
                             len(mine)):
            if stop_after is not None and done_now >= stop_after:
                return None
            start = time.perf_counter()
            result = run_job(job, config)
            store.write_unit(job.unit, unit_seed(config, job), dist.rank,
                             time.perf_counter() - start, result.rows, result.curves,
                             artifacts=result.artifacts, maps=result.maps,
                             documents=result.documents)
            done_now += 1
    if dist.initialised:
        import torch.distributed as tdist

        tdist.barrier()
    if dist.rank == 0:
        return merge(run_dir)
    return None


def _progress(items: list[Job], show: bool, already: int, total: int) -> Iterator[Job]:
    if not show:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(total=total, initial=already, desc="srdxai bench", unit="unit",
              dynamic_ncols=True) as bar:
        for item in items:
            bar.set_postfix_str(f"{item.unit.experiment} {item.unit.model} {item.unit.method}",
                                refresh=False)
            yield item
            bar.update(1)
