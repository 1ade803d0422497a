#!/bin/sh
# Container entrypoint: run `tessera "$@"`, reading secrets from files rather than the environment.
#
#   TESSERA_PASSPHRASE_FILE  file holding the node passphrase (e.g. /run/secrets/node_passphrase)
#   PGPASSWORD_FILE          file holding the PostgreSQL password (libpq reads PGPASSWORD)
#
# `tessera-entrypoint init-once ARGS...` runs `tessera ARGS...` only when TESSERA_HOME has no
# tessera.toml yet, so a compose init service can run on every `up` without harm.
set -eu

if [ -n "${TESSERA_PASSPHRASE_FILE:-}" ]; then
    TESSERA_PASSPHRASE="$(cat "$TESSERA_PASSPHRASE_FILE")"
    export TESSERA_PASSPHRASE
fi
if [ -n "${PGPASSWORD_FILE:-}" ]; then
    PGPASSWORD="$(cat "$PGPASSWORD_FILE")"
    export PGPASSWORD
fi

if [ "${1:-}" = "init-once" ]; then
    shift
    if [ -f "${TESSERA_HOME:?TESSERA_HOME must be set}/tessera.toml" ]; then
        echo "tessera: $TESSERA_HOME is already initialised; nothing to do"
        exit 0
    fi
fi

exec tessera "$@"
