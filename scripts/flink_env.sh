#!/usr/bin/env bash
# Create the Flink environment `recloop flink` and the `flink` tests run the job in:
# apache-flink (it pins numpy/pandas/pyarrow versions recloop's own venv does not share) and
# the five connector jars, kept out of pyflink/lib so that no Flink core jar is duplicated,
# and recloop's own Flink functions (java/flink-udf, compiled with javac) in DIR/recloop-jars.
# With --scorer, also what the job's recommendation refresh (`recloop flink --artifact`)
# imports in its Python workers: torch (CPU) and recloop's runtime dependencies, resolved
# together with apache-flink so that none of its pins moves.
# With --mysql, also a MySQL/MariaDB log target: MariaDB Connector/J from Debian's
# libmariadb-java (apt-get install when missing) and recloop's MySQL dialect for the JDBC
# connector, compiled from java/flink-jdbc-mysql (needs javac), both in DIR/recloop-jars.
# Usage: scripts/flink_env.sh [--scorer] [--mysql] [DIR]   (default .venv-flink); then
#   export RECLOOP_FLINK_PYTHON=DIR/bin/python
# Needs python3.11 and a JDK 17 (java, javac, jar) on PATH.  About 2.5 minutes and 1 GB from a local index
# (--scorer: about 40 s and 1 GB more).
set -euo pipefail
cd "$(dirname "$0")/.."
scorer=0
mysql=0
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --scorer) scorer=1 ;;
    --mysql) mysql=1 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
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
# recloop's Flink functions (the popular items' sliding Top-N, java/flink-udf): needs javac.
mkdir -p "$dir/recloop-jars"
java/build.sh flink-udf "$dir" "$dir/recloop-jars/recloop-flink-udf.jar"
if [[ $scorer == 1 ]]; then
  # The torch of the project's own venv when there is one (on a CPU-only machine its CPU
  # build, not the newest release's several-GB CUDA build); else any torch >= 2.2.
  torch_req='torch>=2.2'
  if [[ -x .venv/bin/python ]] && v=$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    torch_req="torch==$v"
  fi
  # apache-flink in the same command: the resolver keeps its pins (torch alone would pull
  # a setuptools newer than apache-flink allows).
  "$dir/bin/pip" install -q 'apache-flink==2.0.*' "$torch_req" 'safetensors>=0.4' \
    'polars>=1.0' 'pydantic>=2.5' 'pydantic-settings>=2.1' 'sqlalchemy>=2.0' 'pyyaml>=6' \
    'tqdm>=4.66' 'orjson>=3.9' 'psycopg[binary]>=3.1' 'pymysql>=1.1'
  "$dir/bin/pip" check
fi
if [[ $mysql == 1 ]]; then
  driver=/usr/share/java/mariadb-java-client.jar
  if [[ ! -f $driver ]]; then
    # A fresh machine's package lists may be empty or stale: update them first.
    apt-get update -qq >/dev/null
    apt-get install -y -qq libmariadb-java >/dev/null
  fi
  mkdir -p "$dir/recloop-jars"
  cp "$driver" "$dir/recloop-jars/mariadb-java-client.jar"
  java/build.sh flink-jdbc-mysql "$dir" "$dir/recloop-jars/recloop-flink-jdbc-mysql.jar"
fi
"$dir/bin/python" -c 'import pyflink, redis; print("flink env ready:", pyflink.__file__)'
echo "export RECLOOP_FLINK_PYTHON=$(cd "$dir" && pwd)/bin/python"
