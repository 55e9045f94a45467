"""The trackers' files read back with each library's own reader, for the tracking tests:
TensorBoard's EventMultiplexer, MLflow's MlflowClient, and W&B's record protos (an offline run's
.wandb file is a log of `wandb_internal_pb2.Record`s; wandb 0.31 ships no Python reader for it,
so the framing is read here)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def tensorboard_runs(logdir) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Run (its folder under `logdir`) → scalar tag → [(step, value)], in step order."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    return {
        run: {tag: [(e.step, e.value) for e in mux.Scalars(run, tag)] for tag in tags["scalars"]}
        for run, tags in mux.Runs().items()
    }


def tensorboard_hparams(logdir, run: str) -> dict:
    """The HParams a run's folder holds (TensorBoard's hparams plugin data)."""
    from google.protobuf import json_format
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    content = mux.PluginRunToTagToContent("hparams")[run]["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: json_format.MessageToDict(v) for k, v in start.hparams.items()}


def mlflow_runs(tracking_uri: str, experiment: str) -> dict[str, dict]:
    """Run name → {status, params, tags, metrics: {key: [(step, value)] in step order}}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment} in {tracking_uri}"
    runs = {}
    for run in client.search_runs([found.experiment_id]):
        metrics = {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics
        }
        runs[run.info.run_name] = {
            "status": run.info.status,
            "params": run.data.params,
            "tags": run.data.tags,
            "metrics": metrics,
        }
    return runs


def wandb_runs(wandb_dir) -> dict[str, dict]:
    """Display name → {id, group, project, config, history: [{key: value}]} of every offline run
    under `wandb_dir` (its wandb/offline-run-*/run-*.wandb files)."""
    runs = {}
    for path in sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")):
        run, history = None, []
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                history.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
        assert run is not None, f"{path}: no run record"
        runs[run.display_name] = {
            "id": run.run_id,
            "group": run.run_group,
            "project": run.project,
            "config": {i.key: json.loads(i.value_json) for i in run.config.update},
            "history": history,
        }
    return runs


BLOCK = 32 * 1024
HEADER = 7  # checksum (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file: after its 7-byte ":W&B" header, the LevelDB log
    format (32 KiB blocks of chunks; a record split across blocks is FIRST, MIDDLE..., LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0:  # zeros: padding up to the next block
            position += left_in_block
            continue
        start = position + HEADER
        pending += data[start : start + length]
        position = start + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
