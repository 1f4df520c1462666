#!/usr/bin/env bash
# TPU VM pod slice: the SAME command on every worker; one process per worker drives its chips.
#
# From your machine (installs and starts on all workers of the slice at once):
#   TPU=my-v4-32 ZONE=us-central2-b
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
#     "git clone https://github.com/<you>/nas_jax && cd nas_jax && bash scripts/install.sh && \
#      .venv/bin/pip install -U 'jax[tpu]>=0.11.2,<0.13'"
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
#     "cd nas_jax && bash launch/tpu_pod.sh configs/stage1.py /mnt/shared/runs/s1 --config.model.dtype=bfloat16"
#
# WORKDIR must be a directory all workers see (Filestore/NFS or a gcsfuse mount of a bucket):
# every worker writes its shards of each checkpoint there (orbax multi-host), process 0 the
# metrics. jax.distributed.initialize() (called by the trainer) detects the TPU pod by itself: no
# coordinator address is needed. Each worker loads only its 1/num_workers of every global batch.
# Every worker logs at start
#   "process i/n, <local> local / <global> global devices (tpu), mesh {'data': .., 'fsdp': ..}".
# Stopping: Ctrl-C in the gcloud ssh session signals every worker; the trainer saves and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
WORKDIR=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
PY=${PYTHON:-.venv/bin/python}
source launch/xla_env.sh
# (No jax call here: on a pod slice the TPU runtime must be opened once, by the trainer.)
echo "[launch] TPU worker $(hostname) (TPU_WORKER_ID=${TPU_WORKER_ID:-?}); devices and mesh: see the trainer's first lines"
exec "$PY" -m nas_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
