#!/usr/bin/env bash
# Install the cluster services omni-platform runs on, in order, at pinned versions.
#
#   bash infra/install.sh            # every step, in order
#   bash infra/install.sh kserve     # one step (cert-manager, knative, kserve, trainer, kfp)
#
# Needs kubectl >= 1.31 pointed at the target cluster with cluster-admin rights (these are
# cluster-scoped installs; the platform itself needs none, see charts/omni-platform).
# The order matters: KServe's webhooks need cert-manager's certificates and Knative's CRDs; the
# Trainer brings JobSet; KFP is independent but its UI is where runs are started.
# Versions: KServe and the Trainer match the CRD schemas our manifests are validated against
# (serving/crds/README.md); KFP matches kfp-server-api in constraints.txt.
set -euo pipefail

CERT_MANAGER_VERSION=v1.17.2
KNATIVE_SERVING_VERSION=knative-v1.18.1
KNATIVE_KOURIER_VERSION=knative-v1.18.0
KSERVE_VERSION=v0.20.0
TRAINER_VERSION=v2.3.0
KFP_VERSION=2.17.3

# Settings generated from conf/cluster (components/cluster/cluster_wide.py); pass Hydra overrides in OMNI_OVERRIDES.
omni_conf() {  # what
  "${OMNI_PYTHON:-.venv/bin/python}" -m components.cluster.cluster_wide "$1" ${OMNI_OVERRIDES:-}
}

wait_deployments() {  # namespace
  kubectl wait --for=condition=Available --timeout=600s deployment --all -n "$1"
}

cert_manager() {
  kubectl apply -f "https://github.com/cert-manager/cert-manager/releases/download/${CERT_MANAGER_VERSION}/cert-manager.yaml"
  wait_deployments cert-manager
}

knative() {
  # Serverless mode: KServe's canaryTrafficPercent splits traffic between Knative revisions.
  kubectl apply -f "https://github.com/knative/serving/releases/download/${KNATIVE_SERVING_VERSION}/serving-crds.yaml"
  kubectl apply -f "https://github.com/knative/serving/releases/download/${KNATIVE_SERVING_VERSION}/serving-core.yaml"
  kubectl apply -f "https://github.com/knative/net-kourier/releases/download/${KNATIVE_KOURIER_VERSION}/kourier.yaml"
  kubectl patch configmap/config-network -n knative-serving --type merge \
    -p '{"data":{"ingress-class":"kourier.ingress.networking.knative.dev"}}'
  # The champion InferenceService sets nodeSelector/tolerations (GPU pool); Knative refuses them
  # unless these features are on. secure-pod-defaults makes queue-proxy pass Pod Security "restricted".
  kubectl patch configmap/config-features -n knative-serving --type merge -p \
    '{"data":{"kubernetes.podspec-nodeselector":"enabled","kubernetes.podspec-tolerations":"enabled","secure-pod-defaults":"enabled"}}'
  # The domain of every Knative route (cluster.ingress.domain): Kourier routes <ksvc>.<ns>.<domain>.
  kubectl patch configmap/config-domain -n knative-serving --type merge -p "$(omni_conf knative-domain)"
  # A /v1/realtime session is one WebSocket, one long request to every proxy: Knative must allow the
  # InferenceService's timeout (serving.realtime.max_session_s + 60 s) and put no idle timeout on it;
  # the activator drains that long; Envoy in Kourier keeps an idle stream as long.
  kubectl patch configmap/config-defaults -n knative-serving --type merge -p "$(omni_conf knative-timeouts)"
  kubectl patch deployment/activator -n knative-serving --type merge -p "$(omni_conf activator-grace)"
  kubectl patch configmap/config-kourier -n knative-serving --type merge -p "$(omni_conf kourier-timeouts)"
  wait_deployments knative-serving
  wait_deployments kourier-system
}

kserve() {
  kubectl apply --server-side -f "https://github.com/kserve/kserve/releases/download/${KSERVE_VERSION}/kserve.yaml"
  wait_deployments kserve
  kubectl apply --server-side -f "https://github.com/kserve/kserve/releases/download/${KSERVE_VERSION}/kserve-cluster-resources.yaml"
  # The storage initializer KServe injects must pass Pod Security "restricted": its `default`
  # ClusterStorageContainer again, with a restricted securityContext.
  omni_conf storage-container | kubectl apply --server-side --force-conflicts -f -
  # No Istio: status.url must be the predictor's Knative host (routed by Kourier), not KServe's
  # top-level VirtualService host.
  local ingress
  ingress=$(kubectl -n kserve get configmap inferenceservice-config -o jsonpath='{.data.ingress}')
  kubectl -n kserve patch configmap inferenceservice-config --type merge -p "$(printf '%s' "$ingress" | omni_conf kserve-ingress)"
}

trainer() {
  kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/manifests/overlays/manager?ref=${TRAINER_VERSION}"
  wait_deployments kubeflow-system
}

kfp() {
  kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=${KFP_VERSION}"
  kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
  kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=${KFP_VERSION}"
  wait_deployments kubeflow
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(cert_manager knative kserve trainer kfp)
for step in "${steps[@]}"; do
  step=${step//-/_}
  echo "== ${step}"
  "$step"
done
