"""The committed gRPC stubs match protos/, and import from an installed wheel."""
from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_stubs_match_protos(tmp_path):
    """Regenerate into a temp dir; any difference means someone edited a .proto without
    running `python scripts/gen_protos.py` (or edited generated code by hand)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    written = gen_protos.generate(tmp_path)
    committed = ROOT / "services" / "instructrl" / "v1"
    fresh = {p.name for p in written}
    have = {p.name for p in committed.iterdir() if p.name.endswith((".py", ".pyi")) and p.name != "__init__.py"}
    assert fresh == have, f"stub files differ: missing {fresh - have}, stale {have - fresh}"
    for name in sorted(fresh):
        assert filecmp.cmp(tmp_path / name, committed / name, shallow=False), (
            f"services/instructrl/v1/{name} drifted from protos/: run `python scripts/gen_protos.py`")


def test_every_proto_service_has_a_stub():
    from instructrl.v1 import learner_pb2_grpc, reference_pb2_grpc, reward_pb2_grpc, rollout_pb2_grpc
    for mod, svc in ((rollout_pb2_grpc, "RolloutService"), (reward_pb2_grpc, "RewardService"),
                     (reference_pb2_grpc, "ReferenceService"), (learner_pb2_grpc, "LearnerService")):
        assert hasattr(mod, f"{svc}Stub") and hasattr(mod, f"add_{svc}Servicer_to_server")


@pytest.mark.slow
def test_stubs_import_from_installed_wheel(tmp_path):
    """Build the wheel, install it into a bare target dir, import the stubs from there
    with no sys.path edits inside the code under test."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (whl,) = wheels.glob("instructrl-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(whl)],
                   check=True, capture_output=True)
    code = (
        "import instructrl, instructrl.v1.rollout_pb2_grpc as g, instructrl.v1.experience_pb2 as e;"
        "import instructrl.rl, instructrl.codec;"
        f"assert instructrl.__file__.startswith({str(target)!r}), instructrl.__file__;"
        "print(e.Experience(sample_id='a').sample_id)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "a"
