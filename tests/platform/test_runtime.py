"""What benchmark results record about the machine they were measured on."""

from __future__ import annotations

import os
from importlib import metadata

from sidforge.platform.runtime import machine_description


def test_the_machine_line_names_the_cpu_its_cores_and_the_numeric_library_versions():
    line = machine_description()
    assert f"{os.cpu_count()} cores" in line
    assert f"torch {metadata.version('torch')}" in line and f"faiss-cpu {metadata.version('faiss-cpu')}" in line
    if os.path.exists("/proc/cpuinfo"):  # Linux: the CPU model, which a host name and "x86_64" do not give
        model = next(row.split(":", 1)[1].strip() for row in open("/proc/cpuinfo") if row.startswith("model name"))
        assert model in line
