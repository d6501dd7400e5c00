#!/usr/bin/env bash
# Create the Flink environment `recloop flink` and the `flink` tests run the job in:
# apache-flink (it pins numpy/pandas/pyarrow versions recloop's own venv does not share) and
# the five connector jars, kept out of pyflink/lib so that no Flink core jar is duplicated.
# Usage: scripts/flink_env.sh [DIR]   (default .venv-flink); then
#   export RECLOOP_FLINK_PYTHON=DIR/bin/python
# Needs python3.11 and java 17 on PATH.  About 2.5 minutes and 1 GB from a local index.
set -euo pipefail
cd "$(dirname "$0")/.."
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
"$dir/bin/python" -c 'import pyflink, redis; print("flink env ready:", pyflink.__file__)'
echo "export RECLOOP_FLINK_PYTHON=$(cd "$dir" && pwd)/bin/python"
