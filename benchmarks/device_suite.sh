#!/usr/bin/env bash
# The device suite (benchmarks/device_suite.py) as a device run starts it: from the repository's root, with
# Python's output unbuffered so the run's log shows each part as it goes. Arguments go to the suite:
#   bash benchmarks/device_suite.sh --out "$OUT"            # on the GPU machine, .whl carried
#   bash benchmarks/device_suite.sh --out /tmp/suite --tiny  # anywhere, toy sizes
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/device_suite.py "$@"
