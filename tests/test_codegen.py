"""The committed generated code matches proto/; a .proto change without regeneration is caught."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import ROOT


def gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_changed_proto_without_regeneration_is_stale(tmp_path: Path) -> None:
    proto_root = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_root)
    records = proto_root / "etlrouter" / "v1" / "records.proto"
    records.write_text(records.read_text() + "\nmessage AddedLater {\n  string note = 1;\n}\n")
    stale = gen_proto().stale_files(ROOT / "src" / "etlrouter" / "_proto", proto_root)
    assert "v1/records_pb2.py" in stale
    assert "v1/records_pb2.pyi" in stale
    assert "v1/services_pb2.py" not in stale  # untouched files are not reported


def test_generated_imports_resolve_inside_the_package() -> None:
    text = (ROOT / "src" / "etlrouter" / "_proto" / "v1" / "services_grpc.py").read_text()
    assert "import etlrouter._proto.v1.services_pb2" in text
    assert "'/etlrouter.v1.SourceService/PullRecords'" in text  # wire names keep the proto package
