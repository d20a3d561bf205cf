#!/bin/sh
# PRRTE's "ssh" for the simulated hosts:  agent.sh HOST CMD...
# Runs CMD in network namespace HOST, in a fresh UTS namespace whose hostname is HOST (so
# gethostname() differs per host), with TMPDIR=$HM_HOSTS_TMP/HOST (per-host PRRTE/PMIx session
# directories; the mount namespace, hence /tmp and /dev/shm, is shared).  mpirun's environment
# is inherited.
host=$1; shift
exec ip netns exec "$host" unshare --uts sh -c \
  'h=$1; shift; hostname "$h"; export TMPDIR=${HM_HOSTS_TMP:-/tmp}/$h; mkdir -p "$TMPDIR"; exec sh -c "$*"' agent "$host" "$@"
