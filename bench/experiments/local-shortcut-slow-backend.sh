#!/bin/bash
# Node-local shortcut with a slow backend: does a non-blocking client spin?
# Agent and client in namespace ls-node, a backend reading 64 KiB every 10 ms (about
# 6.5 MB/s) in ls-be. The client (Python, non-blocking socket, select() for writable,
# then send() until EAGAIN) writes for SECS seconds; it reports the bytes it sent and
# its own CPU seconds (user + system). Rows: direct, kernel path, kernel path with
# --local-shortcut, splice.
# Usage: local-shortcut-slow-backend.sh SOCKGATE_BIN [REPEATS] [SECS]
set -u
BIN=$1; REP=${2:-3}; SECS=${3:-5}
N=ls-node; B=ls-be
cleanup() {
  [ -n "${AG:-}" ] && kill $AG 2>/dev/null && wait $AG 2>/dev/null
  [ -n "${SRV:-}" ] && kill $SRV 2>/dev/null
  ip netns del $N 2>/dev/null; ip netns del $B 2>/dev/null
  rm -rf /sys/fs/bpf/ls-bench
}
trap cleanup EXIT
ip netns add $N; ip netns add $B
ip link add lsn0 netns $N type veth peer name eth0 netns $B
ip -n $N addr add 10.202.1.1/24 dev lsn0; ip -n $B addr add 10.202.1.2/24 dev eth0
for ns in $N $B; do ip -n $ns link set lo up; done
ip -n $N link set lsn0 up; ip -n $B link set eth0 up
ip -n $B route add default via 10.202.1.1
cat > /tmp/ls-slow-server.py <<'PY'
import socket, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.202.1.2", 7100)); s.listen(16)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        time.sleep(0.01)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
cat > /tmp/ls-client.py <<'PY'
import os, select, socket, sys, time
addr, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((addr, port))
s.sendall(b"x" * 1024)   # a first write, then a pause: lets the shortcut switch
time.sleep(0.3)
s.setblocking(False)
buf = b"y" * 65536
sent, eagain, t0 = 0, 0, time.monotonic()
r0 = os.times()
while time.monotonic() - t0 < secs:
    select.select([], [s], [], 0.1)
    while True:
        try:
            sent += s.send(buf)
        except BlockingIOError:
            eagain += 1
            break
r1 = os.times()
cpu = (r1.user - r0.user) + (r1.system - r0.system)
print(f"sent_mb {sent/1e6:.1f} client_cpu_s {cpu:.2f} of {secs:.0f} s eagain {eagain}")
s.close()
PY
nsenter --net=/var/run/netns/$B python3 /tmp/ls-slow-server.py & SRV=$!
sleep 0.5
start_agent() {
  nsenter --net=/var/run/netns/$N $BIN run "$@" --route 8100=10.202.1.2:7100 \
    --pin-dir /sys/fs/bpf/ls-bench > /tmp/ls-agent.log 2>&1 & AG=$!
  for i in $(seq 50); do nsenter --net=/var/run/netns/$N ss -ltn | grep -q ':8100 ' && return 0; sleep 0.1; done
  echo "agent did not start"; cat /tmp/ls-agent.log; exit 1
}
stop_agent() { kill $AG; wait $AG 2>/dev/null; AG=; rm -rf /sys/fs/bpf/ls-bench; }
client() { nsenter --net=/var/run/netns/$N python3 /tmp/ls-client.py "$@" $SECS; }
for r in $(seq $REP); do
  echo "direct: $(client 10.202.1.2 7100)"
  for row in "sockmap" "sockmap --local-shortcut" "splice"; do
    start_agent --datapath $row
    echo "$row: $(client 10.202.1.1 8100)"
    stop_agent
  done
done
