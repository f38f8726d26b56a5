"""Where a run computes: the TF_CONFIG cluster, the tf.distribute strategy, replicas kept in sync,
and the precision policy.

MultiWorkerMirroredStrategy must exist before any other TensorFlow op, so choose_strategy comes first
in a run (toolkit.train.start_run). TensorFlow is imported inside functions: importing this module is
instant.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from toolkit.errors import CellfuseError
from toolkit.runs import make_own_dir


@dataclass(frozen=True)
class Cluster:
    """This process's place in a TF_CONFIG cluster (one worker, index 0, when there is none)."""
    workers: int = 1
    task_type: str = "worker"
    task_index: int = 0
    has_chief: bool = False  # TF_CONFIG names a "chief" task apart from the workers

    @property
    def is_chief(self) -> bool:  # an explicit "chief" task, else worker 0 (TensorFlow's rule)
        return self.task_type == "chief" or (self.task_type == "worker" and self.task_index == 0
                                             and not self.has_chief)


def cluster_from_env() -> Cluster:
    """Read TF_CONFIG, the variable every TF cluster tool (TFJob, Vertex AI, SageMaker) sets."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return Cluster()
    try:
        config = json.loads(text)
        spec, task = config.get("cluster", {}), config.get("task", {})
        workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
        return Cluster(workers=workers, task_type=str(task.get("type", "worker")),
                       task_index=int(task.get("index", 0)), has_chief="chief" in spec)
    except (ValueError, AttributeError, TypeError) as e:
        raise CellfuseError(f"TF_CONFIG: not a valid cluster description ({e}); expected "
                            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from None


def worker_temp_root(root: Path, cluster: Cluster) -> Path:
    """Where a non-chief worker writes: a folder of its own beside the runs, kept until the run ends
    so that its backups survive a restart (its weights equal the chief's; nothing there is a result)."""
    return make_own_dir(root / ".workertemp", "scratch") / f"{cluster.task_type}{cluster.task_index}"


_STRATEGIES: dict = {}  # one multi-worker strategy per process: TensorFlow allows no second


def choose_strategy(cfg, console: Console, cluster: Cluster | None = None):
    """MultiWorkerMirroredStrategy for a TF_CONFIG cluster; MirroredStrategy over several GPUs
    (or when asked: two logical CPUs in tests); else the default strategy."""
    import tensorflow as tf

    cluster = cluster or cluster_from_env()
    if cfg.distribute == "multi-worker" or (cfg.distribute == "auto" and cluster.workers > 1):
        return _multi_worker_strategy(cluster, console)
    gpus = tf.config.list_logical_devices("GPU")
    if cfg.distribute == "mirrored" or (cfg.distribute == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        console.print(f"distribution: MirroredStrategy over {len(devices)} devices")
        # CPU replicas (tests) reduce on one device: TF's collective ops mix up instances when several
        # CPU strategies live in one process ("shape mismatch in the collective instance")
        reduce = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=reduce)
    return tf.distribute.get_strategy()


def _multi_worker_strategy(cluster: Cluster, console: Console):
    import tensorflow as tf

    if "multi-worker" not in _STRATEGIES:
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as e:
            raise CellfuseError(f"MultiWorkerMirroredStrategy could not start ({e}); it needs TF_CONFIG "
                                "naming the workers, set before the process starts") from None
        _STRATEGIES["multi-worker"] = _reduce_nested(strategy)
    strategy = _STRATEGIES["multi-worker"]
    console.print(f"distribution: MultiWorkerMirroredStrategy, {cluster.workers} workers, this is "
                  f"{cluster.task_type} {cluster.task_index} ({'chief' if cluster.is_chief else 'not chief'}), "
                  f"{strategy.num_replicas_in_sync} replicas in sync")
    return strategy


def _reduce_nested(strategy):
    """Two gaps in Keras 3's multi-worker path (keras-team/keras#20585), closed here: fit reduces a
    whole (images, labels) batch in one `strategy.reduce` call, which MultiWorkerMirroredStrategy takes
    one tensor at a time; and it averages per-replica scalars (loss, metrics) along axis 0, which a
    scalar lacks (the mean over replicas is axis None)."""
    import tensorflow as tf

    reduce = strategy.reduce

    def reduce_each(op, value, axis=None):
        def one(v):
            rank = strategy.experimental_local_results(v)[0].shape.rank
            return reduce(op, v, axis=axis if rank else None)
        return tf.nest.map_structure(one, value)

    strategy.reduce = reduce_each
    return strategy


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def describe_strategy(strategy, cluster: Cluster) -> dict:
    """For env.json: how this run was spread (replicas in sync, workers, this task's role). TF's class
    behind MultiWorkerMirroredStrategy is called CollectiveAllReduceStrategy: named by its public name."""
    name = "MultiWorkerMirroredStrategy" if is_multi_worker(strategy) else type(strategy).__name__
    return {"strategy": name, "replicas": int(strategy.num_replicas_in_sync),
            "workers": cluster.workers, "task": f"{cluster.task_type}{cluster.task_index}",
            "role": "chief" if cluster.is_chief else "worker"}


def tf_variables(variables) -> list:
    """TensorFlow variables behind Keras variables: what a replica context reduces."""
    return [v.value if hasattr(v, "value") else v for v in variables]


def sync_replicas(strategy, variables, how: str) -> None:
    """Set every replica's copy of `variables` to the replicas' mean (how="mean") or to the first
    replica's, the chief's (how="chief": a sum to which only replica 0 contributes). Integer state
    (step counters) travels as float64."""
    import tensorflow as tf

    if how == "mean":
        variables = [v for v in variables if v.dtype.is_floating]  # not seed-generator state

    def wire(v):  # all_reduce packs one dtype per call
        return tf.float32 if v.dtype == tf.float32 else tf.float64

    @tf.function
    def step():
        ctx = tf.distribute.get_replica_context()
        values = [tf.identity(tf.cast(v, wire(v))) for v in variables]  # tensors, not variables
        if how == "chief":
            first = tf.equal(ctx.replica_id_in_sync_group, 0)
            values = [tf.where(first, x, tf.zeros_like(x)) for x in values]
        reduced = {}
        for dtype in {x.dtype for x in values}:
            group = [i for i, x in enumerate(values) if x.dtype == dtype]
            for i, r in zip(group, ctx.all_reduce("sum" if how == "chief" else "mean",
                                                  [values[i] for i in group]), strict=True):
                reduced[i] = r
        return [reduced[i] for i in range(len(values))]

    for var, value in zip(variables, strategy.run(step), strict=True):
        var.assign(tf.cast(strategy.experimental_local_results(value)[0], var.dtype))


def set_precision(cfg, console: Console) -> None:
    """mixed_float16 on a GPU (or when asked), else float32: Keras' global policy for the models built next."""
    import keras
    import tensorflow as tf

    on = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto"
                                         and bool(tf.config.list_physical_devices("GPU")))
    keras.mixed_precision.set_global_policy("mixed_float16" if on else "float32")
    if on:
        console.print("mixed precision: float16 compute, float32 weights and probabilities")

