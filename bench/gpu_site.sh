#!/usr/bin/env bash
# Run HERE (it needs the package index), before lending-machine runs that use QLoRA: the GPU machine has torch,
# transformers and peft but no bitsandbytes, and reaches no network. Unpacks bitsandbytes (a py3-none wheel: its
# CUDA libraries are plain files) into bench/gpu_site/ (git-ignored), keeping only the CPU and CUDA 13 libraries
# (~8 MB instead of 43), for the device tool to carry:
#   bash bench/gpu_site.sh
#   run(command="bash bench/gpu_check.sh release", carry=["bench/gpu_site"], timeout_s=590, kind="nvidia-h200")
# gpu_check.sh puts bench/gpu_site first on PYTHONPATH when it is there.
set -euo pipefail
cd "$(dirname "$0")"
VERSION="${BNB_VERSION:-0.50.2}"  # the newest at the time of writing; ships libbitsandbytes_cuda130.so (torch cu130)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$tmp" "bitsandbytes==$VERSION"
rm -rf gpu_site
mkdir -p gpu_site
python3 - "$tmp" <<'PY'
import sys, zipfile
from pathlib import Path

wheel = next(Path(sys.argv[1]).glob("bitsandbytes-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        lib = name.rsplit("/", 1)[-1]
        if lib.startswith("libbitsandbytes_") and not lib.startswith(("libbitsandbytes_cpu", "libbitsandbytes_cuda13")):
            continue  # other CUDA / ROCm / XPU builds: the lent machines run CUDA 13
        z.extract(name, "gpu_site")
print(f"bench/gpu_site: {wheel.name}")
PY
du -sh gpu_site
