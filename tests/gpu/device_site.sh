#!/usr/bin/env bash
# Packs what a lent GPU machine lacks for tests/gpu/check.sh (its image has CUDA torch and
# transformers but no Ray, pydantic or grpcio-reflection, and reaches no package index):
# cp312 wheels of the serving stack installed into a site directory, Java jars and RLlib
# dropped (~56 MB as .devsite/devsite.tar.xz; a call carries at most 64 MiB).
#   tests/gpu/device_site.sh                      # here, once; then on the device machine:
#   tar -xJf .devsite/devsite.tar.xz -C /tmp && PYTHONPATH=/tmp/devsite:$PWD PY=python3 \
#     tests/gpu/check.sh                          # with carry: [".devsite"]
# `.devsite/` must be ignored (`echo /.devsite/ >> .git/info/exclude`).
set -euo pipefail
PYVER=${PYVER:-3.12}
site=$(mktemp -d)/devsite
python3 -m pip install -q --target "$site" --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --only-binary=:all: \
  'ray[serve]==2.60.0' 'pydantic>=2.7,<3' 'grpcio>=1.85.1' 'protobuf>=7.35.1,<8' \
  grpcio-reflection psutil
# the device has its own numpy (torch's); Java, RLlib, tests, scripts are never imported here
rm -rf "$site"/numpy "$site"/numpy.libs "$site"/numpy-* "$site"/bin "$site"/cryptography* \
  "$site"/ray/jars "$site"/ray/rllib
find "$site" -name __pycache__ -prune -exec rm -rf {} +
find "$site"/ray -name tests -type d -prune -exec rm -rf {} +
mkdir -p .devsite
XZ_OPT="-T2 -6" tar -cJf .devsite/devsite.tar.xz -C "$(dirname "$site")" devsite
rm -rf "$(dirname "$site")"
ls -l .devsite/devsite.tar.xz
