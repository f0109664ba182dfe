#!/bin/sh
# The state store pod's etcd side, one script so that every step uses the same flags.
#   store.sh etcd     init, then run etcd (TLS with client certificates, on the pod's loopback only)
#   store.sh proxy    run etcd grpc-proxy, the only door remote clusters have (TLS, client certificates
#                     from the store's CA and not on its CRL), once the readers exist; restart it when
#                     the CRL changes, so a revoked reader's open connections close too, and when the
#                     readers change (etcd 3.4's grpc-proxy stops delivering a range's events to every
#                     watcher of it once a reader's auth changed and another watcher joins; only a new
#                     proxy process cures it, so every reader logs in anew on a fresh one)
#   store.sh init     start etcd briefly on a private port, create root and the read-only role, enable
#                     auth, stop; with etcd's own certificate (no user once auth is on), so this
#                     container needs no root key. The proxy and the operator only know the public
#                     port, so nothing reaches the store before auth is on. Part of `etcd`, not an init
#                     container: one process orders the two steps, wherever the pod runs.
#   store.sh sync     keep reader users equal to the mounted Secret (as root): a new reader is added, a
#                     changed password applied and a removed reader deleted within a second of the
#                     kubelet updating the volume (about a minute), and every SYNC_INTERVAL seconds
# Settings come from the environment; the defaults are the paths deploy/base/store.yaml mounts.
set -eu

TLS=${STORE_TLS_DIR:-/etc/clustermesh/tls}
USERS=${STORE_USERS_DIR:-/etc/clustermesh/users}
DATA=${STORE_DATA_DIR:-/var/lib/clustermesh}
CLIENT_PORT=${STORE_CLIENT_PORT:-12379}
INIT_PORT=${STORE_INIT_PORT:-12383}
PEER_PORT=${STORE_PEER_PORT:-12380}
METRICS=${STORE_METRICS_ADDR:-0.0.0.0:12381}
PROXY_LISTEN=${PROXY_LISTEN_ADDR:-0.0.0.0:2379}
PROXY_METRICS=${PROXY_METRICS_ADDR:-0.0.0.0:12382}
READ_PREFIX=${STORE_READ_PREFIX:-cilium/}
SYNC_INTERVAL=${SYNC_INTERVAL:-60}
# Bounds what anyone can make the store hold (a reader can grant leases: etcd 3.4 checks no permission
# there). Past it etcd refuses writes and lease grants (alarm NOSPACE) until compacted and defragmented.
QUOTA=${STORE_QUOTA_BYTES:-268435456}
ROLE=clustermesh-reader
ENDPOINT=https://127.0.0.1:$CLIENT_PORT
CTL_ENDPOINT=$ENDPOINT

say() { echo "store.sh $MODE: $*" >&2; }

# Who etcdctl is: root (sync), or etcd's own certificate before auth is on (init).
CTL_ID=${CTL_ID:-root}

ctl() {
    ETCDCTL_API=3 etcdctl --endpoints="$CTL_ENDPOINT" --cacert="$TLS/ca.crt" --cert="$TLS/$CTL_ID.crt" \
        --key="$TLS/$CTL_ID.key" --dial-timeout=3s --command-timeout=10s "$@"
}

# Each replica's etcd is a cluster of its own, with its own cluster and member IDs (etcd derives them
# from the peer URLs and this token): a reader tells by the IDs that it reaches another store. Read
# once, when the data folder is made; kept across restarts of the container.
TOKEN=${STORE_CLUSTER_TOKEN:-clustermesh-$(cat /proc/sys/kernel/hostname)-$(date +%s%N)}

# etcd's command line; $1: the client URL.
etcd_argv() {
    set -- etcd --name=store --data-dir="$DATA/etcd" --initial-cluster-token="$TOKEN" \
        --listen-client-urls="$1" --advertise-client-urls="$1" \
        --listen-peer-urls="http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$PEER_PORT" \
        --initial-cluster="store=http://127.0.0.1:$PEER_PORT" --initial-cluster-state=new \
        --listen-metrics-urls="http://$METRICS" --enable-v2=false --snapshot-count=10000 \
        --auto-compaction-mode=periodic --auto-compaction-retention=1h --quota-backend-bytes="$QUOTA" \
        --cert-file="$TLS/etcd.crt" --key-file="$TLS/etcd.key" --trusted-ca-file="$TLS/ca.crt" --client-cert-auth
    echo "$@"
}

wait_healthy() {
    i=0
    until ctl endpoint health >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge "${1:-60}" ]; then
            say "etcd at $CTL_ENDPOINT is not healthy; see the etcd container's log"
            return 1
        fi
        sleep 1
    done
}

# The password last applied per user, hashed, so that an unchanged password is not set again: every
# change bumps etcd's auth revision and makes every connected reader log in anew.
applied() { echo "$DATA/users/$1.sha256"; }

# Each step is checked (a function called in a condition runs without `set -e`) and only done when
# missing: every grant bumps etcd's auth revision too.
ensure_roles() {
    if ! ctl user get root 2>/dev/null | grep -q '^Roles: .*root'; then
        ctl user get root >/dev/null 2>&1 || ctl user add root --no-password >/dev/null || return 1
        ctl user grant-role root root >/dev/null || return 1
    fi
    if ! ctl role get "$ROLE" 2>/dev/null | grep -qF "(prefix $READ_PREFIX)"; then
        ctl role get "$ROLE" >/dev/null 2>&1 || ctl role add "$ROLE" >/dev/null || return 1
        ctl role grant-permission "$ROLE" read "$READ_PREFIX" --prefix=true >/dev/null || return 1
    fi
}

enable_auth() {
    # etcd 3.4 has no "auth status": enabling twice is refused, so only a real failure is reported.
    out=$(ctl auth enable 2>&1) || case $out in
        *"already enabled"*|*"Authentication Enabled"*) ;;
        *) say "auth enable: $out"; return 1 ;;
    esac
}

sync_users() {
    mkdir -p "$DATA/users" || return 1
    changed=0
    ensure_roles || return 1
    for file in "$USERS"/*; do
        [ -f "$file" ] || continue
        user=$(basename "$file")
        sum=$(sha256sum <"$file" | cut -d' ' -f1) || return 1
        if ctl user get "$user" >/dev/null 2>&1; then
            if [ "$(cat "$(applied "$user")" 2>/dev/null || true)" != "$sum" ]; then
                ctl user passwd "$user" --interactive=false <"$file" >/dev/null || return 1
                changed=1
                say "new password for reader $user"
            fi
        else
            ctl user add "$user" --interactive=false <"$file" >/dev/null || return 1
            changed=1
            say "added reader $user (read-only on $READ_PREFIX)"
        fi
        if ! ctl user get "$user" 2>/dev/null | grep -q "^Roles: .*$ROLE"; then
            ctl user grant-role "$user" "$ROLE" >/dev/null || return 1
            changed=1
        fi
        echo "$sum" >"$(applied "$user")" || return 1
    done
    users=$(ctl user list) || return 1
    for user in $users; do
        if [ "$user" != root ] && [ ! -f "$USERS/$user" ]; then
            ctl user delete "$user" >/dev/null || return 1
            changed=1
            rm -f "$(applied "$user")"
            say "removed reader $user (no longer in the users Secret)"
        fi
    done
    enable_auth || return 1
    # The proxy restarts when this stamp changes (see the header).
    if [ "$changed" = 1 ] || [ ! -f "$DATA/users-changed" ]; then
        date +%s%N >"$DATA/users-changed" || return 1
    fi
    # The proxy opens its door once the readers exist (a reader sent to a new replica is not refused).
    touch "$DATA/users-synced"
}

init() {
    mkdir -p "$DATA"
    # The data folder outlives a restart of this container: auth is on already.
    if [ -f "$DATA/auth-enabled" ]; then
        return 0
    fi
    CTL_ENDPOINT=https://127.0.0.1:$INIT_PORT
    CTL_ID=etcd
    # shellcheck disable=SC2046
    $(etcd_argv "$CTL_ENDPOINT") >"$DATA/init-etcd.log" 2>&1 &
    pid=$!
    trap 'kill "$pid" 2>/dev/null || true' EXIT
    if ! wait_healthy 60 || ! ensure_roles || ! enable_auth; then
        cat "$DATA/init-etcd.log" >&2
        exit 1
    fi
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    trap - EXIT
    touch "$DATA/auth-enabled"
    CTL_ENDPOINT=$ENDPOINT
    CTL_ID=root
    say "auth on (root and role $ROLE); the etcd-users container adds the readers"
}

# What the kubelet last put in a mounted folder: it swaps a symlink (..data) on every update.
version_of() { readlink "$1/..data" 2>/dev/null || cat "$1"/* 2>/dev/null | sha256sum; }

crl_sum() { sha256sum <"$TLS/crl.pem" 2>/dev/null || echo none; }

users_stamp() { cat "$DATA/users-changed" 2>/dev/null || echo none; }

MODE=${1:-}
case $MODE in
    etcd)
        init
        # shellcheck disable=SC2046
        exec $(etcd_argv "$ENDPOINT")
        ;;
    proxy)
        i=0
        until [ -f "$DATA/users-synced" ]; do
            i=$((i + 1))
            [ $((i % 30)) -eq 0 ] && say "waiting for the etcd-users container to add the readers"
            sleep 1
        done
        pid=
        trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; exit 0' TERM INT
        while :; do
            sum=$(crl_sum)
            stamp=$(users_stamp)
            # The CRL is read at every TLS handshake: a revoked reader cannot connect anew.
            etcd grpc-proxy start --endpoints="127.0.0.1:$CLIENT_PORT" --listen-addr="$PROXY_LISTEN" \
                --metrics-addr="http://$PROXY_METRICS" --data-dir="$DATA/proxy" \
                --cacert="$TLS/ca.crt" --cert="$TLS/proxy-backend.crt" --key="$TLS/proxy-backend.key" \
                --trusted-ca-file="$TLS/ca.crt" --cert-file="$TLS/proxy.crt" --key-file="$TLS/proxy.key" \
                --client-crl-file="$TLS/crl.pem" &
            pid=$!
            while kill -0 "$pid" 2>/dev/null && [ "$(crl_sum)" = "$sum" ] && [ "$(users_stamp)" = "$stamp" ]; do
                sleep 1
            done
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid" || exit $?
                exit 1
            fi
            # ...but its open connections stay: a restart closes them (other readers reconnect).
            if [ "$(crl_sum)" != "$sum" ]; then
                say "the CRL changed: restarting grpc-proxy to close revoked readers' connections"
            else
                say "a reader changed: restarting grpc-proxy so that every reader logs in anew"
            fi
            kill "$pid"
            wait "$pid" 2>/dev/null || true
        done
        ;;
    init)
        init
        ;;
    sync)
        while :; do
            seen=$(version_of "$USERS")
            if wait_healthy 30 && ! sync_users; then
                say "will try again in 5s"
                sleep 5
                continue
            fi
            i=0
            while [ "$i" -lt "$SYNC_INTERVAL" ] && [ "$(version_of "$USERS")" = "$seen" ]; do
                sleep 1
                i=$((i + 1))
            done
        done
        ;;
    *)
        echo "usage: store.sh etcd|proxy|init|sync" >&2
        exit 2
        ;;
esac
