# Sourced by slurm/local_cluster.sh and slurm/local_cluster_2node.sh (as root): the packages and the one munged
# both clusters share. Defines log() (prefix $LOG_TAG), require_root, ensure_packages [extra apt packages...] and
# ensure_munge (sets MUNGED_STARTED=1 when it had to start munged).

log() { echo "[${LOG_TAG:-local_cluster}] $*" >&2; }

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        log "must run as root (it installs packages and starts munged/slurmctld/slurmd)"
        exit 1
    fi
}

# Debian's slurm-wlm and munge (plus any extra packages named), installed with apt-get only when missing
ensure_packages() {
    local missing=("$@")
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    { command -v slurmctld && command -v slurmd && command -v sinfo; } >/dev/null 2>&1 || missing+=(slurm-wlm)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" munge
    fi
}

# a key in /etc/munge/munge.key and a munged that answers `munge -n | unmunge`; starts munged only when none answers
MUNGED_STARTED=0
ensure_munge() {
    id munge >/dev/null 2>&1 || { log "user munge missing after install"; exit 1; }
    install -d -o munge -g munge -m 0700 /etc/munge
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "starting munged"
        if [ -f /run/munge/munged.pid ] && ! kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
            rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
        fi
        runuser -u munge -- /usr/sbin/munged
        MUNGED_STARTED=1
        for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    local credential
    credential=$(munge -n | unmunge 2>&1 || true)
    grep -q 'STATUS: *Success' <<<"$credential" || { log "munge -n | unmunge does not say Success: $credential"; exit 1; }
}

# the slurm.conf lines both clusters share: root daemons, munge auth, no cgroups (linuxproc, task/none), whole cores,
# requeue allowed, finished jobs kept 10 min for `scontrol show job`, no accounting
common_slurm_conf() {
    cat <<'EOF2'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EOF2
}
