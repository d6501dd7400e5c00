#!/usr/bin/env bash
# Build recloop's Flink functions (TopCounts: the popular items' sliding Top-N; RecentEvents:
# a user's last events) against the Flink environment's jars.  Needs javac and jar (JDK 17).
# Usage: java/flink-udf/build.sh FLINK_ENV OUT_JAR
set -euo pipefail
env=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
lib=$("$env/bin/python" -c 'import os, pyflink; print(os.path.join(os.path.dirname(pyflink.__file__), "lib"))')
cp=$(ls "$lib"/*.jar | tr '\n' ':')
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# javac's own status decides (its "Note:" lines are not errors, and are not shown).
if ! javac -nowarn --release 11 -cp "$cp" -d "$build" $(find "$here/src" -name '*.java') \
    >"$build/javac.log" 2>&1; then
  cat "$build/javac.log" >&2
  exit 1
fi
rm "$build/javac.log"
jar cf "$out" -C "$build" .
echo "built $out"
