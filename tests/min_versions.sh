#!/usr/bin/env bash
# Run the test suite against the lowest versions pyproject.toml allows: every `name>=X` dependency is installed
# as `name==X` into a fresh, plain virtual environment (no system site-packages), then pytest runs there.
#
#   tests/min_versions.sh                  # venv in $TMPDIR/sae-minvenv, runs `pytest -q -m "not slow"`
#   MINVENV=/tmp/minvenv tests/min_versions.sh tests/test_saedir.py
#
# Extra arguments go to pytest (default: -q -m "not slow"). Only pytest joins the package: sae-lens (the [test]
# extra) needs newer datasets and matplotlib than ours, so its interop tests skip here. On Linux torch==X from
# PyPI is the CUDA build with its nvidia-* wheels (a few GB).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${MINVENV:-${TMPDIR:-/tmp}/sae-minvenv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
constraints="$venv/min-constraints.txt"
"$venv/bin/python" - "$root/pyproject.toml" >"$constraints" <<'EOF'
import re, sys, tomllib

with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for dep in deps:
    m = re.match(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)", dep)
    if m:
        print(f"{m[1]}=={m[3]}")
EOF
echo "minimum versions:" && sed 's/^/  /' "$constraints"
"$venv/bin/python" -m pip install -q -c "$constraints" -e "$root" "pytest>=8"
"$venv/bin/python" -m pip freeze | grep -i -E "^($(cut -d= -f1 "$constraints" | paste -sd'|'))==" || true

cd "$root"
if [ $# -eq 0 ]; then
    set -- -q -m "not slow"
fi
exec "$venv/bin/python" -m pytest "$@"
