#!/usr/bin/env bash
# A local single-node Apache Kafka (KRaft: one process that is broker and controller) for developers and tests.
#
#   kafka.sh fetch          copy the broker's jars into deploy/kafka/lib/ with Maven (skipped when already there)
#   kafka.sh start [DIR]    start a broker in the background on free ports of 127.0.0.1, wait until it accepts
#                           connections, print KAFKA_BOOTSTRAP=127.0.0.1:PORT
#   kafka.sh run [DIR]      the same in the foreground: this process becomes the broker (tests/kafka_broker.py)
#   kafka.sh stop [DIR]     stop it and delete its data
#   kafka.sh status [DIR]   print KAFKA_BOOTSTRAP=... and exit 0 when it runs, else exit 1
#
# DIR (default: .kafka at the repository root) keeps the state: kafka.env (KAFKA_BOOTSTRAP, KAFKA_PID, KAFKA_PGID,
# KAFKA_DATA, KAFKA_LOG), the generated server.properties and log4j2.properties, server.log and kafka.out.
# The topic data lives in a new temporary folder (KAFKA_DATA), which stop deletes.
#
# Environment: KAFKA_PORT / KAFKA_CONTROLLER_PORT (default: free ports), KAFKA_START_TIMEOUT (start: seconds,
# default 60), KAFKA_DATA_DIR (run: data folder, default a new temporary one), KAFKA_PDEATHSIG (run: signal the
# broker gets when its parent dies, e.g. TERM; needs setpriv), KAFKA_HEAP_OPTS (default
# -Xms256m -Xmx512m), JAVA_HOME (default: java on PATH; Java 17 or newer).
#
# Extra listeners and settings (for example a SASL_SSL listener for the security tests; unset, nothing changes):
#   KAFKA_EXTRA_LISTENERS   comma-separated NAME://127.0.0.1:PORT: added to listeners and advertised.listeners.
#                           NAME is SSL, SASL_PLAINTEXT or SASL_SSL (or one of those, or PLAINTEXT, with a suffix
#                           such as SASL_SSL_2) and maps to that security protocol. KAFKA_BOOTSTRAP stays PLAINTEXT.
#   KAFKA_EXTRA_PROPERTIES  a file appended to server.properties (a key set there overrides the generated one: the
#                           last occurrence wins), e.g. ssl.keystore.* and listener.name.sasl_ssl.* settings
#   KAFKA_FORMAT_ARGS       extra arguments for `StorageTool format`, split on whitespace without globbing, e.g.
#                           --add-scram SCRAM-SHA-512=[name=alice,password=SECRET]
#
# One node of a multi-node KRaft cluster (every node broker and controller; tests/reliability.py KafkaCluster; unset,
# the node is the single one above):
#   KAFKA_NODE_ID           node.id (default 1)
#   KAFKA_QUORUM_VOTERS     controller.quorum.voters, e.g. 1@127.0.0.1:P1,2@127.0.0.1:P2,3@127.0.0.1:P3 (default
#                           1@127.0.0.1:KAFKA_CONTROLLER_PORT); must name this node at its controller port
#   KAFKA_CLUSTER_ID        the cluster id to format the storage with (default: a random one); the same on every node
#   KAFKA_REPLICATION       N: default.replication.factor, offsets.topic.replication.factor,
#                           transaction.state.log.replication.factor and share.coordinator.state.topic.replication.factor
#                           N, and min.insync.replicas and the two min.isr settings KAFKA_MIN_ISR (default N-1, at
#                           least 1): KAFKA_REPLICATION=3 gives 3 and 2. Unset, all are 1.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
lib="$here/lib"
java="${JAVA_HOME:+$JAVA_HOME/bin/}java"

die() { echo "kafka.sh: $*" >&2; exit 1; }

kafka_version() {
  sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml" | head -n1
}

# lib/ is complete when its stamp names this Kafka version and this pom (hash), and the broker jar is there.
want_stamp() {
  echo "kafka $(kafka_version) pom $(sha256sum "$here/pom.xml" | cut -c1-16)"
}

cmd_fetch() {
  local want ver mlog
  want="$(want_stamp)"
  ver="$(kafka_version)"
  if [ -f "$lib/.stamp" ] && [ "$(cat "$lib/.stamp")" = "$want" ] && [ -f "$lib/kafka_2.13-$ver.jar" ]; then
    return 0
  fi
  command -v mvn >/dev/null || die "fetch needs Maven (mvn) to download Apache Kafka $ver's jars"
  echo "kafka.sh: fetching Apache Kafka $ver jars into $lib" >&2
  rm -rf "$lib.tmp"
  mlog="$(mktemp)"
  if ! (cd "$here" && mvn -q -B dependency:copy-dependencies -DoutputDirectory="$lib.tmp") >"$mlog" 2>&1; then
    cat "$mlog" >&2
    rm -rf "$mlog" "$lib.tmp"
    die "mvn dependency:copy-dependencies failed"
  fi
  rm -f "$mlog"
  [ -f "$lib.tmp/kafka_2.13-$ver.jar" ] || die "mvn did not produce kafka_2.13-$ver.jar"
  echo "$want" > "$lib.tmp/.stamp"
  rm -rf "$lib"
  mv "$lib.tmp" "$lib"
}

state_dir() {
  local dir="${1:-$root/.kafka}"
  mkdir -p "$dir"
  (cd "$dir" && pwd)
}

# Read DIR/kafka.env into KAFKA_* variables; return 1 when there is none.
load_state() {
  KAFKA_BOOTSTRAP="" KAFKA_PID="" KAFKA_PGID="" KAFKA_DATA="" KAFKA_LOG=""
  [ -f "$1/kafka.env" ] || return 1
  # shellcheck disable=SC1091
  . "$1/kafka.env"
}

# A pid that exists and is no zombie.
alive() {
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  case "$(ps -o stat= -p "$1" 2>/dev/null)" in Z*|"") return 1 ;; esac
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# A random KRaft cluster id: 16 random bytes, URL-safe base64 without padding (as StorageTool random-uuid makes).
cluster_id() {
  local id
  while :; do
    id="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    case "$id" in -*|AAAAAAAAAAAAAAAAAAAAA*) ;; *) echo "$id"; return ;; esac
  done
}

java_major() {
  "$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1
}

log_tail() {
  local f
  for f in "$1/server.log" "$1/kafka.out"; do
    if [ -s "$f" ]; then echo "--- last lines of $f ---"; tail -n 40 "$f"; fi
  done
}

# Delete the data folder named in the state, but only one that start/run made (or KAFKA_DATA_DIR named).
drop_data() {
  if [ -n "${KAFKA_DATA:-}" ] && [ -d "$KAFKA_DATA/logs" ]; then rm -rf "$KAFKA_DATA"; fi
}

# KAFKA_EXTRA_LISTENERS -> xl_listeners (",NAME://127.0.0.1:PORT..." for listeners and advertised.listeners) and
# xl_map (",NAME:PROTOCOL..." for listener.security.protocol.map); both empty when it is unset.
extra_listeners() {
  local spec="$1" port="$2" cport="$3" item name proto lport seen=" PLAINTEXT CONTROLLER "
  local -a items=()
  xl_listeners="" xl_map=""
  IFS=',' read -r -a items <<< "$spec"
  for item in ${items[@]+"${items[@]}"}; do
    [[ "$item" =~ ^([A-Z][A-Z0-9_]*)://127\.0\.0\.1:([0-9]+)$ ]] \
      || die "KAFKA_EXTRA_LISTENERS: '$item' is not NAME://127.0.0.1:PORT (the broker binds 127.0.0.1 only)"
    name="${BASH_REMATCH[1]}" lport="${BASH_REMATCH[2]}"
    case "$name" in
      SASL_SSL|SASL_SSL_*) proto=SASL_SSL ;;
      SASL_PLAINTEXT|SASL_PLAINTEXT_*) proto=SASL_PLAINTEXT ;;
      SSL|SSL_*) proto=SSL ;;
      PLAINTEXT_*) proto=PLAINTEXT ;;
      *) die "KAFKA_EXTRA_LISTENERS: listener name $name is not SSL, SASL_PLAINTEXT, SASL_SSL or PLAINTEXT_<x>" ;;
    esac
    case "$seen" in *" $name "*) die "KAFKA_EXTRA_LISTENERS: listener name $name is used twice" ;; esac
    { [ "$lport" != "$port" ] && [ "$lport" != "$cport" ]; } \
      || die "KAFKA_EXTRA_LISTENERS: port $lport of $name is the client or controller port"
    seen="$seen$name "
    xl_listeners="$xl_listeners,$name://127.0.0.1:$lport"
    xl_map="$xl_map,$name:$proto"
  done
}

# KAFKA_NODE_ID, KAFKA_QUORUM_VOTERS, KAFKA_REPLICATION and KAFKA_MIN_ISR -> node_id, voters, rf and isr (checked);
# unset, the single node: id 1, itself the only voter, replication 1.
cluster_settings() {
  local cport="$1"
  node_id="${KAFKA_NODE_ID:-1}"
  [[ "$node_id" =~ ^[0-9]+$ ]] || die "KAFKA_NODE_ID: '$node_id' is not a non-negative integer"
  voters="${KAFKA_QUORUM_VOTERS:-$node_id@127.0.0.1:$cport}"
  [[ "$voters" =~ ^[0-9]+@127\.0\.0\.1:[0-9]+(,[0-9]+@127\.0\.0\.1:[0-9]+)*$ ]] \
    || die "KAFKA_QUORUM_VOTERS: '$voters' is not ID@127.0.0.1:PORT[,ID@127.0.0.1:PORT...]"
  case ",$voters," in
    *",$node_id@127.0.0.1:$cport,"*) ;;
    *) die "KAFKA_QUORUM_VOTERS: '$voters' does not name this node ($node_id@127.0.0.1:$cport)" ;;
  esac
  rf="${KAFKA_REPLICATION:-1}"
  [[ "$rf" =~ ^[1-9][0-9]*$ ]] || die "KAFKA_REPLICATION: '$rf' is not a positive integer"
  isr="${KAFKA_MIN_ISR:-$(( rf > 1 ? rf - 1 : 1 ))}"
  { [[ "$isr" =~ ^[1-9][0-9]*$ ]] && [ "$isr" -le "$rf" ]; } \
    || die "KAFKA_MIN_ISR: '$isr' is not a positive integer at most KAFKA_REPLICATION ($rf)"
}

# Write DIR/server.properties and DIR/log4j2.properties, format the KRaft storage, then become the broker (exec):
# the broker keeps this process's pid, which DIR/kafka.env names.
cmd_run() {
  local dir port cport data major node_id voters rf isr
  dir="$(state_dir "${1:-}")"
  cmd_fetch
  major="$(java_major)"
  [ -n "$major" ] && [ "$major" -ge 17 ] \
    || die "Apache Kafka $(kafka_version) needs Java 17 or newer ($java: ${major:-not found})"

  port="${KAFKA_PORT:-$(free_port)}"
  cport="${KAFKA_CONTROLLER_PORT:-$(free_port)}"
  while [ "$cport" = "$port" ]; do cport="$(free_port)"; done
  extra_listeners "${KAFKA_EXTRA_LISTENERS:-}" "$port" "$cport"
  cluster_settings "$cport"
  if [ -n "${KAFKA_EXTRA_PROPERTIES:-}" ] && [ ! -r "$KAFKA_EXTRA_PROPERTIES" ]; then
    die "KAFKA_EXTRA_PROPERTIES names no readable file: $KAFKA_EXTRA_PROPERTIES"
  fi
  local -a format_args=()
  read -r -a format_args <<< "${KAFKA_FORMAT_ARGS:-}"
  if [ -n "${KAFKA_DATA_DIR:-}" ]; then
    data="$KAFKA_DATA_DIR"
    mkdir -p "$data"
  else
    data="$(mktemp -d "${TMPDIR:-/tmp}/kafka-data.XXXXXX")"
  fi

  cat > "$dir/server.properties" <<EOF
# Generated by deploy/kafka/kafka.sh: one node that is both broker and controller, on 127.0.0.1 only.
process.roles=broker,controller
node.id=$node_id
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport$xl_listeners
advertised.listeners=PLAINTEXT://127.0.0.1:$port$xl_listeners
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT$xl_map
log.dirs=$data/logs
num.partitions=4
default.replication.factor=$rf
min.insync.replicas=$isr
auto.create.topics.enable=false
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
log.cleaner.dedupe.buffer.size=16777216
EOF
  if [ -n "${KAFKA_EXTRA_PROPERTIES:-}" ]; then
    { echo "# Appended from KAFKA_EXTRA_PROPERTIES=$KAFKA_EXTRA_PROPERTIES (the last occurrence of a key wins)."
      cat "$KAFKA_EXTRA_PROPERTIES"; echo; } >> "$dir/server.properties"
  fi

  cat > "$dir/log4j2.properties" <<EOF
# Generated by deploy/kafka/kafka.sh: the broker logs to $dir/server.log only.
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $dir/server.log
appender.file.append = false
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF

  # shellcheck disable=SC2206
  local jvm=(-server ${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20
             -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
             -Dlog4j2.configurationFile="$dir/log4j2.properties" -Dkafka.logs.dir="$dir"
             -cp "$lib/*")
  # storage formatted before (a broker started again on its KAFKA_DATA_DIR) keeps its cluster id and data
  if [ ! -f "$data/logs/meta.properties" ]; then
    "$java" "${jvm[@]}" kafka.tools.StorageTool format --ignore-formatted \
        --cluster-id "${KAFKA_CLUSTER_ID:-$(cluster_id)}" --config "$dir/server.properties" ${format_args[@]+"${format_args[@]}"} \
      || { [ -n "${KAFKA_DATA_DIR:-}" ] || rm -rf "$data"; die "formatting the KRaft storage in $data failed"; }
  fi

  cat > "$dir/kafka.env" <<EOF
KAFKA_BOOTSTRAP=127.0.0.1:$port
KAFKA_PID=$$
KAFKA_PGID=$(ps -o pgid= -p $$ | tr -d ' ')
KAFKA_DATA=$data
KAFKA_LOG=$dir/server.log
EOF
  # KAFKA_PDEATHSIG=TERM (tests/kafka_broker.py sets it): the broker gets that signal when its parent dies, so a
  # killed test run leaves no broker behind.
  if [ -n "${KAFKA_PDEATHSIG:-}" ] && command -v setpriv >/dev/null; then
    exec setpriv --pdeathsig "$KAFKA_PDEATHSIG" "$java" "${jvm[@]}" kafka.Kafka "$dir/server.properties"
  fi
  exec "$java" "${jvm[@]}" kafka.Kafka "$dir/server.properties"
}

# `run` in the background, in a process group of its own; wait until the broker accepts connections.
cmd_start() {
  local dir timeout pid deadline
  dir="$(state_dir "${1:-}")"
  if load_state "$dir" && alive "$KAFKA_PID"; then
    echo "kafka.sh: already running (pid $KAFKA_PID, state in $dir)" >&2
    echo "KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP"
    return 0
  fi
  if [ -f "$dir/kafka.env" ]; then cmd_stop "$dir" 2>/dev/null; fi
  cmd_fetch
  timeout="${KAFKA_START_TIMEOUT:-60}"
  rm -f "$dir/server.log"
  unset KAFKA_PDEATHSIG  # this broker outlives this script
  setsid bash "$here/kafka.sh" run "$dir" </dev/null >"$dir/kafka.out" 2>&1 &
  pid=$!
  deadline=$((SECONDS + timeout))
  while :; do
    if ! alive "$pid"; then
      log_tail "$dir" >&2
      if load_state "$dir"; then drop_data; fi
      rm -f "$dir/kafka.env"
      die "the broker exited during startup (see $dir/server.log and $dir/kafka.out)"
    fi
    if load_state "$dir" && grep -q "Kafka Server started" "$dir/server.log" 2>/dev/null \
        && (exec 3<>"/dev/tcp/${KAFKA_BOOTSTRAP%:*}/${KAFKA_BOOTSTRAP##*:}") 2>/dev/null; then
      break
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log_tail "$dir" >&2
      kill -KILL -- "-$pid" 2>/dev/null || true
      if load_state "$dir"; then drop_data; fi
      rm -f "$dir/kafka.env"
      die "the broker did not start within ${timeout}s"
    fi
    sleep 0.1
  done
  echo "KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP"
}

cmd_stop() {
  local dir i
  dir="$(state_dir "${1:-}")"
  if ! load_state "$dir"; then
    echo "kafka.sh: no broker state in $dir" >&2
    return 0
  fi
  if alive "$KAFKA_PID"; then
    kill -TERM -- "-${KAFKA_PGID:-$KAFKA_PID}" 2>/dev/null || kill -TERM "$KAFKA_PID" 2>/dev/null || true
    for i in $(seq 1 150); do alive "$KAFKA_PID" || break; sleep 0.2; done
    if alive "$KAFKA_PID"; then
      echo "kafka.sh: the broker did not stop within 30s; killing it" >&2
      kill -KILL -- "-${KAFKA_PGID:-$KAFKA_PID}" 2>/dev/null || kill -KILL "$KAFKA_PID" 2>/dev/null || true
    fi
  fi
  drop_data
  rm -f "$dir/kafka.env"
  echo "kafka.sh: stopped" >&2
}

cmd_status() {
  local dir
  dir="$(state_dir "${1:-}")"
  if load_state "$dir" && alive "$KAFKA_PID"; then
    echo "KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP"
    return 0
  fi
  return 1
}

case "${1:-}" in
  fetch) cmd_fetch ;;
  start) cmd_start "${2:-}" ;;
  run) cmd_run "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  status) cmd_status "${2:-}" ;;
  *) echo "usage: $0 fetch | start [DIR] | run [DIR] | stop [DIR] | status [DIR]" >&2; exit 2 ;;
esac
