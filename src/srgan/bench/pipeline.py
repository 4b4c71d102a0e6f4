"""Input pipeline: ``pipeline.train_dataset`` alone (crops/s), and the feed ratio: the G pretrain step
fed by that pipeline (as ``trainer.train`` feeds it) over the same step fed from a batch in memory.

Rounds of k steps alternate ABBA (memory, pipeline, pipeline, memory, ...), so load from other
processes that drifts during the measurement hits both feeds alike; the ratio is the total time
of all pipeline-fed rounds over all memory-fed ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import config
from .timing import CpuMeter, rate, stats

MAX_STEPS_PER_ROUND = 25


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Child job: crops/s of the pipeline alone, then the feed ratio on the trainer's G step."""
    from ..pipeline import train_dataset
    from ..trainer import Trainer, prepare_runtime

    cfg = config.from_dict(spec["cfg"])
    t, shards = cfg.train, Path(spec["shard_dir"])

    def batches() -> Any:
        return train_dataset(shards, t.batch_size, t.hr_patch, cfg.preprocess.scale, cfg.seed)

    it = iter(batches())
    for _ in range(spec["warmup_batches"]):
        next(it)
    per_crop = []
    with CpuMeter() as alone:
        for _ in range(spec["chunks"]):
            t0 = time.perf_counter()
            for _ in range(spec["chunk"]):
                next(it)
            per_crop.append((time.perf_counter() - t0) / (spec["chunk"] * t.batch_size))
    del it

    prepare_runtime(cfg)
    trainer = Trainer(cfg, "pretrain")
    step, it = trainer.pretrain_step, iter(trainer.strategy.experimental_distribute_dataset(batches()))
    mem = next(it)
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):  # the first call traces; both feeds warm up alike
        for b in (mem, next(it)):
            float(step(b)["g_mse"])
    # k steps per round: ~round_s seconds, so a fast step is not timed over milliseconds of noise
    k = int(min(max(round(spec["round_s"] * 2 * spec["warmup"] / (time.perf_counter() - t0)), 1),
                MAX_STEPS_PER_ROUND))
    times: dict[str, list[float]] = {"memory": [], "pipeline": []}

    def feed(source: str) -> None:
        t0 = time.perf_counter()
        for _ in range(k):
            float(step(mem if source == "memory" else next(it))["g_mse"])
        times[source].append((time.perf_counter() - t0) / k)

    with CpuMeter() as fed:
        for r in range(spec["rounds"]):
            for source in ("memory", "pipeline") if r % 2 == 0 else ("pipeline", "memory"):
                feed(source)
    return {"crops_per_s": rate(stats(per_crop)), "cpu_alone": alone.result, "steps_per_round": k,
            "rounds": spec["rounds"], "memory_s": stats(times["memory"]),
            "pipeline_s": stats(times["pipeline"]),
            "feed_ratio": sum(times["pipeline"]) / sum(times["memory"]), "cpu_fed": fed.result}
