# Shared helpers for scripts/bench/*: free ports, waiting on a condition with a deadline, a
# kermail node on a fresh data folder, a private Postfix and a private Dovecot instance.
# Sourced, not executed. Everything lives under $BENCH_TMP and is torn down by bench_cleanup.

BENCH_LIB="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$BENCH_LIB/../../.." && pwd)"

# Deadline for any single wait (seconds).
BENCH_WAIT_SECS="${BENCH_WAIT_SECS:-300}"

log() { printf '%s\n' "$*" >&2; }
die() { log "bench: $*"; exit 1; }

# free_port: prints a TCP port on 127.0.0.1 that was free a moment ago.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_until DESCRIPTION SECONDS COMMAND...: runs COMMAND every 50 ms until it succeeds;
# fails after SECONDS.
wait_until() {
    local what="$1" secs="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "timed out after ${secs}s waiting for: $what"
        fi
        sleep 0.05
    done
}

# wait_tcp PORT: waits until 127.0.0.1:PORT accepts connections.
tcp_open() { python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$1"; }
wait_tcp() { wait_until "127.0.0.1:$1 to accept" "$BENCH_WAIT_SECS" tcp_open "$1"; }

# now_ns: monotonic-enough wall clock in nanoseconds.
now_ns() { date +%s%N; }

# rate COUNT NANOSECONDS: messages per second, two decimals.
rate() { python3 -c 'import sys; print("%.2f" % (int(sys.argv[1]) / (int(sys.argv[2]) / 1e9)))' "$1" "$2"; }
# ratio A B: A/B with two decimals.
ratio() { python3 -c 'import sys; b=float(sys.argv[2]); print("%.2f" % (float(sys.argv[1]) / b) if b else "inf")' "$1" "$2"; }

BENCH_PIDS=()
bench_cleanup() {
    local pid
    for pid in "${BENCH_PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    if [ -n "${POSTFIX_ETC:-}" ] && [ -f "$POSTFIX_ETC/main.cf" ]; then
        postfix -c "$POSTFIX_ETC" stop >/dev/null 2>&1 || true
    fi
    if [ -n "${DOVECOT_CONF:-}" ] && [ -f "$DOVECOT_CONF" ]; then
        doveadm -c "$DOVECOT_CONF" stop >/dev/null 2>&1 || true
    fi
    if [ -n "${BENCH_TMP:-}" ] && [ -z "${BENCH_KEEP:-}" ]; then
        rm -rf "$BENCH_TMP"
    fi
}

bench_init() {
    BENCH_TMP="$(mktemp -d /tmp/kermail-bench.XXXXXX)"
    chmod 755 "$BENCH_TMP"
    trap bench_cleanup EXIT
}

# ---------------------------------------------------------------------------------------------
# kermail

# kermail_build: release build of the node binary; sets KERMAIL_BIN.
kermail_build() {
    (cd "$REPO_ROOT" && cargo build --release --bin kermail >&2)
    KERMAIL_BIN="$REPO_ROOT/target/release/kermail"
}

# kermail_start: a node on a fresh data folder with free loopback ports (plus the sections in
# KERMAIL_EXTRA_CONF, if set). Sets KERMAIL_CONF,
# KERMAIL_DATA, KERMAIL_SMTP_PORT, KERMAIL_IMAP_PORT, KERMAIL_PID. Ready when `kermail status`
# exits 0 (the admin socket is created last, after every listener is bound).
kermail_start() {
    local dir="$BENCH_TMP/kermail"
    mkdir -p "$dir"
    KERMAIL_DATA="$dir/data"
    KERMAIL_CONF="$dir/kermail.toml"
    KERMAIL_SMTP_PORT="$(free_port)"
    KERMAIL_IMAP_PORT="$(free_port)"
    KERMAIL_IMAPS_PORT="$(free_port)"
    cat >"$KERMAIL_CONF" <<TOML
[node]
data_dir = "$KERMAIL_DATA"
hostname = "mx.kermail.test"
[smtp]
listen = ["127.0.0.1:$KERMAIL_SMTP_PORT"]
submission_listen = ["127.0.0.1:$(free_port)"]
submissions_listen = ["127.0.0.1:$(free_port)"]
[imap]
listen = ["127.0.0.1:$KERMAIL_IMAP_PORT"]
listen_tls = ["127.0.0.1:$KERMAIL_IMAPS_PORT"]
[autoconfig]
listen = ["127.0.0.1:$(free_port)"]
listen_tls = ["127.0.0.1:$(free_port)"]
[managesieve]
listen = ["127.0.0.1:$(free_port)"]
TOML
    # KERMAIL_EXTRA_CONF: more sections for this node (e.g. [inbound] and [spam]).
    if [ -n "${KERMAIL_EXTRA_CONF:-}" ]; then
        printf '%s\n' "$KERMAIL_EXTRA_CONF" >>"$KERMAIL_CONF"
    fi
    KERMAIL_LOG="${KERMAIL_LOG:-warn}" "$KERMAIL_BIN" serve --config "$KERMAIL_CONF" 2>"$dir/stderr.log" &
    KERMAIL_PID=$!
    BENCH_PIDS+=("$KERMAIL_PID")
    local deadline=$((SECONDS + BENCH_WAIT_SECS))
    until "$KERMAIL_BIN" status --config "$KERMAIL_CONF" >/dev/null 2>&1; do
        if ! kill -0 "$KERMAIL_PID" 2>/dev/null; then
            cat "$dir/stderr.log" >&2
            die "kermail serve exited before it was ready"
        fi
        ((SECONDS < deadline)) || die "kermail not ready after ${BENCH_WAIT_SECS}s"
        sleep 0.05
    done
}

# kermail_cli ARGS...: the admin CLI against the bench node.
kermail_cli() { "$KERMAIL_BIN" "$@" --config "$KERMAIL_CONF"; }

# kermail_account DOMAIN USER PASSWORD
kermail_account() {
    kermail_cli domain add "$1" >&2
    printf '%s\n' "$3" | kermail_cli user add "$2@$1" --password-stdin >&2
}

kermail_stop() {
    if [ -n "${KERMAIL_PID:-}" ]; then
        kill "$KERMAIL_PID" 2>/dev/null || true
        wait "$KERMAIL_PID" 2>/dev/null || true
        KERMAIL_PID=
    fi
}

# vm_hwm PID: peak resident set size (VmHWM) in kB.
vm_hwm() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# imap_message_count PORT USER PASSWORD: messages in INBOX, read with imaplib (STATUS).
imap_message_count() {
    python3 - "$@" <<'PY'
import imaplib, sys, re
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
c = imaplib.IMAP4("127.0.0.1", port)
c.login(user, password)
typ, data = c.status("INBOX", "(MESSAGES)")
assert typ == "OK", data
print(re.search(rb"MESSAGES (\d+)", data[0]).group(1).decode())
c.logout()
PY
}

# ---------------------------------------------------------------------------------------------
# A private Postfix instance: its own config_directory, queue, data folder and Maildir under
# $BENCH_TMP/postfix, smtpd on a free 127.0.0.1 port, one virtual domain delivered by virtual(8)
# to a Maildir. The system's Postfix (port 25) is not touched. Stock settings otherwise,
# except that no service is chrooted (a chroot would need copies of /etc files).
# Sets POSTFIX_ETC, POSTFIX_PORT, POSTFIX_MAILDIR.
postfix_start() {
    local domain="$1" user="$2"
    local root="$BENCH_TMP/postfix"
    POSTFIX_ETC="$root/etc"
    POSTFIX_PORT="$(free_port)"
    mkdir -p "$POSTFIX_ETC" "$root/queue" "$root/data" "$root/mail"
    chown postfix "$root/data"
    # virtual(8) delivers as this uid/gid; it owns the Maildir tree.
    local vuid vgid
    vuid="$(id -u nobody)"
    vgid="$(id -g nobody)"
    chown "$vuid:$vgid" "$root/mail"
    POSTFIX_MAILDIR="$root/mail/$domain/$user/"
    printf '%s@%s %s/%s/\n' "$user" "$domain" "$domain" "$user" >"$POSTFIX_ETC/vmailbox"
    cat >"$POSTFIX_ETC/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $root/queue
data_directory = $root/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.test
mydomain = postfix-bench.test
myorigin = \$myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
maillog_file = $root/maillog
maillog_file_prefixes = $root
biff = no
smtpd_banner = \$myhostname ESMTP
message_size_limit = 10240000
virtual_mailbox_domains = $domain
virtual_mailbox_base = $root/mail
virtual_mailbox_maps = texthash:$POSTFIX_ETC/vmailbox
virtual_minimum_uid = 100
virtual_uid_maps = static:$vuid
virtual_gid_maps = static:$vgid
CF
    # Debian's stock master.cf with the smtpd moved to our port and chroot off everywhere.
    awk -v port="$POSTFIX_PORT" '
        /^#/ || /^[ \t]/ || NF < 8 { print; next }
        $1 == "smtp" && $2 == "inet" { $1 = "127.0.0.1:" port }
        $2 ~ /^(inet|unix|unix-dgram|fifo|pass)$/ { $5 = "n" }
        { print }' /etc/postfix/master.cf >"$POSTFIX_ETC/master.cf"
    postfix -c "$POSTFIX_ETC" set-permissions >/dev/null 2>&1 || true
    postfix -c "$POSTFIX_ETC" check >&2
    postfix -c "$POSTFIX_ETC" start >&2
    wait_tcp "$POSTFIX_PORT"
}

# maildir_count DIR: messages delivered into a Maildir (new/ and cur/).
maildir_count() {
    local n=0
    [ -d "$1/new" ] && n=$((n + $(find "$1/new" -type f | wc -l)))
    [ -d "$1/cur" ] && n=$((n + $(find "$1/cur" -type f | wc -l)))
    echo "$n"
}

# ---------------------------------------------------------------------------------------------
# A private Dovecot instance: its own configuration, base_dir, state and logs under
# $BENCH_TMP/dovecot, IMAP (no TLS: loopback only, like the kermail side's plain port) on a free
# 127.0.0.1 port, passdb from a static passwd-file, static userdb, Maildir. Stock settings
# otherwise (but for mail_max_userip_connections). Sets DOVECOT_CONF, DOVECOT_PORT.
dovecot_start() {
    local address="$1" password="$2"
    local root="$BENCH_TMP/dovecot"
    DOVECOT_CONF="$root/dovecot.conf"
    DOVECOT_PORT="$(free_port)"
    mkdir -p "$root/run" "$root/state" "$root/home"
    local vuid vgid
    vuid="$(id -u nobody)"
    vgid="$(id -g nobody)"
    chown "$vuid:$vgid" "$root/home"
    printf '%s:{PLAIN}%s::::::\n' "$address" "$password" >"$root/users"
    cat >"$DOVECOT_CONF" <<CONF
instance_name = kermail-bench
base_dir = $root/run
state_dir = $root/state
log_path = $root/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~/Maildir
first_valid_uid = 1
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $root/users
}
userdb {
  driver = static
  args = uid=$vuid gid=$vgid home=$root/home/%u
}
# The 20 concurrent sessions of scripts/bench/imap's raw client log in as one user from
# 127.0.0.1 (the stock limit is 10).
protocol imap {
  mail_max_userip_connections = 50
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $DOVECOT_PORT
  }
  inet_listener imaps {
    port = 0
  }
}
CONF
    dovecot -c "$DOVECOT_CONF" >&2 || { cat "$root/dovecot.log" >&2; die "dovecot did not start"; }
    wait_tcp "$DOVECOT_PORT"
}
