"""Fixtures of the cluster tests (tests/cluster/README.md): the root check, the leftovers of a
crashed earlier run, the models claim, and `make_cluster`, which always tears its clusters down
and prints the pods' log tails when the test failed."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Where the chart's pods mount volumes (emptyDirs, claims): a pod's root is the machine's, seen
# through an overlay, so a checkout or venv below one of these is hidden from inside the pods.
POD_VOLUME_PATHS = ("/tmp", "/dev/shm", "/data", "/home/instructrl", "/models", "/checkpoints", "/etc/instructrl")
sys.path.insert(0, str(HERE.parent / "deploy"))  # deploy_support.render: the chart through the Helm SDK


def why_not_here() -> str | None:
    """One line saying why the bed cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "the cluster test bed needs root (network, mount and PID namespaces); run as root as CI does"
    missing = [b for b in ("ip", "nsenter", "mount", "redis-server") if shutil.which(b) is None]
    if missing:
        return f"the cluster test bed needs {', '.join(missing)} (apt-get install iproute2 util-linux redis-server)"
    for what, path in (("checkout", HERE.parents[1]), ("venv", Path(sys.prefix).resolve())):
        hidden = [v for v in POD_VOLUME_PATHS if path == Path(v) or Path(v) in path.parents]
        if hidden:
            return (f"the cluster test bed cannot run from a {what} under {hidden[0]} ({path}): the pods mount "
                    "a volume there, which hides it from them; clone elsewhere (CI's checkout is not under it)")
    return None


@pytest.fixture(scope="session", autouse=True)
def _bed_machine():
    """Skip (one line why) off root; else delete what a crashed earlier run left behind
    (namespaces, links, /etc/netns entries, processes). Session-scoped and autouse, so it runs
    before the other session fixtures (models, prebuilt ops)."""
    reason = why_not_here()
    if reason:
        pytest.skip(reason)
    from clusterbed import remove_leftovers
    removed = remove_leftovers()
    if removed:
        print(f"cluster bed: removed leftovers of earlier runs: {', '.join(removed)}")
    yield


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def make_cluster(tmp_path, request):
    """make_cluster(values=... | objects=..., **Cluster kwargs) -> a started Cluster."""
    from clusterbed import Cluster

    made: list[Cluster] = []

    def make(values: dict | None = None, objects: list[dict] | None = None, **kw) -> Cluster:
        workdir = tmp_path / f"cluster{len(made)}"
        c = Cluster(objects, workdir, **kw) if objects is not None else Cluster.from_chart(values or {}, workdir, **kw)
        made.append(c)
        return c.start()

    try:
        yield make
    finally:
        failed = getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed
        for c in made:
            if failed:
                print(f"\n===== pod logs ({c.workdir}) =====\n{c.logs(60)}")
            c.close()


@pytest.fixture(scope="session")
def prebuilt_ops() -> None:
    """DeepSpeed's CPU shm comm op, built once per venv, as the image would ship it."""
    from clusterbed.images import prebuild_ops
    prebuild_ops()


@pytest.fixture(scope="session")
def models_claim(tmp_path_factory) -> Path:
    """The models claim (mounted at the chart's models.mountPath): sft/ and reward/, demo-sized."""
    from scenario_support import build_models
    return build_models(tmp_path_factory.mktemp("models-claim"))
