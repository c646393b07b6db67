#!/usr/bin/env bash
# A real SLURM cluster on this machine, for trying and testing the sbatch jobs
# that `nemo-lossfree slurm` renders.
#
#   examples/slurm/local_cluster.sh start [--nodes N]   # install if missing, configure, start
#   examples/slurm/local_cluster.sh status
#   examples/slurm/local_cluster.sh env                 # prints: export SLURM_CONF=...
#   examples/slurm/local_cluster.sh stop
#
# --nodes 1 (default): one slurmd on 127.0.0.1, named after this host.
# --nodes N (N >= 2): N emulated nodes, each a network namespace with its own
#   hostname (UTS namespace), its own address on a private bridge that never
#   leaves the machine (10.213.0.0/24, see NET below), and its own slurmd, so a
#   job's ranks rendezvous across "nodes" over a real network stack.
#
# Everything lives under $NLF_SLURM_STATE (default /tmp/nemo-lossfree-slurm):
# slurm.conf, munge key and socket, spool dirs, logs, pid files. `stop` ends
# only the daemons whose pid files are there and removes only the namespaces
# and links this script created. Needs root (Debian/Ubuntu with apt-get).
set -euo pipefail

STATE=${NLF_SLURM_STATE:-/tmp/nemo-lossfree-slurm}
CONF=$STATE/etc/slurm.conf
# Ports off SLURM's defaults (6817/6818) so a system SLURM can run beside us.
CTLD_PORT=${NLF_SLURMCTLD_PORT:-6917}
SLURMD_PORT=${NLF_SLURMD_PORT:-6918}
# Emulated nodes: bridge, namespaces and addresses, all private to this host.
NET=10.213.0
BRIDGE=nlfbr0
NS_PREFIX=nlf-node
# The bridge, namespaces and addresses above are one set per machine: this
# file names the state dir of the cluster that owns them.
NODES_OWNER=/run/nemo-lossfree-slurm-nodes.owner

die() { echo "local_cluster: $*" >&2; exit 1; }
log() { echo "local_cluster: $*"; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"; }

install_packages() {
  local nodes=$1 packages=()
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    || packages+=(slurm-wlm)
  command -v munged >/dev/null || packages+=(munge)
  # Emulated nodes need ip (iproute2); nsenter/unshare come with util-linux.
  if [ "$nodes" -gt 1 ] && ! command -v ip >/dev/null; then packages+=(iproute2); fi
  [ ${#packages[@]} -gt 0 ] || return 0
  command -v apt-get >/dev/null || die "${packages[*]} missing and apt-get is not available"
  log "installing ${packages[*]} (apt-get)"
  # The packages' postinst scripts may try to start services; we start our
  # own daemons with our own configuration anyway.
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

real_memory_mb() {
  # Announce a little less than the machine has, so slurmd's own check
  # (RealMemory <= what it measures) always passes.
  awk '/^MemTotal:/ { printf "%d\n", $2 / 1024 * 0.9 }' /proc/meminfo
}

node_names() {
  local n=$1
  if [ "$n" = 1 ]; then hostname -s; else for i in $(seq 1 "$n"); do echo "node$i"; done; fi
}

write_config() {
  local nodes=$1 ctld_host=$2 ctld_addr=$3
  local cpus mem
  # --all: the machine's CPUs. Plain nproc honours OMP_NUM_THREADS, and a shell that
  # exported OMP_NUM_THREADS=1 got a one-CPU node on which every 2-task job stayed PENDING.
  cpus=$(nproc --all)
  mem=$(real_memory_mb)
  mkdir -p "$STATE"/{etc,run,log,ctld,munge}
  # munged wants its socket directory readable by all, its key private.
  chmod 755 "$STATE/munge"
  {
    echo "# Written by examples/slurm/local_cluster.sh for this machine ($nodes node(s))."
    echo "ClusterName=nemolossfree"
    echo "SlurmctldHost=$ctld_host($ctld_addr)"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmdPort=$SLURMD_PORT"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # Our own munged, on our own socket: nothing shared with a system munge.
    # cred_expire is also how long a requeued job waits before it may start
    # again (default 120 s); on one machine 10 s is plenty.
    echo "AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10"
    echo "StateSaveLocation=$STATE/ctld"
    echo "SlurmdSpoolDir=$STATE/spool/%n"
    echo "SlurmctldPidFile=$STATE/run/slurmctld.pid"
    echo "SlurmdPidFile=$STATE/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
    echo "SlurmdLogFile=$STATE/log/slurmd-%n.log"
    # No cgroups needed (and none in many containers): track tasks by /proc.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "SchedulerType=sched/backfill"
    # Start a requeued job seconds after it may run again, not at the next
    # 30-60 s scheduling pass.
    echo "SchedulerParameters=sched_interval=5,bf_interval=5"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    # Preemption and resume: jobs may requeue themselves (scontrol requeue).
    echo "JobRequeue=1"
    # Keep finished jobs visible to `scontrol show job` for 10 minutes (tests read them).
    echo "MinJobAge=600"
    echo "SlurmctldTimeout=30"
    echo "SlurmdTimeout=60"
    # How long a daemon or client waits for a reply (default 10 s). On a busy
    # machine a slurmd can take longer; slurmctld then counts the request as
    # failed and resends it 60 s later. A resent "cancel step <job>.0" from
    # before a requeue then kills the requeued run's step, which has the same
    # job and step id (seen here: the preempted job failed after its restart).
    echo "MessageTimeout=60"
    echo "KillWait=10"
    local names
    names=$(node_names "$nodes")
    local i=0
    for name in $names; do
      i=$((i + 1))
      mkdir -p "$STATE/spool/$name"
      if [ "$nodes" = 1 ]; then
        echo "NodeName=$name NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
      else
        echo "NodeName=$name NodeHostname=$name NodeAddr=$NET.$((i + 1)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
      fi
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
  # task/none and linuxproc need no cgroups; the file stops slurmd looking for /etc/slurm/cgroup.conf.
  echo "CgroupAutomount=no" >"$STATE/etc/cgroup.conf"
  echo "$nodes" >"$STATE/nodes"
}

start_munge() {
  pid_alive "$STATE/run/munged.pid" && return
  # A fresh key per cluster: every daemon here runs on this machine.
  if [ ! -s "$STATE/munge/munge.key" ]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge/munge.key"
  fi
  munged --force --key-file="$STATE/munge/munge.key" \
    --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/run/munged.pid" \
    --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munge.seed"
}

# The emulated nodes belong to one cluster at a time. A second cluster (its
# own state dir and ports) would start its controller and then fail half-way
# (the nodes' hosts file is the first one's), and its jobs would share node1's
# rendezvous port with the first one's; the first one's `stop` deletes the
# network under it. Refuse before starting anything, naming the owner.
check_nodes_free() {
  local owner=""
  [ -f "$NODES_OWNER" ] && owner=$(cat "$NODES_OWNER")
  [ "$owner" = "$STATE" ] && return 0
  if [ -n "$owner" ] || [ -e "/run/netns/${NS_PREFIX}1" ] || ip link show "$BRIDGE" >/dev/null 2>&1; then
    die "the emulated nodes (namespaces ${NS_PREFIX}*, bridge $BRIDGE) belong to the cluster in ${owner:-an unknown state dir}; stop it first: NLF_SLURM_STATE=${owner:-<its state dir>} bash $0 stop"
  fi
}

netns_up() {
  local nodes=$1
  echo "$STATE" >"$NODES_OWNER"
  # The bridge holds slurmctld's address; one veth pair per node.
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  echo "$BRIDGE" >>"$STATE/created-links"
  for i in $(seq 1 "$nodes"); do
    local ns=$NS_PREFIX$i
    ip netns add "$ns"
    echo "$ns" >>"$STATE/created-netns"
    ip link add "nlfv$i" type veth peer name "nlfp$i"
    echo "nlfv$i" >>"$STATE/created-links"
    ip link set "nlfv$i" master "$BRIDGE" up
    ip link set "nlfp$i" netns "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$NET.$((i + 1))/24" dev "nlfp$i"
    ip -n "$ns" link set "nlfp$i" up
  done
  # Node names must resolve inside every node (srun, torchrun, gloo use
  # them); each slurmd bind-mounts this file over /etc/hosts in its own
  # mount namespace, so the machine's /etc/hosts is never touched.
  mkdir -p "$STATE/etc"
  {
    echo "127.0.0.1 localhost"
    echo "$NET.1 $(hostname -s)"
    for j in $(seq 1 "$nodes"); do echo "$NET.$((j + 1)) node$j"; done
  } >"$STATE/etc/hosts"
}

start_daemons() {
  local nodes=$1
  export SLURM_CONF=$CONF
  pid_alive "$STATE/run/slurmctld.pid" || slurmctld -f "$CONF" \
    || die "slurmctld did not start; see $STATE/log/slurmctld.log"
  if [ "$nodes" = 1 ]; then
    local name
    name=$(hostname -s)
    pid_alive "$STATE/run/slurmd-$name.pid" || slurmd -f "$CONF" \
      || die "slurmd did not start; see $STATE/log/slurmd-$name.log"
  else
    for i in $(seq 1 "$nodes"); do
      pid_alive "$STATE/run/slurmd-node$i.pid" && continue
      # Own network, hostname and /etc/hosts; slurmd finds its NodeName from
      # the hostname. (Not `ip netns exec`: it remounts /sys, which hides the
      # cgroup mounts slurmd checks for at start.)
      nsenter --net="/run/netns/$NS_PREFIX$i" unshare --uts --mount sh -c \
        "mount --bind '$STATE/etc/hosts' /etc/hosts && hostname node$i && exec slurmd -f '$CONF' -N node$i" \
        || die "slurmd node$i did not start; see $STATE/log/slurmd-node$i.log"
    done
  fi
}

wait_idle() {
  local nodes=$1 t
  for t in $(seq 1 60); do
    local idle
    idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
    [ "$idle" -ge "$nodes" ] && return 0
    sleep 1
  done
  sinfo -N -l >&2 || true
  tail -20 "$STATE"/log/*.log >&2 || true
  die "nodes did not become idle within 60 s (logs above, all under $STATE/log)"
}

cmd_start() {
  local nodes=1
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) nodes=$2; shift 2 ;;
      *) die "start: unknown option '$1' (allowed: --nodes N)" ;;
    esac
  done
  [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
  need_root
  if [ -f "$STATE/nodes" ] && pid_alive "$STATE/run/slurmctld.pid"; then
    [ "$(cat "$STATE/nodes")" = "$nodes" ] || die "a $(cat "$STATE/nodes")-node cluster is running; stop it first"
  fi
  [ "$nodes" = 1 ] || check_nodes_free
  install_packages "$nodes"
  mkdir -p "$STATE"
  if [ "$nodes" = 1 ]; then
    write_config 1 "$(hostname -s)" 127.0.0.1
  else
    [ -e "/run/netns/${NS_PREFIX}1" ] || netns_up "$nodes"
    write_config "$nodes" "$(hostname -s)" "$NET.1"
  fi
  start_munge
  start_daemons "$nodes"
  export SLURM_CONF=$CONF
  wait_idle "$nodes"
  log "up: $nodes node(s); use it with: export SLURM_CONF=$CONF"
  sinfo -N
}

cmd_stop() {
  need_root
  # Jobs first: slurmstepd and the job's processes outlive slurmd by design,
  # so cancel this cluster's jobs while its controller can still do it.
  if pid_alive "$STATE/run/slurmctld.pid"; then
    local jobs
    jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086  # one word per job id
      SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 30); do
        [ -z "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ] && break
        sleep 1
      done
    fi
  fi
  # Then the daemons (slurmd, then slurmctld, then munged), by our pid files only.
  local f
  for f in "$STATE"/run/slurmd-*.pid "$STATE/run/slurmctld.pid" "$STATE/run/munged.pid"; do
    [ -f "$f" ] || continue
    local pid
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$f"
  done
  if [ -f "$STATE/created-netns" ]; then
    while read -r ns; do
      ip netns del "$ns" 2>/dev/null || true
    done <"$STATE/created-netns"
    rm -f "$STATE/created-netns"
  fi
  if [ -f "$STATE/created-links" ]; then
    while read -r link; do ip link del "$link" 2>/dev/null || true; done <"$STATE/created-links"
    rm -f "$STATE/created-links"
  fi
  if [ -f "$NODES_OWNER" ] && [ "$(cat "$NODES_OWNER")" = "$STATE" ]; then rm -f "$NODES_OWNER"; fi
  # Job state goes too: the next start is a fresh cluster.
  rm -rf "$STATE/ctld" "$STATE/spool" "$STATE/nodes"
  log "stopped"
}

cmd_status() {
  local up=0
  for f in "$STATE/run/munged.pid" "$STATE/run/slurmctld.pid" "$STATE"/run/slurmd-*.pid; do
    [ -f "$f" ] || continue
    if pid_alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; up=1
    else echo "$(basename "$f" .pid): not running (stale pid file)"; fi
  done
  [ "$up" = 1 ] || { echo "local cluster: not running"; return 3; }
  SLURM_CONF=$CONF sinfo -N
  SLURM_CONF=$CONF squeue
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: $0 start [--nodes N] | stop | status | env" ;;
esac
