"""Running extraction and fine-tuning on several devices or hosts with tf.distribute.

`--strategy default` runs on one device, as TensorFlow places it. `mirrored`
(tf.distribute.MirroredStrategy) copies the model to every local GPU, or to every logical CPU
device when there is no GPU (how the tests get two replicas out of one CPU). `multi-worker`
(MultiWorkerMirroredStrategy) spans hosts described by the standard TF_CONFIG variable.

Batch sizes are global: every step's batch is split over all replicas and gradients are
averaged over the whole batch, so the same --batch-size and --lr give the same optimisation
on one device or many. To keep N devices busy, raise --batch-size N times; the usual linear
scaling rule then raises --lr N times as well (Goyal et al. 2017), with caution beyond ~8x.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dogtl.core.errors import DogtlError
from dogtl.core.keras_private import multi_worker_fit

STRATEGIES = ("default", "mirrored", "multi-worker")
TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\' (index 1 on host2)')


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise DogtlError(f"--strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    return name


@dataclass(frozen=True)
class Worker:
    """This process's place in a multi-worker cluster (one worker, the chief, when alone)."""

    task_type: str = "worker"
    task_id: int = 0
    num_workers: int = 1
    has_chief: bool = False  # the cluster names a "chief" task

    @property
    def is_chief(self) -> bool:
        """The chief writes the real outputs: task 'chief', or worker 0 when there is no chief."""
        return self.task_type == "chief" or (self.task_id == 0 and not self.has_chief)

    def private_path(self, path: str | Path) -> Path:
        """Where this worker writes `path`: the path itself on the chief, a worker-named sibling
        elsewhere (so workers sharing a file system never write the same file)."""
        path = Path(path)
        if self.is_chief:
            return path
        return path.with_name(f"{path.stem}.{self.task_type}-{self.task_id}{path.suffix}")


def _bad(reason: str) -> DogtlError:
    return DogtlError(f"--strategy multi-worker: TF_CONFIG {reason}; set it on every host, e.g. {TF_CONFIG_EXAMPLE}")


def read_tf_config(environ=None) -> tuple[dict, Worker]:
    """The validated TF_CONFIG and this process's Worker; a DogtlError naming the mistake."""
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        raise _bad("is not set")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(f"is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise _bad("has no \"cluster\" object")
    cluster, task = config["cluster"], config.get("task")
    unknown = sorted(set(cluster) - {"worker", "chief"})
    if unknown:
        raise _bad(f"has task types {unknown} in \"cluster\"; only \"worker\" (and one \"chief\") are used")
    addresses = []
    for kind, hosts in cluster.items():
        if not isinstance(hosts, list) or not hosts:
            raise _bad(f"cluster.{kind} must be a non-empty list of \"host:port\" strings")
        for h in hosts:
            host, _, port = str(h).rpartition(":") if isinstance(h, str) else ("", "", "")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise _bad(f"cluster.{kind} holds {h!r}, not a \"host:port\" address")
            addresses.append(h)
    if len(cluster.get("chief", [])) > 1:
        raise _bad("lists more than one chief")
    if len(set(addresses)) != len(addresses):
        raise _bad("lists an address twice")
    if "worker" not in cluster and "chief" not in cluster:
        raise _bad("lists no workers")
    if not isinstance(task, dict):
        raise _bad("has no \"task\" object saying which worker this host is")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster:
        raise _bad(f"task.type is {kind!r}, not one of the cluster's {sorted(cluster)}")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[kind]):
        raise _bad(f"task.index is {index!r}; this cluster has {kind} 0..{len(cluster[kind]) - 1}")
    return config, Worker(kind, index, sum(len(v) for v in cluster.values()), "chief" in cluster)


_STRATEGIES: dict = {}


def make_strategy(name: str):
    """The tf.distribute strategy for `--strategy NAME`; None for 'default' (no TensorFlow import).

    One per process and name: TensorFlow configures collectives once, and a second strategy's
    collective ops can clash with the first's. For multi-worker, call this before any other
    TensorFlow work in the process: collective ops must be configured when TensorFlow starts.
    """
    check_strategy(name)
    if name == "default":
        return None
    if name == "multi-worker":
        read_tf_config()  # a clear line instead of TensorFlow's errors, before it starts
    if name in _STRATEGIES:
        return _STRATEGIES[name]
    import tensorflow as tf

    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in (gpus or tf.config.list_logical_devices("CPU"))])
    else:
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as e:
            raise DogtlError(f"--strategy multi-worker: cannot start ({str(e).splitlines()[0][:200]}); create no "
                             "other TensorFlow state before it, and check TF_CONFIG on every host") from None
    return _STRATEGIES.setdefault(name, strategy)


def worker(strategy) -> Worker:
    """This process's Worker under `strategy` (the lone chief unless multi-worker)."""
    if strategy is None or getattr(strategy, "cluster_resolver", None) is None:
        return Worker()
    return read_tf_config()[1]


def replicas(strategy) -> int:
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def scope(strategy):
    """`strategy.scope()`, or a no-op context for the default strategy."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def check_global_batch(batch_size: int, strategy, images: int | None = None) -> None:
    """Training splits every global batch evenly over the replicas (Keras needs the first batch
    even), so --batch-size must be a multiple of their number."""
    n = replicas(strategy)
    first = batch_size if images is None else min(batch_size, images)
    if first % n:
        what = (f"--batch-size {batch_size}" if first == batch_size
                else f"the training set ({images} images, under one --batch-size)")
        raise DogtlError(f"{what} must split evenly over the {n} replicas (the batch is global): use a "
                         f"multiple of {n}, e.g. --batch-size {max(n, batch_size // n * n)}")


def training_steps(images: int, batch_size: int, strategy) -> int:
    """Steps per epoch. With N replicas an epoch's last batch is dropped when it holds fewer than
    N images (a replica given none fails); each epoch is reshuffled, so no image is always left out."""
    steps, rest = divmod(images, batch_size)
    return steps + (1 if rest >= replicas(strategy) else 0)


def drop_small_batches(dataset, strategy):
    """`dataset` of (images, labels) without the batches `training_steps` does not count."""
    n = replicas(strategy)
    if n == 1:
        return dataset
    import tensorflow as tf

    return dataset.filter(lambda images, labels: tf.shape(images)[0] >= n)


def replicated_infer(strategy, model):
    """images [B, ...] -> model outputs [B, ...], each batch split over all replicas.

    The batch is padded to a multiple of the number of replicas (a replica given no rows
    fails in some kernels); the padding's outputs are dropped. All-gathered, so every worker
    of a multi-worker run gets every row.
    """
    import tensorflow as tf

    n = replicas(strategy)

    @tf.function(reduce_retracing=True)
    def infer(images):
        b = tf.shape(images)[0]
        per = (b + n - 1) // n
        pad = [[0, per * n - b]] + [[0, 0]] * (len(images.shape) - 1)
        padded = tf.pad(images, pad)
        local = strategy.experimental_distribute_values_from_function(
            lambda ctx: padded[ctx.replica_id_in_sync_group * per:(ctx.replica_id_in_sync_group + 1) * per])
        out = strategy.run(lambda x: model(x, training=False), args=(local,))
        return strategy.gather(out, axis=0)[:b]

    return infer


def agree(strategy, values, what: str) -> None:
    """Raise the same clear error on every worker when workers hold different `values`.

    Workers must run the same steps in lockstep; one that would start elsewhere (an
    interrupted run whose workers saved different progress) would make the others wait forever.
    """
    if strategy is None or worker(strategy).num_workers <= 1:
        return
    import numpy as np
    import tensorflow as tf

    mine = tf.constant([list(values)], tf.int64)
    local = strategy.experimental_distribute_values_from_function(lambda ctx: mine)
    everyone = np.asarray(strategy.gather(local, axis=0))
    if not (everyone == everyone[0]).all():
        raise DogtlError(f"the workers disagree on {what}: rerun the same command with --force on every worker "
                         "to start over together")


def extraction_progress(existing, partial, passes: dict) -> list[int]:
    """What this worker has extracted already, as numbers to `agree` on: whether the cache is
    complete, which clean passes are recorded, and how far each pass got."""
    values = [int(existing is not None)]
    started = existing is None and partial.exists()
    for split, extra in passes.items():  # the same length on every worker
        values.append(int(started and partial.load_json(f"{split}-readable.json") is not None))
        values += [partial.covered(split, p) if started else 0 for p in range(1 + extra)]
    return values


def data_sharding():
    """tf.data options for a strategy's input: each worker takes its replicas' slices of every
    global batch (DATA sharding; dogtl's datasets are built from file lists, not files)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def prepare_fit(model, strategy, element_spec):
    """The context to run `model.fit` in: under MultiWorkerMirroredStrategy, Keras 3's `fit`
    needs a workaround (`keras_private.multi_worker_fit`, tensorflow/tensorflow#72388), undone
    when the context ends; other strategies need nothing."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return contextlib.nullcontext()
    return multi_worker_fit(model, strategy, element_spec)
