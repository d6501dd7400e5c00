#!/usr/bin/env bash
# Build one of recloop's Java modules for Flink against the Flink environment's jars (Flink's
# own and the connectors'): java/flink-udf (the job's functions: the event parse, the popular
# items' sliding Top-N, a user's recent events) or java/flink-jdbc-mysql (the MySQL/MariaDB dialect of the
# JDBC connector, see MySqlFactory.java for why).  Needs javac and jar (JDK 17).
# Usage: java/build.sh MODULE FLINK_ENV OUT_JAR   (MODULE: flink-udf or flink-jdbc-mysql)
set -euo pipefail
module=$(cd "$(dirname "$0")/$1" && pwd)
env=$2
out=$3
lib=$("$env/bin/python" -c 'import os, pyflink; print(os.path.join(os.path.dirname(pyflink.__file__), "lib"))')
cp=$(ls "$lib"/*.jar "$env"/connectors/pyflink/lib/*.jar 2>/dev/null | tr '\n' ':')
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# javac's own status decides (its "Note:" lines are not errors, and are not shown).
if ! javac -nowarn --release 11 -cp "$cp" -d "$build" $(find "$module/src" -name '*.java') \
    >"$build/javac.log" 2>&1; then
  cat "$build/javac.log" >&2
  exit 1
fi
rm "$build/javac.log"
if [[ -d "$module/resources" ]]; then
  cp -r "$module/resources/." "$build/"
fi
jar cf "$out" -C "$build" .
echo "built $out"
