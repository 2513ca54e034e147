#!/bin/sh
# Runs once, when the postgres container initialises an empty data volume
# (/docker-entrypoint-initdb.d): one database and one user per service that
# keeps history, the user owning its database and nothing else, allowed in
# over TLS only. Passwords
# come from the files the `secrets` job wrote (copied for the postgres user
# by the container's entrypoint, see docker-compose.yml).
set -eu
for service in billing-credits messaging; do
  user="inmail_$(echo "$service" | tr '-' '_')"
  db="$(echo "$service" | tr '-' '_')"
  password="$(cat "/run/inmail/postgres-$service.password")"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v user="$user" -v db="$db" -v password="$password" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'password' NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE :"db" OWNER :"user";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
SQL
  # Its user connects over TLS only: a first-match rule ahead of the
  # image's catch-all `host all all all scram-sha-256`.
  sed -i "1i hostnossl all $user all reject" "$PGDATA/pg_hba.conf"
done
