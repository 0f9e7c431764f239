#!/usr/bin/env bash
# A real single-node Slurm (slurmctld + slurmd, munge auth) on this machine, for tests and local job runs.
#
#   sudo slurm/local_cluster.sh          # install if missing, configure, start; prints `sinfo`
#
# Run as root. Idempotent: when the cluster already answers (`sinfo` shows this node idle/mixed/allocated) it only
# prints `sinfo` and exits 0. It installs Debian's `slurm-wlm` and `munge` with apt-get only when their binaries
# are missing, and writes /etc/slurm/slurm.conf only when absent or written earlier by this script (first line
# marker); a hand-written slurm.conf is left alone. Logs: /var/log/slurm/slurm{ctld,d}.log, /var/log/munge/.
# The node is NodeName=$(hostname) CPUs=$(nproc) in partition `debug` (the default); it takes jobs with up to
# $(nproc) tasks x cpus. Stop it with: scontrol shutdown; pkill -u munge munged   (or reboot the container).
# A second, two-node cluster (each node a network namespace) for multi-node jobs: slurm/local_cluster_2node.sh.
set -euo pipefail

MARKER="# written by gligen slurm/local_cluster.sh"
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
CPUS=$(nproc)

LOG_TAG=local_cluster
# shellcheck source=slurm/cluster_common.sh
. "$(dirname "$0")/cluster_common.sh"  # log, require_root, ensure_packages, ensure_munge
require_root

node_ready() {
    # one line per node state; ready when this node is usable (idle, mixed or allocated; trailing flags allowed)
    command -v sinfo >/dev/null 2>&1 || return 1
    local states
    states=$(timeout 10 sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null) || return 1
    echo "$states" | grep -Eq '^(idle|mixed|allocated|completing)[*~#%$@+^-]*$'
}

if node_ready; then
    log "Slurm is already up"
    sinfo
    exit 0
fi

# ----- packages ------------------------------------------------------------------------------------------------
ensure_packages

# slurmctld/slurmd must resolve this host's name (bare CI containers may lack it in /etc/hosts)
if ! getent hosts "$HOST" >/dev/null 2>&1; then
    log "adding $HOST to /etc/hosts"
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi

# ----- munge ---------------------------------------------------------------------------------------------------
ensure_munge

# ----- slurm.conf ----------------------------------------------------------------------------------------------
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
if [ ! -e "$CONF" ] || head -n1 "$CONF" | grep -qF "$MARKER"; then
    {
        cat <<EOF
$MARKER (single node, for tests and local runs)
ClusterName=gligen
SlurmctldHost=$HOST
EOF
        common_slurm_conf
        cat <<EOF
KillWait=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    } >"$CONF"
    log "wrote $CONF"
else
    log "keeping existing $CONF (not written by this script)"
fi
# slurmd 22.05 reads cgroup.conf only for cgroup plugins; none is used here

# ----- daemons -------------------------------------------------------------------------------------------------
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running /run/slurm/slurmctld.pid; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
for _ in $(seq 1 30); do timeout 5 scontrol ping 2>/dev/null | grep -q 'UP' && break; sleep 1; done
if ! running /run/slurm/slurmd.pid; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

for _ in $(seq 1 60); do
    node_ready && break
    # a node left DOWN/DRAIN by an earlier unclean stop comes back here
    if timeout 5 sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | grep -Eq '^(down|drain|drained|draining)'; then
        scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
    fi
    sleep 1
done
if ! node_ready; then
    log "node $HOST is not ready; see /var/log/slurm/slurmctld.log and /var/log/slurm/slurmd.log"
    sinfo -N -l || true
    exit 1
fi
sinfo
