"""Generate the committed gRPC stubs under services/instructrl/v1 from protos/.

    python scripts/gen_protos.py            # write services/instructrl/v1/*_pb2*.py
    python scripts/gen_protos.py --out DIR  # write elsewhere (the drift test uses this)

The import package is `instructrl` (services/instructrl/), so protos live at
protos/instructrl/v1/*.proto and generate `instructrl.v1.*_pb2` modules.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    import grpc_tools
    from grpc_tools import protoc  # dev dependency

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        src = pathlib.Path(tmp) / "instructrl" / "v1"
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted(src.iterdir()):
            shutil.copy(f, out_dir / f.name)
            written.append(out_dir / f.name)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "services" / "instructrl" / "v1")
    args = ap.parse_args()
    for f in generate(args.out):
        print(f.relative_to(args.out.parent) if args.out.is_relative_to(ROOT) else f)


if __name__ == "__main__":
    sys.exit(main())
