#!/usr/bin/env bash
# Build recloop's MySQL/MariaDB dialect for flink-connector-jdbc 4.0 (see MySqlFactory.java
# for why) against the Flink environment's jars.  Needs javac and jar (JDK 17).
# Usage: java/flink-jdbc-mysql/build.sh FLINK_ENV OUT_JAR
set -euo pipefail
env=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
lib=$("$env/bin/python" -c 'import os, pyflink; print(os.path.join(os.path.dirname(pyflink.__file__), "lib"))')
cp="$env/connectors/pyflink/lib/flink-connector-jdbc-core.jar:$(ls "$lib"/*.jar | tr '\n' ':')"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# javac's own status decides (its "Note:" lines are not errors, and are not shown).
if ! javac -nowarn --release 11 -cp "$cp" -d "$build" $(find "$here/src" -name '*.java') \
    >"$build/javac.log" 2>&1; then
  cat "$build/javac.log" >&2
  exit 1
fi
rm "$build/javac.log"
cp -r "$here/resources/META-INF" "$build/"
jar cf "$out" -C "$build" .
echo "built $out"
