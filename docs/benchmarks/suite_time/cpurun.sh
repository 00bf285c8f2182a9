#!/usr/bin/env bash
# usage: cpurun.sh <tag> <root> pytest-args...
tag=$1; shift; root=$1; shift
cd "$root"
log=/work/main/runs/t3/$tag.log
{ echo "start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)";
  CI=true CPUPROF_OUT=/work/main/runs/t3/$tag.json PYTHONPATH=/work/main/runs/t3/plug /usr/bin/time -f "TIME wall=%e user=%U sys=%S maxrss=%MkB" nice -n 19 /work/main/.venv/bin/python -m pytest -q -p no:cacheprovider -p cpuprof "$@" 2>&1 | tail -15;
  echo "end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; } > $log 2>&1
