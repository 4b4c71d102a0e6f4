"""Input pipeline: ``pipeline.train_dataset`` alone (crops/s), and the feed ratio: the G pretrain step
fed by that pipeline (as ``trainer.train`` feeds it) over the same step fed from a batch in memory.

Both ways the pipeline can run are measured: as training runs it (``train.cache_mb``: crops decoded
once into memory when they fit) and streamed (every record read, parsed and cut per batch).
Rounds of k steps rotate through the feeds (memory, cached, streamed, then the reverse, ...), so
load from other processes that drifts during the measurement hits every feed alike; a ratio is the
total time of all rounds of that feed over all memory-fed ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import config
from .timing import CpuMeter, rate, stats

PROBE_STEPS = 5  # steps timed after warm-up to size the rounds
MAX_STEPS_PER_ROUND = 250  # a round long enough (~round_s) that VM and clock noise average out
FEEDS = ("memory", "pipeline", "streamed")  # pipeline: as training runs it (train.cache_mb)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child job: crops/s of the pipeline alone (both ways), then the feed ratios on the G step."""
    from ..pipeline import MB, fits_in_memory, train_dataset
    from ..trainer import Trainer, prepare_runtime

    cfg = config.from_dict(spec["cfg"])
    t, shards = cfg.train, Path(spec["shard_dir"])

    def batches(cache_mb: int) -> Any:
        return train_dataset(shards, t.batch_size, t.hr_patch, cfg.preprocess.scale, cfg.seed,
                             cache_bytes=cache_mb * MB)

    def alone(cache_mb: int) -> dict[str, Any]:
        it = iter(batches(cache_mb))
        for _ in range(spec["warmup_batches"]):
            next(it)
        per_crop = []
        with CpuMeter() as cpu:
            for _ in range(spec["chunks"]):
                t0 = time.perf_counter()
                for _ in range(spec["chunk"]):
                    next(it)
                per_crop.append((time.perf_counter() - t0) / (spec["chunk"] * t.batch_size))
        return {"crops_per_s": rate(stats(per_crop)), "cpu": cpu.result}

    solo = {"pipeline": alone(t.cache_mb), "streamed": alone(0)}
    runtime = prepare_runtime(cfg)
    trainer = Trainer(cfg, "pretrain", runtime)
    step = trainer.pretrain_step
    its = {"pipeline": iter(trainer.strategy.experimental_distribute_dataset(batches(t.cache_mb))),
           "streamed": iter(trainer.strategy.experimental_distribute_dataset(batches(0)))}
    mem = next(its["pipeline"])

    def batch(source: str) -> Any:
        return mem if source == "memory" else next(its[source])

    for _ in range(spec["warmup"]):  # the first call traces; every feed warms up alike
        for source in FEEDS:
            float(step(batch(source))["g_mse"])
    t0 = time.perf_counter()
    for _ in range(PROBE_STEPS):
        float(step(mem)["g_mse"])
    # k steps per round: ~round_s seconds, so a fast step is not timed over milliseconds of noise
    k = int(min(max(round(spec["round_s"] * PROBE_STEPS / (time.perf_counter() - t0)), 1), MAX_STEPS_PER_ROUND))
    times: dict[str, list[float]] = {f: [] for f in FEEDS}

    def feed(source: str) -> None:
        t0 = time.perf_counter()
        for _ in range(k):
            float(step(batch(source))["g_mse"])
        times[source].append((time.perf_counter() - t0) / k)

    with CpuMeter() as fed:
        for r in range(spec["rounds"]):
            for source in FEEDS if r % 2 == 0 else FEEDS[::-1]:
                feed(source)
    ratio = {f: sum(times[f]) / sum(times["memory"]) for f in FEEDS[1:]}
    return {"cached": fits_in_memory(sorted(shards.glob("*.tfrecord")), t.cache_mb * MB), "precision": runtime.precision, "crops_per_s": solo["pipeline"]["crops_per_s"],
            "cpu_alone": solo["pipeline"]["cpu"], "streamed_crops_per_s": solo["streamed"]["crops_per_s"],
            "steps_per_round": k, "rounds": spec["rounds"], "memory_s": stats(times["memory"]),
            "pipeline_s": stats(times["pipeline"]), "streamed_s": stats(times["streamed"]),
            "feed_ratio": ratio["pipeline"], "feed_ratio_streamed": ratio["streamed"], "cpu_fed": fed.result}
