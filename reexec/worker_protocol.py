"""What the scheduler and its workers share besides the generated messages of
`proto/reexec/worker/v1/worker.proto`: the stream's path and the metadata a worker sends."""

from __future__ import annotations

from reexec import fastpb

CONNECT = "/reexec.worker.v1.WorkerApi/Connect"
WorkerMessage = fastpb.message_class("reexec.worker.v1.WorkerMessage")
SchedulerMessage = fastpb.message_class("reexec.worker.v1.SchedulerMessage")

# Metadata on Connect carrying the secret that lets a worker register
# (scheduler.worker_token_file, or the per-process token of `reexecd serve`'s local worker).
WORKER_TOKEN_HEADER = "x-reexec-worker-token"
