#!/usr/bin/env bash
# GKE node pools for omni-platform. GENERATED from conf/cluster by `omni cluster node-pools`:
# edit conf/cluster and regenerate; tests/components/cluster/test_source_of_truth.py fails on drift.
# Usage: CLUSTER=my-cluster LOCATION=us-central1 [PROJECT=my-project] bash infra/gke/node-pools.sh
set -euo pipefail
: "${CLUSTER:?set CLUSTER}" "${LOCATION:?set LOCATION}"
project=(); [ -n "${PROJECT:-}" ] && project=(--project "$PROJECT")

# omni-cpu: data prep, registry, promotion, MLflow
gcloud container node-pools create omni-cpu --cluster "$CLUSTER" --location "$LOCATION" \
  "${project[@]}" \
  --machine-type=n2-standard-16 \
  --disk-size=200 \
  --enable-autoscaling \
  --min-nodes=1 \
  --max-nodes=6 \
  --node-labels=omni-platform/pool=cpu

# omni-gpu: GPU stages, evaluation, export, the predictor
gcloud container node-pools create omni-gpu --cluster "$CLUSTER" --location "$LOCATION" \
  "${project[@]}" \
  --machine-type=a3-highgpu-8g \
  --disk-size=500 \
  --enable-autoscaling \
  --min-nodes=0 \
  --max-nodes=4 \
  --node-labels=omni-platform/pool=gpu \
  --node-taints=nvidia.com/gpu=present:NoSchedule \
  --accelerator=type=nvidia-h100-80gb,count=8,gpu-driver-version=latest
