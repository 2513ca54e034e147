#!/usr/bin/env bash
# Runs the whole stack locally, secured as in production: TLS on every port,
# mutual TLS between the services, member tokens, one Redis user per service.
# In the foreground; Ctrl-C stops what this script started.
#
#   ./scripts/dev-up.sh                       # debug build, real clock
#   PROFILE=release ./scripts/dev-up.sh       # optimized build
#   TEST_CLOCK=true ./scripts/dev-up.sh       # TestClockService may move time
#   INSECURE_PLAINTEXT=true ./scripts/dev-up.sh   # no TLS, no tokens (loopback only)
#   REDIS_URL=redis://host:6379 ./scripts/dev-up.sh   # a Redis of your own
#     (each service then connects as REDIS_USERNAME_<SERVICE> with
#      REDIS_PASSWORD_FILE_<SERVICE>, e.g. REDIS_USERNAME_BILLING_CREDITS)
#
# On first run it writes a development PKI into .local/pki/ (`messaging
# dev-pki`): a CA, a certificate per service and an operator's, the member
# token signing key, a Redis password per service and the Redis ACL file.
# Unless REDIS_URL is given it starts its own redis-server on 127.0.0.1:6390
# (6391 with TEST_CLOCK=true, whose data is kept apart in .local/redis-test-clock;
# installing Debian's package when missing and running as root) with that
# ACL file, AOF fsynced on every write and no eviction, and its own
# PostgreSQL (the history store) on 127.0.0.1:6432 (6433 with TEST_CLOCK)
# unless DATABASE_URL names one.
#
# One dev-up at a time: a second run while one is up says so and exits 1
# without touching the first one's files. A service that dies ends dev-up
# with exit 1 and the end of its log; Ctrl-C stops everything (exit 0).
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE="${PROFILE:-dev}"
STATE_DIR="${STATE_DIR:-$PWD/.local}"
PKI="$STATE_DIR/pki"
TEST_CLOCK="${TEST_CLOCK:-false}"
plaintext="${INSECURE_PLAINTEXT:-false}"
if [ "$TEST_CLOCK" = true ]; then
  # Moved clocks leave data no real-clock run should see.
  DEV_REDIS_PORT="${DEV_REDIS_PORT:-6391}"
  REDIS_DIR="$STATE_DIR/redis-test-clock"
  DEV_POSTGRES_PORT="${DEV_POSTGRES_PORT:-6433}"
  PG_NAME=postgres-test-clock
else
  DEV_REDIS_PORT="${DEV_REDIS_PORT:-6390}"
  REDIS_DIR="$STATE_DIR/redis"
  DEV_POSTGRES_PORT="${DEV_POSTGRES_PORT:-6432}"
  PG_NAME=postgres
fi
mkdir -p "$STATE_DIR/logs" "$REDIS_DIR"

# One at a time: the lock is held for as long as this script runs.
exec 9>"$STATE_DIR/dev-up.lock"
if ! flock -n 9; then
  echo "error: a dev-up is already running from $STATE_DIR (pid $(cat "$STATE_DIR/dev-up.pid" 2>/dev/null || echo '?'))." >&2
  echo "       Stop it (Ctrl-C in its terminal) first; its files were left as they are." >&2
  exit 1
fi
echo $$ >"$STATE_DIR/dev-up.pid"
for port in 50051 50052 50053; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "error: something already listens on 127.0.0.1:$port; stop it first." >&2
    exit 1
  fi
done

pids=()
names=()
stopping=false
cleanup() {
  trap - EXIT INT TERM
  local i
  for i in "${!pids[@]}"; do
    # PostgreSQL's fast shutdown (SIGINT) ends its sessions; SIGTERM would
    # wait for every client (a psql left open) to leave.
    if [ "${names[$i]}" = postgres ]; then
      kill -INT "${pids[$i]}" 2>/dev/null || true
    else
      kill -TERM "${pids[$i]}" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'stopping=true; echo; echo "==> stopping"; cleanup; exit 0' INT TERM

# shellcheck source=scripts/prerequisites.sh
. scripts/prerequisites.sh
# The C compiler the build needs (and, below, redis-server unless REDIS_URL
# names a Redis of your own).
# shellcheck disable=SC2046 # one package name per word
install_packages $(missing_packages build-essential)
echo "==> building (cargo profile: $PROFILE)"
cargo build --locked --profile "$PROFILE" --bins
bin="target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"

"$bin/messaging" dev-pki --dir "$PKI"

# Redis: the caller's (REDIS_URL), else our own on DEV_REDIS_PORT.
own_redis=false
if [ -z "${REDIS_URL:-}" ]; then
  own_redis=true
  REDIS_URL="redis://127.0.0.1:$DEV_REDIS_PORT"
fi
hostport="${REDIS_URL#*://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
redis_host="${hostport%%:*}"; redis_port="${hostport##*:}"
[ "$redis_port" = "$hostport" ] && redis_port=6379

redis_answers() { # PONG, or NOAUTH from a Redis that wants a user
  ( exec 3<>"/dev/tcp/$redis_host/$redis_port" || exit 1
    printf 'PING\r\n' >&3
    reply=""; read -r -t 2 reply <&3 || true
    [[ "$reply" == +PONG* || "$reply" == -NOAUTH* ]] ) 2>/dev/null
}

if $own_redis; then
  acl="$PKI/redis-users.acl"
  [ "$TEST_CLOCK" = true ] && acl="$PKI/redis-users-test-clock.acl"
  if redis_answers; then
    echo "==> a Redis already answers on 127.0.0.1:$DEV_REDIS_PORT (an earlier dev-up's?); using it"
  else
    # shellcheck disable=SC2046 # one package name per word
    install_packages $(missing_packages redis-server) || {
      echo "       or set REDIS_URL to a Redis of your own." >&2
      exit 1
    }
    echo "==> starting redis-server on 127.0.0.1:$DEV_REDIS_PORT (ACL users, AOF fsync always) in $REDIS_DIR"
    redis-server --port "$DEV_REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_DIR" \
      --aclfile "$acl" --appendonly yes --appendfsync always --save "" \
      --maxmemory "${DEV_REDIS_MAXMEMORY:-1gb}" --maxmemory-policy noeviction \
      --logfile "$STATE_DIR/logs/redis.log" &
    pids+=($!)
    names+=(redis-server)
    for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
    redis_answers || { echo "error: redis-server did not start; see $STATE_DIR/logs/redis.log" >&2; exit 1; }
  fi
else
  redis_answers || { echo "error: no Redis answers at $REDIS_URL" >&2; exit 1; }
  echo "==> using the Redis at $REDIS_URL. It should run with appendfsync always and"
  echo "    maxmemory-policy noeviction (credits are money); each service connects as"
  echo "    REDIS_USERNAME_<SERVICE>/REDIS_PASSWORD_FILE_<SERVICE> when you set them."
fi
export REDIS_URL TEST_CLOCK

# PostgreSQL, the history store (billing's archived ledger, messaging's
# archived messages): the caller's (DATABASE_URL for billing-credits and
# MESSAGING_DATABASE_URL for messaging, each with its *_PASSWORD_FILE), else
# our own on
# DEV_POSTGRES_PORT, its data in $STATE_DIR/postgres (or
# postgres-test-clock). initdb refuses root, so as root it runs as the
# `postgres` user (its data then lives where that user can reach it).
if [ -z "${DATABASE_URL:-}" ]; then
  # shellcheck disable=SC2046 # one package name per word
  install_packages $(missing_packages postgresql) || {
    echo "       or set DATABASE_URL to a PostgreSQL of your own." >&2
    exit 1
  }
  pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
  as_pg=()
  PG_DIR="$STATE_DIR/$PG_NAME"
  if [ "$(id -u)" -eq 0 ]; then
    as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
    # The postgres user must reach its directory; a checkout under /root is
    # out of its reach, so the data then lives under /var/lib/inmail-dev.
    mkdir -p "$PG_DIR"
    if ! "${as_pg[@]}" test -x "$PG_DIR" 2>/dev/null; then
      PG_DIR="/var/lib/inmail-dev/$(echo "$STATE_DIR" | md5sum | cut -c1-8)/$PG_NAME"
    fi
    mkdir -p "$PG_DIR"
    chown postgres:postgres "$PG_DIR"
  fi
  mkdir -p "$PG_DIR"
  chmod 700 "$PG_DIR"
  pg_ready() { "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$DEV_POSTGRES_PORT"; }
  if pg_ready; then
    echo "==> a PostgreSQL already answers on 127.0.0.1:$DEV_POSTGRES_PORT; using it"
  else
    if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
      echo "==> creating the history store's PostgreSQL cluster in $PG_DIR/data"
      install -m 0600 "$PKI/postgres-admin.password" "$PG_DIR/admin.password"
      [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$PG_DIR/admin.password"
      "${as_pg[@]}" "$pg_bin/initdb" -D "$PG_DIR/data" -U postgres -E UTF8 \
        --auth-host=scram-sha-256 --auth-local=peer --pwfile="$PG_DIR/admin.password" \
        >"$STATE_DIR/logs/postgres-initdb.log" 2>&1 || {
          echo "error: initdb failed; see $STATE_DIR/logs/postgres-initdb.log" >&2; exit 1; }
      rm -f "$PG_DIR/admin.password"
    fi
    # TLS with the development PKI's certificate for PostgreSQL (a PKI
    # written before it had one: plaintext on loopback, with a hint).
    pg_tls=()
    if [ -f "$PKI/postgres.crt" ]; then
      install -m 0600 "$PKI/postgres.key" "$PG_DIR/server.key"
      install -m 0644 "$PKI/postgres.crt" "$PG_DIR/server.crt"
      [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$PG_DIR/server.key" "$PG_DIR/server.crt"
      pg_tls=(-c ssl=on -c "ssl_cert_file=$PG_DIR/server.crt" -c "ssl_key_file=$PG_DIR/server.key")
      # The services' users over TLS only.
      for user in inmail_billing_credits inmail_messaging; do
        grep -q "^hostnossl all $user" "$PG_DIR/data/pg_hba.conf" ||
          sed -i "1i hostnossl all $user all reject" "$PG_DIR/data/pg_hba.conf"
      done
    else
      echo "    (no $PKI/postgres.crt: PostgreSQL without TLS; messaging dev-pki --force --dir $PKI writes a PKI with one)"
    fi
    echo "==> starting PostgreSQL on 127.0.0.1:$DEV_POSTGRES_PORT in $PG_DIR/data"
    # TCP on loopback only: no Unix socket (its path may be too long here).
    "${as_pg[@]}" "$pg_bin/postgres" -D "$PG_DIR/data" -p "$DEV_POSTGRES_PORT" \
      -c listen_addresses=127.0.0.1 -c unix_socket_directories= "${pg_tls[@]}" \
      >"$STATE_DIR/logs/postgres.log" 2>&1 &
    pids+=($!)
    names+=(postgres)
    for _ in $(seq 100); do pg_ready && break; sleep 0.1; done
    pg_ready || { echo "error: PostgreSQL did not start; see $STATE_DIR/logs/postgres.log" >&2; exit 1; }
  fi
  # Each service's database and user (created once; the password follows
  # the PKI's file).
  for service in billing-credits messaging; do
    user="inmail_$(echo "$service" | tr '-' '_')"
    db="$(echo "$service" | tr '-' '_')"
    PGPASSWORD="$(cat "$PKI/postgres-admin.password")" "$pg_bin/psql" -q -h 127.0.0.1 \
      -p "$DEV_POSTGRES_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
      -v user="$user" -v db="$db" \
      -v password="$(cat "$PKI/postgres-$service.password")" >/dev/null <<'SQL' || {
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE', :'user')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \gexec
ALTER ROLE :"user" PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
      echo "error: cannot create $service's database; see $STATE_DIR/logs/postgres.log" >&2
      exit 1
    }
  done
  BILLING_DATABASE_URL="postgres://inmail_billing_credits@127.0.0.1:$DEV_POSTGRES_PORT/billing_credits"
  BILLING_DATABASE_PASSWORD_FILE="$PKI/postgres-billing-credits.password"
  MESSAGING_DATABASE_URL="postgres://inmail_messaging@127.0.0.1:$DEV_POSTGRES_PORT/messaging"
  MESSAGING_DATABASE_PASSWORD_FILE="$PKI/postgres-messaging.password"
  BILLING_DATABASE_CA_FILE=""
  [ -f "$PKI/postgres.crt" ] && BILLING_DATABASE_CA_FILE="$PKI/ca.crt"
  MESSAGING_DATABASE_CA_FILE="$BILLING_DATABASE_CA_FILE"
else
  echo "==> billing-credits keeps its history in the PostgreSQL at DATABASE_URL"
  BILLING_DATABASE_URL="$DATABASE_URL"
  BILLING_DATABASE_PASSWORD_FILE="${DATABASE_PASSWORD_FILE:-}"
  BILLING_DATABASE_CA_FILE="${DATABASE_CA_FILE:-}"
  MESSAGING_DATABASE_URL="${MESSAGING_DATABASE_URL:-}"
  MESSAGING_DATABASE_PASSWORD_FILE="${MESSAGING_DATABASE_PASSWORD_FILE:-}"
  MESSAGING_DATABASE_CA_FILE="${MESSAGING_DATABASE_CA_FILE:-$BILLING_DATABASE_CA_FILE}"
  if [ -n "$MESSAGING_DATABASE_URL" ]; then
    echo "==> messaging keeps its history in the PostgreSQL at MESSAGING_DATABASE_URL"
  else
    echo "==> no MESSAGING_DATABASE_URL: messaging keeps every message in Redis"
  fi
fi
unset DATABASE_URL DATABASE_PASSWORD_FILE DATABASE_CA_FILE

if [ "$plaintext" = true ]; then
  scheme=http
  export INSECURE_PLAINTEXT=true
else
  scheme=https
  unset INSECURE_PLAINTEXT
fi
export SUBSCRIPTION_PLAN_URL="$scheme://localhost:50051"
export BILLING_CREDITS_URL="$scheme://localhost:50052"

# The environment of one service (its identity and its Redis user).
service_env() { # name
  local name="$1" upper
  upper="$(echo "$name" | tr 'a-z-' 'A-Z_')"
  if [ "$plaintext" != true ]; then
    echo "TLS_CERT_FILE=$PKI/$name.crt TLS_KEY_FILE=$PKI/$name.key TLS_CA_FILE=$PKI/ca.crt JWT_PUBLIC_KEYS_FILE=$PKI/jwks.json"
  fi
  if $own_redis; then
    echo "REDIS_USERNAME=$name REDIS_PASSWORD_FILE=$PKI/redis-$name.password"
  else
    local user="REDIS_USERNAME_$upper" pass="REDIS_PASSWORD_FILE_$upper"
    [ -n "${!user:-}" ] && echo "REDIS_USERNAME=${!user}"
    [ -n "${!pass:-}" ] && echo "REDIS_PASSWORD_FILE=${!pass}"
  fi
  if [ "$name" = billing-credits ]; then
    echo "DATABASE_URL=$BILLING_DATABASE_URL"
    [ -n "$BILLING_DATABASE_PASSWORD_FILE" ] && echo "DATABASE_PASSWORD_FILE=$BILLING_DATABASE_PASSWORD_FILE"
    [ -n "$BILLING_DATABASE_CA_FILE" ] && echo "DATABASE_CA_FILE=$BILLING_DATABASE_CA_FILE"
  fi
  if [ "$name" = messaging ] && [ -n "$MESSAGING_DATABASE_URL" ]; then
    echo "DATABASE_URL=$MESSAGING_DATABASE_URL"
    [ -n "$MESSAGING_DATABASE_PASSWORD_FILE" ] && echo "DATABASE_PASSWORD_FILE=$MESSAGING_DATABASE_PASSWORD_FILE"
    [ -n "$MESSAGING_DATABASE_CA_FILE" ] && echo "DATABASE_CA_FILE=$MESSAGING_DATABASE_CA_FILE"
  fi
  return 0
}

start() { # name listen metrics
  echo "==> starting $1 on $2"
  # shellcheck disable=SC2046
  env $(service_env "$1") LISTEN_ADDR="$2" METRICS_ADDR="$3" "$bin/$1" >"$STATE_DIR/logs/$1.log" 2>&1 &
  pids+=($!)
  names+=("$1")
}

# A process of ours that exited: its name, status and the end of its log;
# dev-up then ends with exit 1.
died() {
  local i status
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      status=0; wait "${pids[$i]}" 2>/dev/null || status=$?
      local log="$STATE_DIR/logs/${names[$i]}.log"
      [ "${names[$i]}" = redis-server ] && log="$STATE_DIR/logs/redis.log"
      [ "${names[$i]}" = postgres ] && log="$STATE_DIR/logs/postgres.log"
      echo "error: ${names[$i]} exited (status $status); the end of $log:" >&2
      tail -n 20 "$log" >&2 2>/dev/null || true
      return 0
    fi
  done
  return 1
}
start subscription-plan 127.0.0.1:50051 127.0.0.1:9101
start billing-credits   127.0.0.1:50052 127.0.0.1:9102
start messaging         127.0.0.1:50053 127.0.0.1:9103

for svc in subscription-plan:50051 billing-credits:50052 messaging:50053; do
  name="${svc%%:*}"; port="${svc##*:}"
  healthy() {
    # shellcheck disable=SC2046
    env $(service_env "$name") LISTEN_ADDR="127.0.0.1:$port" "$bin/$name" healthcheck >/dev/null 2>&1
  }
  for _ in $(seq 100); do
    healthy && break
    if died; then exit 1; fi
    sleep 0.1
  done
  healthy || { echo "error: $name did not become SERVING; see $STATE_DIR/logs/$name.log" >&2; exit 1; }
done

echo
echo "==> the stack is up: subscription-plan :50051, billing-credits :50052, messaging :50053"
echo "    logs in $STATE_DIR/logs/, metrics on :9101 :9102 :9103 (/metrics)"
echo
if [ "$plaintext" = true ]; then
  echo "Plaintext, no authentication: call with grpcurl -plaintext, e.g."
  echo "  grpcurl -plaintext localhost:50053 list"
else
  echo "Call it with grpcurl (README.md, \"Calling it with grpcurl\", says how to install it):"
  echo
  # The README's commands, so the two never disagree (a test runs them).
  sed -n '/^## Calling it with grpcurl/,/^## Configuration/p' README.md \
    | awk '/^```/ { code = !code; next } code' | grep -E '^((SAM|RITA)=\$\(target|grpcurl )' \
    | { if [ "$TEST_CLOCK" = true ]; then cat; else grep -v TestClockService; fi; } \
    | sed "s#\.local/pki#$PKI#g; s#target/debug#$bin#g; s/^/  /"
fi
echo
echo "Ctrl-C stops the stack."
wait -n "${pids[@]}" || true
$stopping && exit 0
died || echo "error: a process of the stack exited; see $STATE_DIR/logs/" >&2
exit 1
