"""Field-by-field checks of the custom resources the chart renders.

kubernetes-validate knows only built-in kinds, so ServiceMonitor and PrometheusRule
(monitoring.coreos.com/v1) and ScaledObject and TriggerAuthentication (keda.sh/v1alpha1)
are checked here against the fields their CRDs define (written from the projects'
API references) and the value types the controllers expect: every key must be known,
every value of the right type. Only the parts of the APIs the chart may use are listed;
an unknown key is an error either way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MapOf:
    """A mapping with arbitrary keys whose values have one shape."""
    value: Any


@dataclass(frozen=True)
class Req:
    """A required field."""
    shape: Any


@dataclass(frozen=True)
class Pattern:
    """A string matching a regular expression."""
    regex: str


DURATION = Pattern(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
LABEL_SELECTOR = {
    "matchLabels": MapOf(str),
    "matchExpressions": [{"key": Req(str), "operator": Req(str), "values": [str]}],
}
RELABEL = {"sourceLabels": [str], "separator": str, "targetLabel": str, "regex": str,
           "modulus": int, "replacement": str, "action": str}

SERVICE_MONITOR_SPEC = {
    "jobLabel": str,
    "targetLabels": [str],
    "podTargetLabels": [str],
    "sampleLimit": int,
    "selector": Req(LABEL_SELECTOR),
    "namespaceSelector": {"any": bool, "matchNames": [str]},
    "endpoints": Req([{
        "port": str, "targetPort": (int, str), "path": str, "scheme": Pattern(r"^https?$"),
        "params": MapOf([str]), "interval": DURATION, "scrapeTimeout": DURATION,
        "honorLabels": bool, "honorTimestamps": bool, "followRedirects": bool, "enableHttp2": bool,
        "filterRunning": bool, "relabelings": [RELABEL], "metricRelabelings": [RELABEL],
        "tlsConfig": dict, "authorization": dict, "bearerTokenSecret": dict,
    }]),
}

PROMETHEUS_RULE_SPEC = {
    "groups": Req([{
        "name": Req(str), "interval": DURATION, "limit": int, "partial_response_strategy": str,
        "rules": Req([{
            "alert": str, "record": str, "expr": Req((str, int)), "for": DURATION,
            "keep_firing_for": DURATION, "labels": MapOf(str), "annotations": MapOf(str),
        }]),
    }]),
}

# Keys the redis-streams scaler reads (KEDA scaler docs); all values are strings.
REDIS_STREAMS_METADATA = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
}

# TriggerAuthentication parameters the Redis scalers read from authParams (KEDA
# pkg/scalers/redis_scaler.go, redisConnectionInfo / redisMetadata).
REDIS_AUTH_PARAMS = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                     "sentinelUsername", "sentinelPassword", "sentinelMaster", "tls", "ca", "cert", "key",
                     "keyPassword"}

SCALED_OBJECT_SPEC = {
    "scaleTargetRef": Req({"name": Req(str), "kind": str, "apiVersion": str, "envSourceContainerName": str}),
    "pollingInterval": int,
    "cooldownPeriod": int,
    "initialCooldownPeriod": int,
    "idleReplicaCount": int,
    "minReplicaCount": int,
    "maxReplicaCount": int,
    "fallback": {"failureThreshold": Req(int), "replicas": Req(int)},
    "advanced": {"restoreToOriginalReplicaCount": bool, "horizontalPodAutoscalerConfig": dict,
                 "scalingModifiers": dict},
    "triggers": Req([{
        "type": Req(str), "name": str, "metadata": Req(MapOf(str)), "metricType": str,
        "useCachedMetrics": bool, "authenticationRef": {"name": Req(str), "kind": str},
    }]),
}

TRIGGER_AUTHENTICATION_SPEC = {
    "secretTargetRef": [{"parameter": Req(str), "name": Req(str), "key": Req(str)}],
    "env": [{"parameter": Req(str), "name": Req(str), "containerName": str}],
    "podIdentity": dict,
}

SPECS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SPEC,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SPEC,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT_SPEC,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION_SPEC,
}
CRD_API_GROUPS = ("monitoring.coreos.com/", "keda.sh/")


def check(value: Any, shape: Any, where: str) -> list[str]:
    """Problems of `value` against `shape` (dict = object with known keys, [s] = list of s)."""
    if isinstance(shape, Req):
        shape = shape.shape
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        errors = [f"{where}.{k}: unknown field" for k in value if k not in shape]
        errors += [f"{where}.{k}: required" for k, s in shape.items() if isinstance(s, Req) and k not in value]
        for k, v in value.items():
            if k in shape:
                errors += check(v, shape[k], f"{where}.{k}")
        return errors
    if isinstance(shape, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [e for i, v in enumerate(value) for e in check(v, shape[0], f"{where}[{i}]")]
    if isinstance(shape, MapOf):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        return [e for k, v in value.items() for e in check(v, shape.value, f"{where}.{k}")]
    if isinstance(shape, Pattern):
        if not isinstance(value, str) or not re.match(shape.regex, value):
            return [f"{where}: {value!r} does not match {shape.regex}"]
        return []
    types = shape if isinstance(shape, tuple) else (shape,)
    if isinstance(value, bool) and bool not in types:
        return [f"{where}: expected {types}, got a boolean"]
    if not isinstance(value, types):
        return [f"{where}: expected {'/'.join(t.__name__ for t in types)}, got {type(value).__name__} {value!r}"]
    return []


def check_custom_resource(obj: dict) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    if key not in SPECS:
        return [f"{key}: no field specification for this custom resource"]
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    errors = check(obj, {"apiVersion": Req(str), "kind": Req(str),
                         "metadata": Req({"name": Req(str), "namespace": str, "labels": MapOf(str),
                                          "annotations": MapOf(str)}),
                         "spec": Req(SPECS[key])}, where)
    if obj["kind"] == "TriggerAuthentication":
        for i, ref in enumerate(obj["spec"].get("secretTargetRef", [])):
            if ref.get("parameter") not in REDIS_AUTH_PARAMS:
                errors.append(f"{where}.spec.secretTargetRef[{i}].parameter: {ref.get('parameter')!r} "
                              "is not a redis scaler auth parameter")
    if obj["kind"] == "ScaledObject":
        for i, t in enumerate(obj["spec"].get("triggers", [])):
            if t.get("type") == "redis-streams":
                unknown = set(t.get("metadata", {})) - REDIS_STREAMS_METADATA
                errors += [f"{where}.spec.triggers[{i}].metadata.{k}: unknown redis-streams key"
                           for k in sorted(unknown)]
    return errors
