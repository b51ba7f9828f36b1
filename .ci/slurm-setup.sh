#!/usr/bin/env bash
# CI: install SLURM (Debian's slurm-wlm) for tests/test_slurm.py, which starts its own two-node
# cluster on localhost. A no-op when slurmctld is already installed. Needs root and apt-get.
set -euo pipefail
export PATH=$PATH:/usr/sbin
command -v slurmctld >/dev/null && exit 0
if ! command -v apt-get >/dev/null; then
    echo "slurm-setup: no apt-get; install slurmctld, slurmd and the SLURM clients by hand" >&2
    exit 1
fi
apt-get update -qq
# The basic plugins (auth/none, proctrack/linuxproc, select/cons_tres, ...) are all the tests use.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
