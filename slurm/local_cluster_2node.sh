#!/usr/bin/env bash
# A real two-node Slurm on this one machine, for multi-node tests: each compute node is a network namespace with
# its own hostname and address; a second slurmctld (its own ports, state and config) schedules onto them.
#
#   sudo slurm/local_cluster_2node.sh [start]    # install if missing, configure, start; prints `sinfo`
#   sudo slurm/local_cluster_2node.sh stop       # stop what start started; remove the namespaces and bridge
#   export SLURM_CONF=/etc/slurm-2node/slurm.conf   # then sinfo / sbatch / squeue / scontrol talk to this cluster
#   sbatch --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 slurm/train.sh ...
#
# Layout (the subnet 10.213.0.0/24 is private to it; nothing else is addressed):
#   root namespace : bridge gl2br0 10.213.0.1/24; slurmctld (port 6917) as SlurmctldHost=$(hostname)(10.213.0.1)
#   node gl2n1     : netns gl2n1, UTS hostname gl2n1, veth gl0 10.213.0.11 (peer gl2v1 on the bridge); slurmd :6918
#   node gl2n2     : netns gl2n2, UTS hostname gl2n2, veth gl0 10.213.0.12 (peer gl2v2 on the bridge); slurmd :6918
# Names resolve through /etc/hosts lines ending in the marker "# gligen-2node" (added on start, removed on stop).
# Munge is shared with the single-node cluster (slurm/local_cluster.sh): one munged, its socket in /run/munge reached
# through the file system from every namespace. Per-node slurmd spool/pid/log paths use %n (the node name).
# Config /etc/slurm-2node/slurm.conf; state /var/spool/slurm-2node; pids /run/slurm-2node; logs /var/log/slurm-2node.
# Jobs get ids from 200000 on (the single-node cluster counts from 1), so logs say which cluster ran them.
#
# start is idempotent: when both nodes already answer it only prints `sinfo`; otherwise it first stops whatever is
# left of an earlier start, then starts afresh. stop ends only processes this script started: the slurmctld of its
# pid file, every process inside its two namespaces (slurmd, slurmstepd, job tasks), and munged only when this
# script started it and the single-node cluster is not running.
set -euo pipefail

LOG_TAG=local_cluster_2node
# shellcheck source=slurm/cluster_common.sh
. "$(dirname "$0")/cluster_common.sh"  # log, require_root, ensure_packages, ensure_munge

ETC=/etc/slurm-2node
CONF=$ETC/slurm.conf
STATE=/var/spool/slurm-2node
RUN=/run/slurm-2node
LOGS=/var/log/slurm-2node
BRIDGE=gl2br0
SUBNET=10.213.0
CTL_ADDR=$SUBNET.1
NODES=(gl2n1 gl2n2)
HOSTS_MARK="# gligen-2node"
HOST=$(hostname -s)
CPUS=$(nproc)
export SLURM_CONF=$CONF

node_addr() { echo "$SUBNET.$((10 + ${1#gl2n}))"; }  # gl2n1 -> 10.213.0.11

cluster_ready() {  # both nodes usable (idle, mixed, allocated or completing; trailing state flags allowed)
    [ -f "$CONF" ] && command -v sinfo >/dev/null 2>&1 || return 1
    local states
    states=$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
    for node in "${NODES[@]}"; do
        grep -Eq "^$node (idle|mixed|allocated|completing)[*~#%\$@+^-]*$" <<<"$states" || return 1
    done
}

kill_pidfile() {  # SIGTERM the pid of a pid file, then SIGKILL after 10 s; removes the file
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop() {
    log "stopping (slurmctld of $RUN/slurmctld.pid, everything inside netns ${NODES[*]}, bridge $BRIDGE)"
    for node in "${NODES[@]}"; do kill_pidfile "$RUN/slurmd-$node.pid"; done
    for node in "${NODES[@]}"; do  # job steps and tasks left in the namespace: all started by its slurmd
        ip netns list 2>/dev/null | grep -qw "$node" || continue
        local pids
        pids=$(ip netns pids "$node" 2>/dev/null || true)
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
        ip netns del "$node" 2>/dev/null || true
    done
    kill_pidfile "$RUN/slurmctld.pid"
    for node in "${NODES[@]}"; do ip link del "gl2v${node#gl2n}" 2>/dev/null || true; done
    ip link del "$BRIDGE" 2>/dev/null || true
    if grep -q " $HOSTS_MARK\$" /etc/hosts; then  # rewritten in place: /etc/hosts may be a bind mount
        local kept
        kept=$(grep -v " $HOSTS_MARK\$" /etc/hosts || true)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    if [ -f "$RUN/munged.started" ]; then  # this script started munged: stop it unless the other cluster runs
        if [ -f /run/slurm/slurmctld.pid ] && kill -0 "$(cat /run/slurm/slurmctld.pid)" 2>/dev/null; then
            log "leaving munged running (the single-node cluster uses it)"
        else
            kill_pidfile /run/munge/munged.pid
        fi
        rm -f "$RUN/munged.started"
    fi
}

start() {
    if cluster_ready; then
        log "the two-node cluster is already up"
        sinfo
        return 0
    fi
    stop  # whatever an earlier start left behind
    ensure_packages $(command -v ip >/dev/null 2>&1 || echo iproute2)
    ensure_munge
    install -d -m 0755 "$ETC" "$STATE" "$RUN" "$LOGS"
    [ "$MUNGED_STARTED" = 1 ] && touch "$RUN/munged.started"

    # ----- network: a bridge in the root namespace, one veth pair per node namespace --------------------------
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for node in "${NODES[@]}"; do
        local peer="gl2v${node#gl2n}"
        ip netns add "$node"
        ip link add "$peer" type veth peer name gl0 netns "$node"
        ip link set "$peer" master "$BRIDGE" up
        ip -n "$node" addr add "$(node_addr "$node")/24" dev gl0
        ip -n "$node" link set gl0 up
        ip -n "$node" link set lo up
    done
    {
        echo "$CTL_ADDR gl2ctl $HOSTS_MARK"
        for node in "${NODES[@]}"; do echo "$(node_addr "$node") $node $HOSTS_MARK"; done
    } >>/etc/hosts

    # ----- slurm.conf -----------------------------------------------------------------------------------------
    {
        cat <<EOF
# written by gligen slurm/local_cluster_2node.sh (two namespace nodes, for tests)
ClusterName=gligen2
SlurmctldHost=$HOST($CTL_ADDR)
SlurmctldPort=6917
SlurmdPort=6918
EOF
        common_slurm_conf
        cat <<EOF
FirstJobId=200000
KillWait=10
SlurmdTimeout=60
StateSaveLocation=$STATE
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
EOF
    } >"$CONF"
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeAddr=$(node_addr "$node") NodeHostname=$node CPUs=$CPUS State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=two Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
    log "wrote $CONF"

    # ----- daemons: slurmctld here (a clean state: -c), one slurmd per namespace with that node's hostname ----
    log "starting slurmctld"
    /usr/sbin/slurmctld -c -f "$CONF"
    for _ in $(seq 1 30); do timeout 5 scontrol ping 2>/dev/null | grep -q 'UP' && break; sleep 0.5; done
    for node in "${NODES[@]}"; do
        install -d -m 0755 "$STATE/slurmd-$node"
        log "starting slurmd in netns $node"
        nsenter --net="/run/netns/$node" unshare --uts -- sh -c \
            "hostname $node && exec env SLURM_CONF=$CONF /usr/sbin/slurmd -f $CONF"
    done
    for _ in $(seq 1 60); do
        cluster_ready && break
        sleep 0.5
    done
    if ! cluster_ready; then
        log "nodes not ready; see $LOGS/slurmctld.log and $LOGS/slurmd-<node>.log"
        sinfo -N -l || true
        exit 1
    fi
    sinfo
}

require_root
case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) log "usage: $0 [start|stop]"; exit 2 ;;
esac
