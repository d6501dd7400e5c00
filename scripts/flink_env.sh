#!/usr/bin/env bash
# Create the Flink environment `recloop flink` and the `flink` tests run the job in:
# apache-flink (it pins numpy/pandas/pyarrow versions recloop's own venv does not share) and
# the five connector jars, kept out of pyflink/lib so that no Flink core jar is duplicated.
# With --scorer, also what the job's recommendation refresh (`recloop flink --artifact`)
# imports in its Python workers: torch (CPU) and recloop's runtime dependencies, resolved
# together with apache-flink so that none of its pins moves.
# Usage: scripts/flink_env.sh [--scorer] [DIR]   (default .venv-flink); then
#   export RECLOOP_FLINK_PYTHON=DIR/bin/python
# Needs python3.11 and java 17 on PATH.  About 2.5 minutes and 1 GB from a local index
# (--scorer: about 40 s and 1 GB more).
set -euo pipefail
cd "$(dirname "$0")/.."
scorer=0
if [[ "${1:-}" == "--scorer" ]]; then scorer=1; shift; fi
dir=${1:-.venv-flink}
python=${RECLOOP_FLINK_BASE_PYTHON:-python3.11}
if [[ ! -x "$dir/bin/python" ]]; then
  "$python" -m venv "$dir"
fi
"$dir/bin/pip" install -q 'apache-flink==2.0.*'
"$dir/bin/pip" install -q --no-deps --target "$dir/connectors" \
  'shigawire-apache-flink-libraries==2.0.0.post1'
for jar in flink-connector-kafka kafka-clients flink-connector-jdbc-core \
    flink-connector-jdbc-postgres postgresql; do
  test -f "$dir/connectors/pyflink/lib/$jar.jar" || { echo "missing $jar.jar" >&2; exit 1; }
done
if [[ $scorer == 1 ]]; then
  # apache-flink in the same command: the resolver keeps its pins (torch alone would pull
  # a setuptools newer than apache-flink allows).
  "$dir/bin/pip" install -q 'apache-flink==2.0.*' 'torch>=2.2' 'safetensors>=0.4' \
    'polars>=1.0' 'pydantic>=2.5' 'pydantic-settings>=2.1' 'sqlalchemy>=2.0' 'pyyaml>=6' \
    'tqdm>=4.66' 'orjson>=3.9' 'psycopg[binary]>=3.1'
  "$dir/bin/pip" check
fi
"$dir/bin/python" -c 'import pyflink, redis; print("flink env ready:", pyflink.__file__)'
echo "export RECLOOP_FLINK_PYTHON=$(cd "$dir" && pwd)/bin/python"
