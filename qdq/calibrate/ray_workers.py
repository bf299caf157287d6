"""Calibration shards as Ray tasks: the one module that imports ``ray`` (an optional extra, ``qdq[ray]``).

Each task rebuilds its ONNX Runtime session from the model's bytes (put in Ray's object store once) and returns
only its statistics. Ray reruns a task whose worker died or raised (``max_retries``); a QdqError (bad data) is
not retried, as it would fail the same way.
"""

from __future__ import annotations

import logging

from qdq.calibrate.data import Dataset
from qdq.calibrate.options import CalibrationOptions
from qdq.calibrate.shards import ATTEMPTS, ShardResult, observe_shard, plan_shards
from qdq.errors import CalibrationError, MissingDependencyError, QdqError

log = logging.getLogger(__name__)


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError("--ray needs Ray: pip install \"qdq[ray]\" (or pip install ray), or calibrate "
                                     "with --workers N on this machine") from exc
    return ray


def run_on_ray(model_bytes: bytes, names: list[str], data: Dataset, runs: int, options: CalibrationOptions
               ) -> list[ShardResult]:
    """Run every shard as a Ray task on the cluster at ``options.ray_address`` (``""``: a local Ray)."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=options.ray_address or None, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
    try:
        count = options.workers if options.workers > 1 else max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(max_retries=ATTEMPTS - 1, retry_exceptions=True)(observe_or_refuse)
        model_ref, data_ref = ray.put(model_bytes), ray.put(data)
        refs = [task.remote(model_ref, names, data_ref, shard, options) for shard in plan_shards(runs, count)]
        try:
            results = list(ray.get(refs))
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
            raise CalibrationError(f"a calibration shard failed on Ray after {ATTEMPTS} attempts: "
                                   f"{str(exc).splitlines()[0]}") from exc
        if refused := next((r for r in results if isinstance(r, QdqError)), None):
            raise refused
        return results
    finally:
        if started_here:
            ray.shutdown()


def observe_or_refuse(*args) -> ShardResult | QdqError:
    """A shard's task. qdq's own errors (bad data or model) come back as values: Ray retries only what raises."""
    try:
        return observe_shard(*args)
    except QdqError as exc:
        return exc
