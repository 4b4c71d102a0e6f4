"""tf.distribute strategy for ``train.distribute`` (one place decides how training is spread)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

MODES = ("auto", "none", "mirrored")

# device names -> the MirroredStrategy this process made for them (see make_strategy)
_MIRRORED: dict[tuple[str, ...], Any] = {}


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
    """
    import tensorflow as tf

    if mode not in MODES:
        raise ValueError(f"train.distribute: {mode!r} is not one of {', '.join(map(repr, MODES))}")
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
