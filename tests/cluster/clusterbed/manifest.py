"""What the kubelet reads from the rendered chart: workloads, Services, Secrets, ConfigMaps, and
for one container of one pod its environment, command line and volume mounts.

The rules are Kubernetes' own, kept to what a chart can use:
- `$(VAR)` in env values, command and args expands to a variable defined earlier in the
  container's env (command/args: anywhere in it); `$$(VAR)` is a literal `$(VAR)`; an
  unknown reference stays as written (k8s.io/kubernetes third_party/forked/golang/expansion).
- env `valueFrom`: the downward API (`fieldRef`, `resourceFieldRef`), `secretKeyRef`,
  `configMapKeyRef`; `envFrom` Secrets and ConfigMaps with their prefix.
- volumes: `configMap`, `secret` (files, `items`, `defaultMode`), `emptyDir` (a directory; a
  tmpfs for `medium: Memory`), `persistentVolumeClaim` (a directory the bed maps the claim
  to) and a StatefulSet's `volumeClaimTemplates` (one directory per pod, kept across restarts).
"""
from __future__ import annotations

import base64
import dataclasses
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

WORKLOAD_KINDS = ("Deployment", "StatefulSet")


class ManifestError(RuntimeError):
    """The pod cannot be started as rendered (Kubernetes would report CreateContainerConfigError)."""


# --- $(VAR) expansion ---------------------------------------------------------------------

def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes' `expansion.Expand`: replace `$(NAME)` by lookup(NAME) when it is defined."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":                      # escaped operator: "$$" -> "$"
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    value = lookup(name)
                    out.append(value if value is not None else f"$({name})")
                    i = end + 1
                    continue
            out.append("$" + nxt)               # not a reference: keep both characters
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


# --- objects of the release ------------------------------------------------------------------

def _decoded(secret: dict) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def _config_data(cm: dict) -> dict[str, bytes]:
    data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
    return data


class Release:
    """The rendered objects of one release, indexed the way the kubelet looks them up."""

    def __init__(self, objects: list[dict], namespace: str):
        self.objects = objects
        self.namespace = namespace
        self.secrets = {o["metadata"]["name"]: _decoded(o) for o in objects if o["kind"] == "Secret"}
        self.configmaps = {o["metadata"]["name"]: _config_data(o) for o in objects if o["kind"] == "ConfigMap"}
        self.services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
        self.workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOAD_KINDS}

    def workload(self, suffix: str) -> dict:
        """The one workload whose name is `suffix` or ends in `-suffix` (e.g. "rollout")."""
        found = [w for n, w in self.workloads.items() if n == suffix or n.endswith(f"-{suffix}")]
        if len(found) != 1:
            raise KeyError(f"expected one workload named *-{suffix}, found {sorted(self.workloads)}")
        return found[0]


# --- one pod ---------------------------------------------------------------------------------

@dataclasses.dataclass
class PodIdentity:
    """What the downward API can tell a pod about itself."""

    name: str
    namespace: str
    uid: str
    ip: str
    node_name: str
    node_ip: str
    labels: dict[str, str]
    annotations: dict[str, str]
    spec: dict

    def field(self, path: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return (self.labels if m.group(1) == "labels" else self.annotations).get(m.group(2), "")
        values = {
            "metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
            "status.podIP": self.ip, "status.podIPs": self.ip, "status.hostIP": self.node_ip,
            "status.hostIPs": self.node_ip, "spec.nodeName": self.node_name,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
        }
        if path not in values:
            raise ManifestError(f"fieldRef {path!r} is not supported by the downward API")
        return values[path]


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTOR = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2 ** 10, "Mi": 2 ** 20,
           "Gi": 2 ** 30, "Ti": 2 ** 40}


def quantity(q: str | int | float) -> float:
    m = _QUANTITY.match(str(q))
    if not m:
        raise ManifestError(f"not a quantity: {q!r}")
    return float(m.group(1)) * _FACTOR[m.group(2)]


def _resource_field(ref: dict, container: dict) -> str:
    """resourceFieldRef: limits.cpu etc.; an unset limit reads as the machine's capacity (the node's allocatable)."""
    kind, resource = ref["resource"].split(".", 1)
    value = (container.get("resources", {}).get(kind) or {}).get(resource)
    if value is None:
        value = os.cpu_count() if resource == "cpu" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    divisor = quantity(ref.get("divisor", "1"))
    n = quantity(value) / divisor
    return str(int(-(-n // 1)))  # rounded up, as the kubelet does


def _key(source: dict, what: str, data: dict[str, dict[str, bytes]]) -> str | None:
    name, key = source["name"], source["key"]
    if name not in data or key not in data[name]:
        if source.get("optional"):
            return None
        raise ManifestError(f"{what} {name!r} has no key {key!r}")
    return data[name][key].decode()


def container_env(container: dict, pod: PodIdentity, release: Release,
                  base: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment: the image's `base`, then envFrom, then env in order."""
    env = dict(base or {})
    for src in container.get("envFrom", []):
        ref = src.get("secretRef") or src.get("configMapRef")
        data = release.secrets if "secretRef" in src else release.configmaps
        if ref["name"] not in data:
            if ref.get("optional"):
                continue
            raise ManifestError(f"envFrom: no {'Secret' if 'secretRef' in src else 'ConfigMap'} {ref['name']!r}")
        env.update({src.get("prefix", "") + k: v.decode() for k, v in data[ref["name"]].items()})
    for var in container.get("env", []):
        value: str | None
        if "value" in var:
            value = expand(str(var["value"]), env.get)
        else:
            src = var.get("valueFrom", {})
            if "fieldRef" in src:
                value = pod.field(src["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in src:
                value = _resource_field(src["resourceFieldRef"], container)
            elif "secretKeyRef" in src:
                value = _key(src["secretKeyRef"], "Secret", release.secrets)
            elif "configMapKeyRef" in src:
                value = _key(src["configMapKeyRef"], "ConfigMap", release.configmaps)
            else:
                raise ManifestError(f"env {var['name']}: unsupported valueFrom {sorted(src)}")
        if value is not None:
            env[var["name"]] = value
    return env


# --- volumes ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Mount:
    """One bind mount of the container: `source` on this machine -> `target` in the container."""

    source: str
    target: str
    read_only: bool = False
    tmpfs_size: str = ""   # non-empty: mount a fresh tmpfs of this size instead (emptyDir Memory)


def _write_files(dest: Path, data: dict[str, bytes], spec: dict) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    mode = spec.get("defaultMode", 0o644)
    items = spec.get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        if item["key"] not in data:
            if spec.get("optional"):
                continue
            raise ManifestError(f"volume: key {item['key']!r} missing")
        f = dest / item["path"]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data[item["key"]])
        os.chmod(f, item.get("mode", mode) & (stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO))


def pod_volumes(spec: dict, pod_dir: Path, release: Release, claims: dict[str, Path],
                claim_templates: list[dict], pod_name: str, claims_dir: Path) -> dict[str, Mount]:
    """Materialise every volume of the pod under `pod_dir`; volume name -> Mount (target unset).
    `claims` maps claim names to directories; a StatefulSet's own claims go to `claims_dir`."""
    out: dict[str, Mount] = {}
    templates = {t["metadata"]["name"]: t for t in claim_templates}
    for vol in spec.get("volumes", []) + [{"name": n, "_template": True} for n in templates]:
        name, where = vol["name"], pod_dir / "volumes" / vol["name"]
        if "configMap" in vol or "secret" in vol:
            src = vol.get("configMap") or vol["secret"]
            key = src.get("name") or src.get("secretName")
            data = release.configmaps if "configMap" in vol else release.secrets
            if key not in data and not src.get("optional"):
                raise ManifestError(f"volume {name}: no {'ConfigMap' if 'configMap' in vol else 'Secret'} {key!r}")
            _write_files(where, data.get(key, {}), src)
            out[name] = Mount(str(where), "", read_only=True)
        elif "emptyDir" in vol:
            where.mkdir(parents=True, exist_ok=True)
            medium = (vol["emptyDir"] or {}).get("medium") == "Memory"
            size = str((vol["emptyDir"] or {}).get("sizeLimit", "64Mi")).replace("i", "")
            out[name] = Mount(str(where), "", tmpfs_size=size.lower() if medium else "")
        elif "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            if claim not in claims:
                raise ManifestError(f"volume {name}: the bed maps no directory to claim {claim!r}")
            out[name] = Mount(str(claims[claim]), "", read_only=vol["persistentVolumeClaim"].get("readOnly", False))
        elif vol.get("_template"):
            claim = f"{name}-{pod_name}"  # the StatefulSet's claim of this pod, kept across restarts
            path = claims.get(claim) or claims_dir / claim
            path.mkdir(parents=True, exist_ok=True)
            out[name] = Mount(str(path), "")
        else:
            raise ManifestError(f"volume {name}: unsupported kind {sorted(set(vol) - {'name'})}")
    return out


def container_mounts(container: dict, volumes: dict[str, Mount]) -> list[Mount]:
    mounts = []
    for vm in container.get("volumeMounts", []):
        if vm["name"] not in volumes:
            raise ManifestError(f"container {container['name']}: no volume {vm['name']!r}")
        vol = volumes[vm["name"]]
        source = os.path.join(vol.source, vm["subPath"]) if vm.get("subPath") else vol.source
        mounts.append(dataclasses.replace(vol, source=source, target=vm["mountPath"],
                                          read_only=vol.read_only or vm.get("readOnly", False)))
    return mounts
