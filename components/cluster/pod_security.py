"""The Pod Security Standards as the admission controller of Kubernetes 1.31 applies them, offline.

A namespace labelled `pod-security.kubernetes.io/enforce: restricted` refuses every pod that breaks
one of these rules, including containers other controllers add (KServe's storage initializer,
Knative's queue-proxy). `violations(pod_spec, level)` lists what a pod spec breaks, one message per
rule and container, in the words of the policy ("allowPrivilegeEscalation != false (container
storage-initializer)"). The rule set is the one of the pinned Kubernetes version (the chart's
kubeVersion floor, `KUBE_VERSION`); newer versions only relax it for fields we do not use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

KUBE_VERSION = "1.31"
Level = Literal["privileged", "baseline", "restricted"]
LEVELS: tuple[Level, ...] = ("privileged", "baseline", "restricted")

_BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                          "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                 "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                 "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                 "net.ipv4.tcp_keepalive_probes"}
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def containers(pod: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every container the policy looks at: init, regular and ephemeral."""
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def _sc(container: Mapping[str, Any]) -> Mapping[str, Any]:
    return container.get("securityContext") or {}


def _each(pod: Mapping[str, Any], bad: Callable[[Mapping[str, Any]], str | None]) -> list[str]:
    return [f"{why} (container {c.get('name')})" for c in containers(pod) if (why := bad(c))]


def _baseline(pod: Mapping[str, Any]) -> list[str]:
    psc = pod.get("securityContext") or {}
    out = [f"host namespaces ({k}=true)" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    out += [f"hostPath volume {v.get('name')}" for v in pod.get("volumes") or [] if "hostPath" in v]
    out += [f"forbidden sysctl {s['name']}" for s in psc.get("sysctls") or [] if s["name"] not in _SAFE_SYSCTLS]
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod seccompProfile type Unconfined")
    if (psc.get("seLinuxOptions") or {}).get("type", "") not in _SELINUX_TYPES:
        out.append("pod seLinuxOptions type not allowed")
    if (psc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        out.append("pod appArmorProfile Unconfined")
    out += _each(pod, lambda c: "privileged" if _sc(c).get("privileged") else None)
    out += _each(pod, lambda c: ("non-default capabilities " + ",".join(sorted(extra))
                                 if (extra := set((_sc(c).get("capabilities") or {}).get("add") or [])
                                     - _BASELINE_CAPABILITIES) else None))
    out += _each(pod, lambda c: "hostPort" if any(p.get("hostPort") for p in c.get("ports") or []) else None)
    out += _each(pod, lambda c: "procMount" if _sc(c).get("procMount") not in (None, "Default") else None)
    out += _each(pod, lambda c: "seccompProfile Unconfined"
                 if (_sc(c).get("seccompProfile") or {}).get("type") == "Unconfined" else None)
    out += _each(pod, lambda c: "seLinuxOptions type not allowed"
                 if (_sc(c).get("seLinuxOptions") or {}).get("type", "") not in _SELINUX_TYPES else None)
    out += _each(pod, lambda c: "appArmorProfile Unconfined"
                 if (_sc(c).get("appArmorProfile") or {}).get("type") == "Unconfined" else None)
    return out


def _restricted(pod: Mapping[str, Any]) -> list[str]:
    psc = pod.get("securityContext") or {}
    out = [f"restricted volume type {k} ({v.get('name')})" for v in pod.get("volumes") or []
           for k in v if k != "name" and k not in _RESTRICTED_VOLUMES]
    out += _each(pod, lambda c: None if _sc(c).get("allowPrivilegeEscalation") is False
                 else "allowPrivilegeEscalation != false")
    pod_nonroot = psc.get("runAsNonRoot") is True
    out += _each(pod, lambda c: "runAsNonRoot != true" if _sc(c).get("runAsNonRoot") is False
                 or (not pod_nonroot and _sc(c).get("runAsNonRoot") is not True) else None)
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser=0")
    out += _each(pod, lambda c: "runAsUser=0" if _sc(c).get("runAsUser") == 0 else None)
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    out += _each(pod, lambda c: None if (_sc(c).get("seccompProfile") or {}).get("type") in ("RuntimeDefault",
                                                                                            "Localhost")
                 or (pod_seccomp and "seccompProfile" not in _sc(c))
                 else "seccompProfile.type must be RuntimeDefault or Localhost")
    out += _each(pod, lambda c: None if "ALL" in ((_sc(c).get("capabilities") or {}).get("drop") or [])
                 else "capabilities.drop must include ALL")
    out += _each(pod, lambda c: ("capabilities.add other than NET_BIND_SERVICE"
                                 if set((_sc(c).get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}
                                 else None))
    return out


def violations(pod: Mapping[str, Any], level: Level) -> list[str]:
    """What `pod` (a PodSpec as a dict) breaks at `level`; [] means admitted."""
    if level not in LEVELS:
        raise ValueError(f"unknown Pod Security level {level!r}; one of {', '.join(LEVELS)}")
    if level == "privileged":
        return []
    return _baseline(pod) + (_restricted(pod) if level == "restricted" else [])


def pod_templates(doc: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(where, pod spec) for each pod an object will create: workloads, CronJobs and the Trainer's
    runtime. ServingRuntimes are assembled into pods by `serving_pod` instead."""
    kind, spec, name = doc.get("kind"), doc.get("spec") or {}, (doc.get("metadata") or {}).get("name")
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield f"{kind}/{name}", spec["template"]["spec"]
    elif kind == "CronJob":
        yield f"{kind}/{name}", spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        for job in spec["template"]["spec"]["replicatedJobs"]:
            yield f"{kind}/{name}/{job['name']}", job["template"]["spec"]["template"]["spec"]
