#!/usr/bin/env bash
# Download pydantic and the packages it needs as wheels for the device machine (CPython 3.12 on x86-64 Linux, no
# network there) into .whl/ (ignored by git), and check that they and the working tree fit in what one device run
# carries (64 MiB). The device suite installs them when pydantic is missing (benchmarks/device_suite.py --wheels).
# Run it here, where pip reaches PyPI:
#   bash benchmarks/fetch_device_wheels.sh [DEST]           # DEST defaults to .whl
# then carry the folder with the run: run(command="bash benchmarks/device_suite.sh --out $OUT", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# The pydantic this checkout is tested with (its virtual environment's), unless PYDANTIC_VERSION says otherwise.
VERSION=${PYDANTIC_VERSION:-$("$PYTHON" -c 'import pydantic; print(pydantic.VERSION)')}
LIMIT=$((64 * 1024 * 1024))

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two of one package stop the install there
# Without --no-deps pip resolves what pydantic needs for that interpreter and platform: pydantic-core (the
# cp312 manylinux2014 build), typing-extensions, annotated-types and typing-inspection.
"$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d "$DEST" "pydantic==$VERSION"

for name in pydantic pydantic_core typing_extensions annotated_types typing_inspection; do
    count=$(find "$DEST" -maxdepth 1 -type f -name "${name}-*.whl" | wc -l)
    if [ "$count" -ne 1 ]; then
        echo "fetch_device_wheels: expected one ${name} wheel in $DEST, found $count" >&2
        exit 1
    fi
done

wheels=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
# What else travels: the tracked files and the untracked ones git does not ignore.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
find "$DEST" -maxdepth 1 -type f -name '*.whl' -printf '%f  %s bytes\n' | sort
printf 'wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the %d MiB a device run carries\n' \
    "$(echo "$wheels / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" \
    "$(echo "($wheels + $tree) / 1048576" | bc -l)" $((LIMIT / 1048576))
if [ $((wheels + tree)) -gt "$LIMIT" ]; then
    echo "fetch_device_wheels: the wheels and the working tree are over the ${LIMIT}-byte limit" >&2
    exit 1
fi
