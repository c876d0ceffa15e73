#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the tests of slurm/submit.py.
#
#   slurm/local_cluster.sh setup      install (if needed) and start munged, MariaDB, slurmdbd, slurmctld, slurmd
#   slurm/local_cluster.sh teardown   stop the daemons this script started, by PID
#   slurm/local_cluster.sh status     exit 0 when the cluster answers (node idle/mixed/allocated, sacct works)
#
# For a root shell on a Debian/Ubuntu machine without systemd (a container, a CI runner): packages come
# from apt-get, daemons are started in the foreground order the notes found working, with
# proctrack/linuxproc + task/none (cgroups are not usable there). Accounting (slurmdbd) is on because
# submitit reads job states with sacct. `setup` is idempotent: a cluster that already answers is reused.
#
# Environment:
#   SLURM_LOCAL_STATE   where pid files and daemon logs go (default /tmp/moco-mgd-slurm)
#   SLURM_LOCAL_MEM_MB  memory the node offers to jobs (default: 3/4 of MemTotal)
#   SLURM_LOCAL_CPUS    CPUs the node offers (default: nproc; more oversubscribes the cores)
#
# Exit codes: 0 ok, 1 a daemon did not come up (see the logs under $SLURM_LOCAL_STATE),
#             3 this machine cannot host the cluster (not root, no apt-get): the tests skip on it.
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/tmp/moco-mgd-slurm}
CONF_DIR=/etc/slurm
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

say() { printf '[local_cluster %s] %s\n' "$(date +%T)" "$*"; }
die() { say "ERROR: $*" >&2; exit "${2:-1}"; }

# wait_for SECONDS COMMAND...: retry COMMAND every 0.25 s until it succeeds
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.25
  done
}

# alive NAME PIDFILE: the pid in PIDFILE is a running process called NAME
alive() {
  local pid
  [ -s "$2" ] || return 1
  pid=$(cat "$2")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

node_ready() {
  local state
  state=$(sinfo -h -n "$(hostname -s)" -o %t 2>/dev/null | head -n1)
  case "$state" in idle|mix|alloc) return 0 ;; *) return 1 ;; esac
}

cluster_answers() {
  command -v sinfo >/dev/null 2>&1 && node_ready && sacct -n -X >/dev/null 2>&1
}

can_host() {
  [ "$(id -u)" = 0 ] || die "not root: installing and starting SLURM daemons needs root" 3
  command -v apt-get >/dev/null 2>&1 || die "no apt-get: this recipe installs Debian's SLURM packages" 3
  [ "$(uname -s)" = Linux ] || die "not Linux" 3
}

install_packages() {
  local missing="" p
  for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  [ -n "$missing" ] || { say "packages already installed"; return 0; }
  say "apt-get install$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed (no network to the package registry?)" 3
  apt-get install -y -qq --no-install-recommends $missing >"$STATE/apt.log" 2>&1 \
    || die "apt-get install failed: see $STATE/apt.log" 3
}

write_config() {
  local host cpus mem
  host=$(hostname -s)
  # SLURM_LOCAL_CPUS above nproc oversubscribes the cores (config_overrides), so that tests can
  # run jobs side by side whose time goes mostly to waiting for requeues.
  cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
  mem=${SLURM_LOCAL_MEM_MB:-$(awk '/^MemTotal:/ {print int($2 / 1024 * 3 / 4)}' /proc/meminfo)}
  mkdir -p "$CONF_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
  cat >"$CONF_DIR/slurm.conf" <<CONF
# written by moco-mgd slurm/local_cluster.sh: a single-node test cluster
ClusterName=mocomgd
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# requeued jobs wait for credentials to expire: 5 s instead of the default 120 s
AuthInfo=cred_expire=5
# no usable cgroups in a container: track processes by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
# a requeued task that is not task 0 waits to be ended by the requeue (SIGTERM, then SIGKILL
# after KillWait): 2 s rather than the 30 s of a production cluster keeps the preemption test short
KillWait=2
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  cat >"$CONF_DIR/slurmdbd.conf" <<CONF
# written by moco-mgd slurm/local_cluster.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm-local-test
StorageLoc=slurm_acct_db
LogFile=$STATE/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
CONF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
}

start_munged() {
  if alive munged /run/munge/munged.pid; then say "munged already running"; return; fi
  [ -s /etc/munge/munge.key ] || { mungekey --create; chown munge:munge /etc/munge/munge.key; }
  install -d -o munge -g munge -m 0755 /run/munge
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --force   # daemonizes; pid in /run/munge/munged.pid
  wait_for 20 sh -c 'munge -n | unmunge' || die "munged does not answer"
}

start_mariadb() {
  if alive mariadbd "$STATE/mariadb.pid"; then say "mariadbd already running"; return; fi
  install -d -o mysql -g mysql /run/mysqld
  say "starting mariadbd"
  nohup /usr/sbin/mariadbd --user=mysql >"$STATE/mariadb.log" 2>&1 &
  echo $! >"$STATE/mariadb.pid"
  wait_for 60 mariadb-admin ping || die "mariadbd does not answer: see $STATE/mariadb.log"
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm-local-test';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurm_daemon() {   # NAME: slurmdbd, slurmctld or slurmd (each daemonizes and writes $STATE/NAME.pid)
  if alive "$1" "$STATE/$1.pid"; then say "$1 already running"; return; fi
  say "starting $1"
  "/usr/sbin/$1" || die "$1 did not start: see $STATE/$1.log"
}

setup() {
  mkdir -p "$STATE"
  if cluster_answers; then
    say "a SLURM cluster already answers here: reusing it"
    sinfo
    return 0
  fi
  can_host
  install_packages
  write_config
  start_munged
  start_mariadb
  start_slurm_daemon slurmdbd
  wait_for 60 sacctmgr -n show cluster || die "slurmdbd does not answer: see $STATE/slurmdbd.log"
  start_slurm_daemon slurmctld
  start_slurm_daemon slurmd
  wait_for 60 node_ready || die "the node did not become idle: see $STATE/slurmctld.log and $STATE/slurmd.log"
  # slurmctld registers the cluster with slurmdbd a moment after starting: sacct fails until then
  wait_for 60 sacct -n -X || die "sacct does not answer: see $STATE/slurmdbd.log"
  sinfo
  say "ready (state in $STATE)"
}

stop() {   # NAME PIDFILE
  local pid
  if ! alive "$1" "$2"; then rm -f "$2"; return 0; fi
  pid=$(cat "$2")
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    say "WARNING: $1 (pid $pid) still alive after 10 s"
  else
    say "stopped $1 (pid $pid)"; rm -f "$2"
  fi
}

teardown() {
  stop slurmd "$STATE/slurmd.pid"
  stop slurmctld "$STATE/slurmctld.pid"
  stop slurmdbd "$STATE/slurmdbd.pid"
  stop mariadbd "$STATE/mariadb.pid"
  stop munged /run/munge/munged.pid
}

case "${1:-}" in
  setup) setup ;;
  teardown) teardown ;;
  status) cluster_answers ;;
  *) echo "usage: $0 {setup|teardown|status}" >&2; exit 2 ;;
esac
