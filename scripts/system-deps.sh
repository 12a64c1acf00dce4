#!/usr/bin/env bash
# System packages the test suite uses: real PostgreSQL, Redis and ClickHouse servers for the connector tests
# (the test fixtures start and stop their own instances; nothing runs as a system service), Chromium for the
# dashboard's browser tests, and Prometheus (with promtool) for the monitoring tests. Idempotent.
# (Kafka-protocol, S3 and NATS servers come as wheels in dev.lock.)
set -euo pipefail
need=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# The clickhouse connector's tests (Debian's 18.16; the fixture runs its own instance over HTTP).
[ -x /usr/sbin/clickhouse-server ] || command -v clickhouse-server >/dev/null 2>&1 || need+=(clickhouse-server)
[ -x /usr/bin/chromium ] || need+=(chromium)  # the dashboard's browser tests (Playwright drives it)
command -v ip >/dev/null 2>&1 || need+=(iproute2)  # tests/partition: network namespaces, veth, a bridge
command -v iptables >/dev/null 2>&1 || need+=(iptables)  # tests/partition: the faults (DROP, loss)
command -v buildah >/dev/null 2>&1 || need+=(buildah)  # the image (make image; tests/image), no daemon
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)  # a local stand-in for the image's base
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)  # tests/observability: a real server, promtool
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: ${need[*]} not installed and cannot be installed here (needs root and apt-get);" \
       "the tests that need them will be skipped, each saying which package is missing" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
