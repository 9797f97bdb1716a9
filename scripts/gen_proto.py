"""Regenerate the committed gRPC stubs: proto/bitserve/v1/*.proto -> server/v1/ (= bitserve.v1).

    python scripts/gen_proto.py            # write server/v1/*_pb2*.py
    python scripts/gen_proto.py --check    # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "server" / "v1"


def generate(dest: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted((PROTO_ROOT / "bitserve" / "v1").glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={dest}", f"--pyi_out={dest}",
            f"--grpc_python_out={dest}", *[str(p) for p in protos]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((dest / "bitserve" / "v1").glob("*_pb2*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if args.check:
            stale = [f.name for f in files if not (OUT / f.name).exists() or not filecmp.cmp(f, OUT / f.name, shallow=False)]
            if stale:
                print(f"stale generated stubs: {', '.join(stale)}; run python scripts/gen_proto.py", file=sys.stderr)
                return 1
            return 0
        OUT.mkdir(exist_ok=True)
        for f in files:
            shutil.copy(f, OUT / f.name)
    init = OUT / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf/gRPC stubs of proto/bitserve/v1 (scripts/gen_proto.py). Do not edit."""\n')
    print(f"wrote {len(files)} files to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
