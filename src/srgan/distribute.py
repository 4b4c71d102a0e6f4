"""tf.distribute strategy for ``train.distribute`` (one place decides how training is spread).

``multi_worker``: one process per machine, ``tf.distribute.MultiWorkerMirroredStrategy`` over the
cluster that ``TF_CONFIG`` describes (the standard spec: every worker's ``host:port`` and this
process's task). :func:`cluster_task` reads it without TensorFlow, so a process knows whether it
is the chief (the one that writes MLflow, reports, the model and the kept checkpoints) before it
builds anything. A peer that dies mid-run is found by TensorFlow's coordination service (the
chief's heartbeat check, on by default in TF 2.21; its ~10 s timeout is TF's default) or, when a
peer is alive but stuck, by the collective timeout :data:`COLLECTIVE_TIMEOUT_S`;
:func:`worker_lost` turns the collective's error into a :class:`WorkerLostError` naming the worker.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ExpectedError

log = logging.getLogger(__name__)

MODES = ("auto", "none", "mirrored", "multi_worker")
TF_CONFIG = "TF_CONFIG"
WORKER_JOBS = ("chief", "worker")  # the jobs of a MultiWorkerMirroredStrategy cluster
TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}, '
                     '"task": {"type": "worker", "index": 0}}')
# A collective that waits longer than this for a peer fails instead of hanging: the backstop for a
# peer that is alive but stuck. It must exceed the longest time one worker may run ahead of another
# between two steps (tracing the first step, a checkpoint to slow shared storage, the chief's final
# MLflow upload). A dead process or machine is found much sooner, by the heartbeats (~10 s).
COLLECTIVE_TIMEOUT_S = 600.0
# how TensorFlow names a task in its errors: /job:worker/replica:0/task:1 or /job:worker/task:1
_TASK_NAME = re.compile(r"/job:(chief|worker)(?:/replica:\d+)?/task:(\d+)")
# CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic: AVX512-BF16 dot products, AMX tiles
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_GPU_CAPABILITY = (8, 0)  # Ampere and newer compute bf16 natively
CPUINFO = "/proc/cpuinfo"


def cpu_flags(path: str = CPUINFO) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_precision(setting: str, flags: set[str] | None = None) -> tuple[str, str]:
    """``train.precision`` -> (Keras policy, why). ``auto``: mixed_bfloat16 where the device runs
    bf16 natively (GPUs of compute capability >= 8.0, CPUs with AVX512-BF16/AMX), else float32:
    emulated bf16 is several times slower than float32 (4.5x measured on an AVX2-only EPYC)."""
    if setting != "auto":
        return setting, "set by train.precision"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        caps = [tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0)) for g in gpus]
        if all(tuple(c) >= BF16_GPU_CAPABILITY for c in caps):
            return "mixed_bfloat16", f"auto: GPU compute capability {min(caps)} runs bf16 natively"
        return "float32", f"auto: GPU compute capability {min(caps)} has no native bf16"
    native = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    if native:
        return "mixed_bfloat16", f"auto: CPU has {', '.join(native)}"
    return "float32", "auto: CPU has no native bf16 (no " + "/".join(BF16_CPU_FLAGS) + ")"

# device names -> the MirroredStrategy this process made for them (see make_strategy)
_MIRRORED: dict[tuple[str, ...], Any] = {}
# TF_CONFIG -> the MultiWorkerMirroredStrategy of this process (TensorFlow allows one per process)
_MULTI_WORKER: dict[str, Any] = {}


class ClusterError(ExpectedError, RuntimeError):  # a RuntimeError, as when it was a cli.UserError
    """TF_CONFIG is missing or wrong, or the workers do not train the same thing."""


class WorkerLostError(ExpectedError, RuntimeError):
    """A peer worker died or stopped answering mid-run: this worker stops too (resumable)."""

    exit_at_once = True  # cli.run_main: no interpreter teardown over a broken collective runtime


@dataclass(frozen=True)
class Task:
    """This process's place in the training cluster. A single process (any mode but
    ``multi_worker``) is the chief of a one-task cluster."""

    type: str = "chief"
    index: int = 0
    cluster: dict[str, list[str]] = field(default_factory=dict)

    @property
    def chief(self) -> bool:
        """TensorFlow's rule: the ``chief`` task, or worker 0 when the cluster has no chief job."""
        return self.type == "chief" or (self.type == "worker" and self.index == 0 and "chief" not in self.cluster)

    @property
    def num_workers(self) -> int:
        return sum(len(self.cluster.get(job, [])) for job in WORKER_JOBS) or 1

    def describe(self, job: str, index: int) -> str:
        """``worker 1 (10.0.0.2:2222)``: a task as the messages name it."""
        addresses = self.cluster.get(job, [])
        return f"{job} {index}" + (f" ({addresses[index]})" if index < len(addresses) else "")

    @property
    def name(self) -> str:
        return self.describe(self.type, self.index)


def cluster_task(mode: str, environ: dict[str, str] | None = None) -> Task:
    """This process's task: from ``TF_CONFIG`` for ``multi_worker`` (validated, with a message saying
    what is wrong), else the single chief. Reads no TensorFlow, so it may run before anything else."""
    if mode != "multi_worker":
        return Task()
    raw = (os.environ if environ is None else environ).get(TF_CONFIG, "")
    where = f"train.distribute: multi_worker reads the cluster from {TF_CONFIG}"
    if not raw.strip():
        raise ClusterError(f"{where}, which is not set; set it on every machine, e.g. "
                           f"{TF_CONFIG}='{TF_CONFIG_EXAMPLE}' (index 1 on the second machine)")
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ClusterError(f"{where}: not valid JSON ({exc}); e.g. '{TF_CONFIG_EXAMPLE}'") from None
    cluster, task = (spec.get("cluster"), spec.get("task")) if isinstance(spec, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ClusterError(f"{where}: it needs a 'cluster' and a 'task' mapping, e.g. '{TF_CONFIG_EXAMPLE}'")
    other = sorted(set(cluster) - set(WORKER_JOBS))
    if other:
        raise ClusterError(f"{where}: jobs {other} are not supported (only {', '.join(WORKER_JOBS)}: "
                           "MultiWorkerMirroredStrategy has no parameter servers or evaluators)")
    jobs = {job: cluster[job] for job in WORKER_JOBS if job in cluster}
    if not jobs or any(not isinstance(a, list) or not a or not all(isinstance(x, str) for x in a)
                       for a in jobs.values()):
        raise ClusterError(f"{where}: cluster.worker (and cluster.chief) must be non-empty lists of "
                           f"'host:port', e.g. '{TF_CONFIG_EXAMPLE}'")
    if len(jobs.get("chief", [])) > 1:
        raise ClusterError(f"{where}: cluster.chief has {len(jobs['chief'])} tasks; at most one")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in jobs or not isinstance(index, int) or not 0 <= index < len(jobs[kind]):
        raise ClusterError(f"{where}: task {task!r} is not in the cluster {jobs!r}")
    return Task(kind, index, jobs)


def _make_multi_worker() -> Any:
    import tensorflow as tf

    raw = os.environ.get(TF_CONFIG, "")
    if raw not in _MULTI_WORKER:
        if _MULTI_WORKER:
            raise ClusterError(f"{TF_CONFIG} changed within one process: a process joins one cluster only")
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_S)
        try:
            _MULTI_WORKER[raw] = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except RuntimeError as exc:  # "Collective ops must be configured at program startup"
            raise ClusterError(f"train.distribute: multi_worker: the strategy must be made before TensorFlow "
                               f"runs anything in this process ({exc})") from None
    return _MULTI_WORKER[raw]


def make_strategy(mode: str) -> Any:
    """tf.distribute strategy for ``train.distribute``.

    ``none``: the default (no-op) strategy. ``auto``: MirroredStrategy over every visible GPU when
    there are more than one, else ``none``. ``mirrored``: MirroredStrategy over every visible GPU;
    without GPUs, over every logical CPU device (one replica per device: a CPU split with
    ``tf.config.set_logical_device_configuration`` before TensorFlow initialises, as the tests do).
    The global batch ``train.batch_size`` is split evenly across the replicas.

    One MirroredStrategy per process and device list, reused by every later Trainer (tuning trains
    many in one process): a second MirroredStrategy restarts TensorFlow's collective instance keys, and
    its all-reduces then collide with the first one's (``Shape mismatch in the collective instance``)
    as soon as the models differ in shape.

    ``multi_worker``: MultiWorkerMirroredStrategy over the ``TF_CONFIG`` cluster, one replica per GPU
    of each machine (or its CPU); the global batch is split across all of them. It must be made
    before TensorFlow runs anything in the process (``trainer.prepare_runtime`` makes it first);
    it waits until every worker has joined.
    """
    import tensorflow as tf

    if mode not in MODES:
        raise ValueError(f"train.distribute: {mode!r} is not one of {', '.join(map(repr, MODES))}")
    if mode == "multi_worker":
        task = cluster_task(mode)  # a clear message for a bad TF_CONFIG, before TensorFlow reads it
        strategy = _make_multi_worker()
        log.info("train.distribute=multi_worker: %s of %d workers, %d replicas in all",
                 task.name, task.num_workers, strategy.num_replicas_in_sync)
        return strategy
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if mode == "mirrored" or (mode == "auto" and len(gpus) > 1):
        devices = tuple(gpus or [d.name for d in tf.config.list_logical_devices("CPU")])
        if devices not in _MIRRORED:
            _MIRRORED[devices] = tf.distribute.MirroredStrategy(devices=list(devices))
        strategy = _MIRRORED[devices]
        log.info("train.distribute=%s: MirroredStrategy over %d replicas %s",
                 mode, strategy.num_replicas_in_sync, list(devices))
        return strategy
    return tf.distribute.get_strategy()  # the default (no-op) strategy


def worker_lost(exc: BaseException, task: Task, hint: str) -> WorkerLostError | None:
    """The clear error for a collective that failed because a peer worker is gone (None for any
    other error). ``hint`` says where the training stopped and how it resumes."""
    import tensorflow as tf

    peer_errors = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                   tf.errors.CancelledError)
    text = str(exc)
    if task.num_workers < 2 or not isinstance(exc, tf.errors.OpError) or not (
            isinstance(exc, peer_errors) or "Collective ops is aborted" in text):
        return None
    peers = [(job, int(i)) for job, i in dict.fromkeys(_TASK_NAME.findall(text))]
    names = [task.describe(job, i) for job, i in peers if (job, i) != (task.type, task.index)]
    who = " and ".join(names) or "another worker"
    if "heartbeat" in text:
        how = "stopped sending heartbeats (its process or machine died)"
    elif isinstance(exc, tf.errors.DeadlineExceededError):
        how = f"did not answer within {COLLECTIVE_TIMEOUT_S:.0f} s (stuck, or its machine is unreachable)"
    else:
        how = "is unreachable (its process died or the connection was lost)"
    return WorkerLostError(f"train.distribute=multi_worker: {who} {how}; {task.name} stops too "
                           f"(that worker's own log says why it stopped). {hint}")


def _gather(strategy: Any, mine: Any) -> Any:
    """Every replica's ``mine`` stacked: one all-gather (ReduceOp has no MIN/MAX), in a tf.function
    because eager collectives of this strategy are slow (TensorFlow warns about them)."""
    import tensorflow as tf

    def replica_value() -> Any:
        return tf.identity(mine)

    @tf.function
    def gather() -> Any:
        return strategy.gather(strategy.run(replica_value), axis=0)

    return gather()


def across_workers(strategy: Any, task: Task, values: dict[str, int], hint: str = "") -> dict[str, tuple[int, int]]:
    """(min, max) of each integer over every replica of the cluster: a collective, so every worker
    must call it at the same point (also a barrier). Single process: (value, value). ``hint``: for
    the message if a worker is gone meanwhile."""
    import tensorflow as tf

    if task.num_workers < 2:
        return {k: (v, v) for k, v in values.items()}
    mine = tf.constant([list(values.values())], tf.int64)
    try:
        every = _gather(strategy, mine).numpy()
    except Exception as exc:
        lost = worker_lost(exc, task, hint or f"It happened while the workers compared {', '.join(values)}.")
        if lost is None:
            raise
        raise lost from exc
    return {key: (int(every[:, i].min()), int(every[:, i].max())) for i, key in enumerate(values)}


def threads_env(jobs: int) -> dict[str, str]:
    """The environment of ``jobs`` TensorFlow processes at once on this machine (study experiments,
    tune workers): each gets its share of the cores for its ops (unless the user set
    TF_NUM_INTRAOP_THREADS), so they do not oversubscribe."""
    env = dict(os.environ)
    env.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env
