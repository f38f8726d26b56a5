"""Child processes, `parallel` at a time: `cellfuse train --parallel` and `cellfuse sweep --parallel`.

Each child gets the least busy GPU (when there are GPUs) and writes to files, not pipes (a full pipe
would stall it). Any way out of run_all (an error, Ctrl-C) stops the children first, so none is left
running.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def pick_gpu(busy: list[int | None], n_gpus: int) -> int | None:
    """The GPU running the fewest children (lowest index on a tie); None without GPUs."""
    if not n_gpus:
        return None
    return min(range(n_gpus), key=lambda g: (busy.count(g), g))


def spawn(cmd: list[str], log: Path, *, stdout: Path | None = None, gpu: int | None = None,
          share_gpu: bool = False) -> subprocess.Popen:
    """Start `cmd` on `gpu` (None: as this process sees the devices), its stderr into `log` and its
    stdout into `stdout` (None: into `log` too)."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if share_gpu:  # two processes on one GPU: each must not grab all its memory up front
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    with log.open("w") as err:  # the child keeps its own copies of the files
        if stdout is None:
            return subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env)
        with stdout.open("w") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=err, env=env)


def stop_children(procs, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever has not exited after `grace` seconds."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_all(jobs: Iterable, parallel: int, start: Callable, finished: Callable, *, poll: float = 0.5) -> None:
    """`start(job, gpu, share_gpu) -> Popen` for each job, `parallel` at a time, then `finished(job, proc)`
    as each exits. `jobs` is read lazily: a job is taken only when a slot is free."""
    n_gpus = gpu_count()
    share = n_gpus > 0 and parallel > n_gpus
    pending, running = iter(jobs), {}  # process -> (job, gpu)
    exhausted = False
    try:
        while not exhausted or running:
            while not exhausted and len(running) < parallel:
                job = next(pending, _END)
                exhausted = job is _END
                if not exhausted:
                    gpu = pick_gpu([g for _, g in running.values()], n_gpus)
                    running[start(job, gpu, share)] = (job, gpu)
            if not running:
                break
            time.sleep(poll)
            for proc in [p for p in running if p.poll() is not None]:
                job, _ = running.pop(proc)
                finished(job, proc)
    finally:
        stop_children(list(running))


_END = object()  # the end of `jobs`
