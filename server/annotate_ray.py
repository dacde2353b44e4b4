"""`vidsieve annotate --engine ray`: the same job on Ray Data, for more than one machine.

    from_items(work items)              read stage: the input list, split into blocks
      .map(prepare_row)                 decode tasks: hash, skip what is done, decode
      .map(Answerer, concurrency=n)     the model in an actor pool, one GPU each when the cluster has GPUs
      .iter_rows()  ──►  write_results  the driver appends every record, exactly as the local engine does

The driver reads the output file, ships the finished ids to the decode tasks and is the only
writer, so ids, records and resume semantics are the local engine's. It joins the cluster at
`--ray-address`, else RAY_ADDRESS, else starts a local one for the job. Every node needs
vidsieve installed (`pip install vidsieve[ray]`) and the videos at the same paths; relative
paths are taken from the driver's working folder.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time

from compressors import parse_spec
from kernels.errors import VidsieveError
from server.annotate import (AnnotateJob, ClipResult, Summary, answer_clip, answering_model_name, finished_ids,
                             write_results)
from server.annotate_log import AnnotationLog
from server.annotate_work import IdSet, PrepareSettings, WorkItem, prepare_clip
from vlm.model import VLM
from vlm.reuse import ReuseSpec


class RayUnavailableError(VidsieveError):
    """`--engine ray` without Ray installed."""


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayUnavailableError("--engine ray needs Ray, an optional extra: pip install 'vidsieve[ray]'") from None
    return ray


def run_annotation_on_ray(job: AnnotateJob, model: VLM, *, model_source: str, device: str | None = None,
                          dtype: str | None = None, address: str | None = None, actors: int | None = None,
                          progress: bool = True) -> Summary:
    """Annotate on a Ray cluster whose actors load `model_source`; `model`, the driver's copy,
    only names the answers (every actor must load a model of the same name)."""
    ray = import_ray()
    started = time.perf_counter()
    started_cluster = not ray.is_initialized()
    if started_cluster:
        joining = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, logging_level=logging.WARNING,
                 **({} if joining else {"include_dashboard": False}))
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours is the one progress bar
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        gpus = ray.cluster_resources().get("GPU", 0) if device != "cpu" else 0
        gpus_per_actor = 1 if gpus >= 1 else 0
        with AnnotationLog(job.out, overwrite=job.overwrite) as log:
            ok_ids, skip_error_ids = finished_ids(log, job.retry_failed)
            rows = [{"video": item.video, "questions": json.dumps(item.questions)} for item in job.items]
            answered = (
                ray.data.from_items(rows)
                .map(prepare_row, fn_kwargs={
                    "settings": PrepareSettings(answering_model_name(model), job.spec.text, job.plan),
                    "ok_ids": ok_ids, "skip_error_ids": skip_error_ids, "folder": os.getcwd()})
                # One clip per block: actors take clips one at a time as they are decoded. Being a
                # streaming stage, it also keeps Ray Data from fusing the decode tasks into the
                # actors (as it does when their resources match), so decoding overlaps inference.
                .repartition(target_num_rows_per_block=1)
                .map(Answerer, fn_constructor_kwargs={
                    "model_source": model_source, "model_name": answering_model_name(model),
                    "attention": str(model.runner.attention_spec), "spec_text": job.spec.text,
                    "max_new_tokens": job.max_new_tokens, "device": "cuda" if gpus_per_actor else device,
                    "dtype": dtype, "reuse": str(job.reuse)},
                    compute=ray.data.ActorPoolStrategy(size=actors or max(1, int(gpus))),
                    num_gpus=gpus_per_actor)
            )
            results = (ClipResult(json.loads(row["records"]), row["skipped_ok"], row["skipped_errors"])
                       for row in answered.iter_rows())
            return write_results(log, results, total_videos=len(job.items), started=started, progress=progress)
    finally:
        if started_cluster:
            ray.shutdown()


def prepare_row(row: dict, *, settings: PrepareSettings, ok_ids: IdSet, skip_error_ids: IdSet, folder: str) -> dict:
    """Decode task: one input row -> the prepared clip, pickled (frames are ragged across videos)."""
    item = WorkItem(row["video"], tuple(json.loads(row["questions"])))
    clip = prepare_clip(item, settings, ok_ids, skip_error_ids, folder=folder)
    return {"clip": pickle.dumps(clip, protocol=pickle.HIGHEST_PROTOCOL)}


class Answerer:
    """One model replica in the actor pool: prepared clip in, its records out (as JSON text)."""

    def __init__(self, *, model_source: str, model_name: str, attention: str, spec_text: str, max_new_tokens: int,
                 device: str | None, dtype: str | None, reuse: str = "none"):
        self.model = VLM.from_pretrained(model_source, device=device, dtype=dtype, attention=attention)
        loaded = answering_model_name(self.model)
        if loaded != model_name:  # ids name the model: every replica must be the same one
            raise VidsieveError(f"the Ray actor loaded {loaded!r} from {model_source!r}, the driver {model_name!r}")
        self.spec = parse_spec(spec_text)
        self.max_new_tokens = max_new_tokens
        self.reuse = ReuseSpec.parse(reuse)

    def __call__(self, row: dict) -> dict:
        clip = pickle.loads(row["clip"])
        records = answer_clip(self.model, clip, self.spec, self.max_new_tokens, self.reuse)
        return {"records": json.dumps(records, ensure_ascii=False), "skipped_ok": clip.skipped_ok,
                "skipped_errors": clip.skipped_errors}
