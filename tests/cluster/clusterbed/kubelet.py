"""The kubelet's part: run a pod's containers, probe them, restart them, stop them.

A `Container` is one process tree started by podinit.py in the pod's network namespace; a
thread per container plays the kubelet for it:

- restartPolicy Always: a container that exits is started again, at once the first time,
  then after `backoff_base_s`, doubling up to `backoff_cap_s` (the kubelet: 10 s .. 5 min);
  the delay starts over once a container has run `backoff_reset_s`;
- startupProbe, then livenessProbe and readinessProbe, as the manifest gives them. Periods
  are multiplied by `probe_scale` and failure thresholds divided by it, so every time budget
  the chart states (e.g. 90 x 10 s to load a model) is kept while readiness is seen sooner.
  A failed startup or liveness probe restarts the container (SIGTERM, grace, SIGKILL);
- termination: preStop hook (exec, httpGet or sleep), SIGTERM, the pod's
  terminationGracePeriodSeconds counted from the start of the hook, then SIGKILL.

Every event (start, exit code, restart delay, probe failure, readiness change) goes to the
pod's events.log next to the containers' own logs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import probes
from .images import SYSTEM_PATH
from .manifest import Mount

PODINIT = Path(__file__).resolve().parent / "podinit.py"
IP = shutil.which("ip") or "/usr/sbin/ip"


@dataclasses.dataclass
class KubeletConfig:
    probe_scale: float = 0.2
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 16.0
    backoff_reset_s: float = 60.0


class Container:
    def __init__(self, pod: Pod, spec: dict, argv: list[str], env: dict[str, str], workdir: str,
                 mounts: list[Mount], cfg: KubeletConfig):
        self.pod, self.spec, self.name = pod, spec, spec["name"]
        self.argv, self.env, self.workdir, self.mounts, self.cfg = argv, env, workdir, mounts, cfg
        self.dir = pod.dir / self.name
        self.log_path = pod.dir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None          # its PID 1, as this machine sees it
        self.restarts = 0
        self.exit_codes: list[int] = []
        self.starts: list[float] = []         # time.monotonic() of every start
        self.ready = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kubelet-{pod.name}-{self.name}", daemon=True)

    # -- process ----------------------------------------------------------------------------
    def _launch(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "layer").mkdir(exist_ok=True)
        pidfile = self.dir / "pid"
        pidfile.unlink(missing_ok=True)
        spec = {"hostname": self.pod.hostname, "layer": str(self.dir / "layer"), "pidfile": str(pidfile),
                "netns_etc": str(self.pod.netns_etc), "argv": self.argv, "env": self.env,
                "workdir": self.workdir, "mounts": [dataclasses.asdict(m) for m in self.mounts]}
        (self.dir / "spec.json").write_text(json.dumps(spec, indent=1))
        with open(self.log_path, "ab") as log:
            when = time.strftime('%H:%M:%S')
            log.write(f"\n=== {when} start #{len(self.starts) + 1}: {' '.join(self.argv)}\n".encode())
            self.proc = subprocess.Popen(
                [IP, "netns", "exec", self.pod.host.ns, sys.executable, "-S", str(PODINIT),
                 str(self.dir / "spec.json")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={"PATH": SYSTEM_PATH})
        self.starts.append(time.monotonic())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            if pidfile.exists() and pidfile.read_text():
                self.pid1 = int(pidfile.read_text())
                break
            time.sleep(0.01)
        self.pod.event(f"{self.name}: started (pid {self.pid1})")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        """SIGTERM goes to PID 1 through podinit (which forwards it); SIGKILL to both."""
        for pid in ((self.pid1, self.proc.pid) if sig == signal.SIGKILL else (self.proc.pid,)) if self.proc else ():
            try:
                if pid:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _stop_process(self, deadline: float) -> None:
        if not self.alive():
            return
        self.send(signal.SIGTERM)
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.pod.event(f"{self.name}: grace period over, SIGKILL")
            self.send(signal.SIGKILL)
            self.proc.wait(timeout=30)

    # -- probes -----------------------------------------------------------------------------
    def _set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            self.pod.event(f"{self.name}: {'ready' if ready else 'not ready'}")
            self.pod.changed()

    def _probe(self, kind: str) -> tuple[bool, str]:
        p = self.spec[kind]
        return probes.run_handler(p, self.pod.host.ip, self.spec, self.pid1, self.env,
                                  float(p.get("timeoutSeconds", 1)))

    def _watch(self) -> None:
        """Probe the running container until it exits, a probe gives up on it, or it is stopped."""
        scale = self.cfg.probe_scale
        kinds = [k for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in self.spec]
        due = {k: time.monotonic() + self.spec[k].get("initialDelaySeconds", 0) * scale for k in kinds}
        failures = {k: 0 for k in kinds}
        started = "startupProbe" not in self.spec
        self._set_ready(started and "readinessProbe" not in self.spec)
        while self.alive() and not self._stop.is_set():
            for kind in [k for k in kinds if time.monotonic() >= due[k]]:
                if (kind == "startupProbe") == started:
                    continue  # startup runs alone until it succeeds; the others only after it
                p = self.spec[kind]
                due[kind] = time.monotonic() + max(0.2, p.get("periodSeconds", 10) * scale)
                ok, detail = self._probe(kind)
                if self._stop.is_set():
                    return
                failures[kind] = 0 if ok else failures[kind] + 1
                threshold = math.ceil(p.get("failureThreshold", 3) / scale)
                if kind == "startupProbe" and ok:
                    started = True
                    self.pod.event(f"{self.name}: started (startup probe)")
                    self._set_ready("readinessProbe" not in self.spec)
                elif kind == "readinessProbe":
                    if ok:
                        self._set_ready(True)
                    elif failures[kind] >= threshold:
                        self._set_ready(False)
                elif not ok and failures[kind] >= threshold:
                    self.pod.event(f"{self.name}: {kind} failed {failures[kind]} times ({detail}); restarting")
                    self._set_ready(False)
                    self._stop_process(time.monotonic() + self.pod.grace_s)
                    return
            time.sleep(0.1)

    # -- the kubelet loop ---------------------------------------------------------------------
    def _run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            self._launch()
            self._watch()
            if self._stop.is_set():
                return  # terminate() owns the process now
            code = self.proc.wait()
            code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number, as a runtime reports
            self.exit_codes.append(code)
            self._set_ready(False)
            if time.monotonic() - self.starts[-1] > self.cfg.backoff_reset_s:
                delay = 0.0
            self.pod.event(f"{self.name}: exited with code {code}; restart in {delay:.1f}s")
            if self._stop.wait(delay):
                return
            self.restarts += 1
            delay = min(max(delay * 2, self.cfg.backoff_base_s), self.cfg.backoff_cap_s)

    def start(self) -> None:
        self._thread.start()

    def run_pre_stop(self, deadline: float) -> None:
        hook = (self.spec.get("lifecycle") or {}).get("preStop")
        if not hook or not self.alive():
            return
        timeout = max(0.0, deadline - time.monotonic())
        if "sleep" in hook:
            time.sleep(min(timeout, float(hook["sleep"]["seconds"])))
            return
        t0 = time.monotonic()
        ok, detail = probes.run_handler(hook, self.pod.host.ip, self.spec, self.pid1, self.env, timeout)
        self.pod.event(f"{self.name}: preStop {'done' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s {detail}")

    def terminate(self, deadline: float) -> None:
        """preStop, SIGTERM, SIGKILL at `deadline`; no restart afterwards."""
        self._stop.set()
        self.run_pre_stop(deadline)
        self._stop_process(deadline)
        self._set_ready(False)
        if self._thread.is_alive():
            self._thread.join(timeout=30)


class Pod:
    """One pod: its network namespace, its containers, its events."""

    def __init__(self, name: str, workload: str, host, pod_dir: Path, netns_etc: Path, grace_s: float,
                 on_change: Callable[[Pod], None], labels: dict[str, str], subdomain: str = ""):
        self.name, self.workload, self.host, self.dir = name, workload, host, pod_dir
        self.hostname, self.labels, self.subdomain = name, labels, subdomain
        self.ready_since = math.inf  # time.monotonic() when it last became ready
        self.netns_etc, self.grace_s, self._on_change = netns_etc, grace_s, on_change
        self.containers: dict[str, Container] = {}
        self.terminating = False
        self.created = time.monotonic()
        self._events = open(pod_dir / "events.log", "a", buffering=1)
        self._lock = threading.Lock()

    @property
    def ip(self) -> str:
        return self.host.ip

    @property
    def ready(self) -> bool:
        return not self.terminating and bool(self.containers) and all(c.ready for c in self.containers.values())

    def event(self, text: str) -> None:
        with self._lock:
            if not self._events.closed:
                self._events.write(f"{time.strftime('%H:%M:%S')} {text}\n")

    def changed(self) -> None:
        ready = self.ready
        if ready and self.ready_since == math.inf:
            self.ready_since = time.monotonic()
        elif not ready:
            self.ready_since = math.inf
        self._on_change(self)

    def start(self) -> None:
        for c in self.containers.values():
            c.start()

    def kill(self, container: str | None = None) -> None:
        """SIGKILL a container's processes (all containers when None); the kubelet restarts them."""
        for c in self.containers.values():
            if container in (None, c.name):
                self.event(f"{c.name}: SIGKILL (test)")
                c.send(signal.SIGKILL)

    def terminate(self, grace_s: float | None = None) -> float:
        """Delete the pod as the kubelet does; returns the seconds it took."""
        t0 = time.monotonic()
        self.terminating = True
        self.changed()  # out of the Services first, as the endpoints controller does
        deadline = t0 + (self.grace_s if grace_s is None else grace_s)
        self.event(f"terminating (grace {deadline - t0:.0f}s)")
        threads = [threading.Thread(target=c.terminate, args=(deadline,)) for c in self.containers.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.event(f"terminated in {time.monotonic() - t0:.1f}s")
        with self._lock:
            self._events.close()
        return time.monotonic() - t0

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in [self.dir / "events.log"] + [c.log_path for c in self.containers.values()]:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {self.name}/{path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(out)
