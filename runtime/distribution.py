"""tf.distribute for search and retraining: the strategy a spec asks for, and who writes files.

Every replica runs the same iteration on its slice of the global batch (the
global batch is split in order, so replica ``r`` of ``R`` takes rows
``r*B/R .. (r+1)*B/R``); every gradient and loss is averaged across replicas
before it is used, and the search network's batch normalisation averages its
statistics across replicas too, so a distributed search computes what one
device computes on the global batch. Variables are mirrored; each replica
applies the same averaged update to its own copy, so the alphas are identical
on every replica at every step. Only the chief writes the run directory.
"""

import itertools
import os

import tensorflow as tf

from keras_darts.spec import RunDirectoryError, SpecError


def make_strategy(config, source="<spec>"):
    """The ``tf.distribute.Strategy`` for a ``DistributeConfig``; ``None`` for ``none``."""
    name = config.strategy
    if name == "none":
        return None
    if name == "mirrored":
        devices = list(config.devices) if config.devices else None
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise SpecError.single(source, "$.distribute.strategy",
                                   "multi_worker needs the cluster in the TF_CONFIG environment variable")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise SpecError.single(source, "$.distribute.strategy", f"unknown strategy {name!r}")


def is_chief(strategy):
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def replica_slices(strategy, batch, split):
    """The global ``batch`` (a tuple of tensors) as per-replica slices, in replica order.

    ``split[i]`` says whether element ``i`` is per example (cut along its first
    axis) or shared (a seed: every replica gets it whole). Replica ``r`` of
    ``R`` takes rows ``r*n//R .. (r+1)*n//R``: equal slices when ``R`` divides
    ``n``, and slices differing by at most one row (an epoch's last, short
    batch) otherwise.
    """
    replicas = strategy.num_replicas_in_sync

    def slice_for(context):
        index = context.replica_id_in_sync_group
        parts = []
        for tensor, per_example in zip(batch, split):
            if per_example:
                known = tensor.shape[0]
                rows = tf.shape(tensor)[0]
                tensor = tensor[index * rows // replicas:(index + 1) * rows // replicas]
                if known is not None and known % replicas == 0:  # a batch of fixed size: so is each slice
                    tensor.set_shape([known // replicas, *tensor.shape[1:]])
            parts.append(tensor)
        return tuple(parts)

    return strategy.experimental_distribute_values_from_function(slice_for)


def run_on_replicas(strategy, fn, batch, split, *shared):
    """``fn(slice, *shared)`` on every replica's slice of the global ``batch`` (inside a ``tf.function``).

    ``fn`` must all-reduce what it returns; the first replica's copy is
    returned. Without a strategy it is ``fn(batch, *shared)``.
    """
    if strategy is None:
        return fn(batch, *shared)
    results = strategy.run(fn, args=(replica_slices(strategy, batch, split), *shared))
    return tf.nest.map_structure(lambda value: strategy.experimental_local_results(value)[0], results)


def _all_reduce(values, op):
    """``values`` reduced with ``op`` over replicas in a replica context; unchanged on one replica or outside.

    The values of each dtype travel as one flat vector, one all-reduce per
    dtype. The strategy would pack a list itself, but with a reshape, a size,
    a division and copies per tensor; over a search's hundreds of gradients and
    several reductions per step that made most of a replicated step's graph.
    The reduction is elementwise, so packing changes no value.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    flat = [tf.convert_to_tensor(v) for v in tf.nest.flatten(values)]
    reduced = [None] * len(flat)
    for dtype in dict.fromkeys(t.dtype for t in flat):
        positions = [i for i, t in enumerate(flat) if t.dtype == dtype]
        tensors = [flat[i] for i in positions]
        if len(tensors) == 1 or not all(t.shape.is_fully_defined() for t in tensors):
            # One tensor, or a shape known only at run time: the strategy's own reduction.
            for i, value in zip(positions, context.all_reduce(op, tensors)):
                reduced[i] = value
            continue
        flatten = tf.constant([-1])  # one constant for every reshape, not one each
        vector = context.all_reduce(op, tf.concat([tf.reshape(t, flatten) for t in tensors], 0))
        shapes = {}
        for i, t, part in zip(positions, tensors, tf.split(vector, [t.shape.num_elements() for t in tensors])):
            shape = tuple(t.shape.as_list())
            if shape not in shapes:
                shapes[shape] = tf.constant(shape, tf.int32)
            reduced[i] = tf.reshape(part, shapes[shape])
    return tf.nest.pack_sequence_as(values, reduced)


class ReplicaAllReduce:
    """Differentiable all-reduce sums that each replica of a MirroredStrategy makes on its own.

    A replica's ``ReplicaContext.all_reduce`` goes through ``merge_call`` on
    CPUs (and on GPUs outside XLA): every replica stops, and one thread reduces
    their values. That cannot happen inside a nested function, so passes whose
    batch norms all-reduce had to be traced into the step, once per call and per
    replica. Here each replica launches collective all-reduce ops itself, with
    TensorFlow's own launchers (one per device, in a group of their own): the
    instance keys are assigned at each call, so one pass called twice in a step
    reduces twice, and an ordering token per device keeps each device's
    collectives in one order. The gradient of a sum over replicas is the sum
    over replicas of the gradients, so the gradient is this reduction again, and
    so is its own (exact second order differentiates twice).
    """

    # A group of its own for each instance, apart from the strategy's own collectives (numbered from 1).
    _group_keys = itertools.count(1_000_000)

    def __init__(self, strategy):
        from tensorflow.python.distribute import collective_util, cross_device_utils

        devices = list(strategy.extended.worker_devices)
        keys = cross_device_utils.CollectiveKeys(group_key_start=next(self._group_keys))
        group = keys.get_group_key(devices)
        self.launchers = [cross_device_utils.CollectiveReplicaLauncher(group, len(devices), keys, device,
                                                                       collective_util.Options())
                          for device in devices]

    @staticmethod
    def available(strategy):
        """Whether ``strategy`` is a MirroredStrategy of several devices in this process (not multi-worker, not TPU)."""
        return isinstance(strategy, tf.distribute.MirroredStrategy) and strategy.num_replicas_in_sync > 1

    def sum(self, x):
        """``x`` summed over the replicas, on the replica whose function is being traced."""
        replica = int(tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group))
        launcher = self.launchers[replica]

        @tf.custom_gradient
        def summed(value):
            return launcher.all_reduce(value), self.sum

        return summed(x)


def cross_replica_mean(values):
    """Mean over replicas inside a replica context; unchanged on one replica or outside a strategy."""
    return _all_reduce(values, tf.distribute.ReduceOp.MEAN)


def cross_replica_sum(values):
    """Sum over replicas inside a replica context; unchanged on one replica or outside a strategy."""
    return _all_reduce(values, tf.distribute.ReduceOp.SUM)


def check_workers_agree(strategy, position, what, run_dir):
    """Raise ``RunDirectoryError`` on every worker unless all of them start ``what`` at ``position``.

    Workers resume from the checkpoints they find in ``run_dir``; a worker
    that cannot see the chief's (no shared filesystem) would start over and
    compute something else. Every worker calls this at the same point.
    """
    if strategy is None or strategy.num_replicas_in_sync == 1:
        return
    gathered = strategy.gather(strategy.run(lambda: tf.constant([position], tf.int64)), axis=0)
    positions = sorted({int(p) for p in gathered.numpy()})
    if len(positions) > 1:
        raise RunDirectoryError.single(
            run_dir, "checkpoints", f"the workers would start the {what} at different iterations "
            f"({', '.join(map(str, positions))}); give every worker the same run directory on a "
            f"filesystem they all share, or start over with --overwrite"
        )


def check_batch(spec, strategy):
    """The global batch must split evenly over the replicas."""
    if strategy is None:
        return
    replicas = strategy.num_replicas_in_sync
    sizes = [("data.batch_size", spec.data.batch_size)]
    if spec.retrain.enabled:
        sizes.append(("retrain.batch_size", spec.retrain.batch_size))
    for field, size in sizes:
        if size % replicas:
            raise SpecError.single(spec.source, f"$.{field}",
                                   f"{size} does not split evenly over {replicas} replicas; use a multiple of {replicas}")
