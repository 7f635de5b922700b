#!/bin/bash
# Node-local shortcut measurement: agent + client in namespace lp-node, backend in lp-be.
# Usage: lp-bench.sh REPEATS SECONDS
set -u
REP=${1:-3}; SECS=${2:-4}
BIN=/work/target-localpath/debug/sockgate
N=lp-node; B=lp-be
cleanup() {
  [ -n "${AG:-}" ] && kill $AG 2>/dev/null && wait $AG 2>/dev/null
  [ -n "${IP:-}" ] && kill $IP 2>/dev/null
  [ -n "${SP:-}" ] && kill $SP 2>/dev/null
  ip netns del $N 2>/dev/null; ip netns del $B 2>/dev/null
  rm -rf /sys/fs/bpf/lp-bench
}
trap cleanup EXIT
ip netns add $N; ip netns add $B
ip link add lpn0 netns $N type veth peer name eth0 netns $B
ip -n $N addr add 10.201.1.1/24 dev lpn0; ip -n $B addr add 10.201.1.2/24 dev eth0
ip -n $N link set lo up; ip -n $B link set lo up; ip -n $N link set lpn0 up; ip -n $B link set eth0 up
ip -n $N addr add 10.201.0.1/32 dev lo
ip -n $B route add default via 10.201.1.1
inb() { nsenter --net=/var/run/netns/$B "$@"; }
inn() { nsenter --net=/var/run/netns/$N "$@"; }
# nsenter execs the command (no fork for a network namespace): $! is its pid.
nsenter --net=/var/run/netns/$B iperf3 -s -B 10.201.1.2 -p 5201 >/dev/null 2>&1 & IP=$!
nsenter --net=/var/run/netns/$B sockperf server --tcp -i 10.201.1.2 -p 11111 >/dev/null 2>&1 & SP=$!
sleep 1
start_agent() {
  nsenter --net=/var/run/netns/$N $BIN run --datapath sockmap "$@" --route 8088=10.201.1.2:5201 --route 8089=10.201.1.2:11111 \
    --pin-dir /sys/fs/bpf/lp-bench > /tmp/lp-bench-agent.log 2>&1 & AG=$!
  for i in $(seq 50); do inn ss -ltn | grep -q ':8089 ' && return 0; sleep 0.1; done
  echo "agent did not start"; cat /tmp/lp-bench-agent.log; exit 1
}
stop_agent() { kill $AG; wait $AG 2>/dev/null; AG=; rm -rf /sys/fs/bpf/lp-bench; }
tput() { inn timeout $((SECS+10)) iperf3 -c $1 -p $2 -t $SECS -J 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' 2>/dev/null || echo fail; }
rr() { inn timeout $((SECS+10)) sockperf ping-pong --tcp -i $1 -p $2 -t $SECS --full-rtt 2>&1 | awk '/percentile 50.000/ {print $NF}' | head -1; }
quiet() { sleep 2; }
# user + system ticks of a process
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
for r in $(seq $REP); do
  quiet; echo "direct tput $(tput 10.201.1.2 5201) Gbit/s rr_p50 $(rr 10.201.1.2 11111) us"
  for mode in off on; do
    if [ $mode = on ]; then start_agent --local-shortcut; else start_agent; fi
    quiet; C0=$(cpu $AG); T=$(tput 10.201.0.1 8088); C1=$(cpu $AG); quiet; R=$(rr 10.201.0.1 8089)
    ST=""; [ $mode = on ] && ST=$(bpftool map dump pinned /sys/fs/bpf/lp-bench/GW_LOCAL_STATS 2>/dev/null | grep -E '"(bytes_redirected|bytes_passed|switches|redirect_failures)"' | tr -d ' \n')
    stop_agent
    echo "shortcut=$mode tput $T Gbit/s agent_cpu_ticks $((C1-C0)) rr_p50 $R us $ST"
  done
done
