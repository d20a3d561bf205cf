#!/bin/bash
# Simulated hosts for the multi-host tests (root needed): each host is a Linux network namespace
# with its own address and hostname, joined by a bridge in a namespace of its own; the root
# namespace is not touched (no route from it reaches these addresses).  Adapted from the team's
# shared recipe; names and addresses carry a prefix so that these never collide with other
# namespaces on the machine.
#
#   hosts.sh up [N]             hosts $P-h1..$P-hN (default 3) + bridge namespace $P-br; idempotent
#   hosts.sh down               SIGKILL everything inside them, delete them; idempotent
#   hosts.sh status
#   hosts.sh shape RATE | unshape      tbf rate limit (e.g. 1gbit) on both ends of every host link
#   hosts.sh cut HOST | heal HOST      link down/up between HOST and the bridge (a partition)
#   hosts.sh kill-host HOST            SIGKILL every process in HOST (a node crash)
#
# Environment: HM_NETNS_PREFIX (default hmt), HM_NETNS_NET (a /24's first three octets, default
# 198.18.77: RFC 2544's benchmarking range).  Layout: $P-br holds bridge br0 = NET.10 ("head",
# where mpirun runs) and one veth end per host; host K has eth0 = NET.(10+K); /etc/netns/<ns>/hosts
# names them all (`ip netns exec` bind-mounts it over /etc/hosts).
set -u
P=${HM_NETNS_PREFIX:-hmt}; NET=${HM_NETNS_NET:-198.18.77}; BR=$P-br
nslist() { ip netns list | awk '{print $1}'; }
myhosts() { nslist | grep -E "^$P-h[0-9]+\$" | sort -V; }
have_ns() { nslist | grep -qx "$1"; }
num() { echo "${1##*-h}"; }

up() {
    local n=${1:-3} h k ns
    have_ns $BR || ip netns add $BR || exit 1
    ip -n $BR link set lo up
    ip -n $BR link show br0 >/dev/null 2>&1 || ip -n $BR link add br0 type bridge || exit 1
    ip -n $BR addr replace "$NET.10/24" dev br0
    ip -n $BR link set br0 up
    for k in $(seq 1 "$n"); do
        h=$P-h$k
        have_ns "$h" || ip netns add "$h" || exit 1
        ip -n "$h" link set lo up
        if ! ip -n "$h" link show eth0 >/dev/null 2>&1; then
            ip -n $BR link del "v$k" 2>/dev/null
            ip -n $BR link add "v$k" type veth peer name eth0 netns "$h" || exit 1
        fi
        ip -n $BR link set "v$k" master br0 up
        ip -n "$h" addr replace "$NET.$((10 + k))/24" dev eth0
        ip -n "$h" link set eth0 up
    done
    for ns in $BR $(myhosts); do
        mkdir -p "/etc/netns/$ns"
        { echo "127.0.0.1 localhost"; echo "$NET.10 $P-head"
          for h in $(myhosts); do echo "$NET.$((10 + $(num $h))) $h"; done; } > "/etc/netns/$ns/hosts"
    done
}

killns() { local p; p=$(ip netns pids "$1" 2>/dev/null); [ -n "$p" ] && kill -9 $p 2>/dev/null; true; }

down() {
    local ns
    for ns in $(nslist | grep -E "^$P-(h[0-9]+|br)\$"); do killns "$ns"; done
    sleep 0.3
    for ns in $(nslist | grep -E "^$P-(h[0-9]+|br)\$"); do
        ip netns del "$ns"; rm -rf "/etc/netns/$ns"
    done
    rmdir /etc/netns 2>/dev/null; true
}

link_of() { echo "v$(num "$1")"; }
shape() {
    local h
    for h in $(myhosts); do
        ip netns exec $BR tc qdisc replace dev "$(link_of $h)" root tbf rate "$1" burst 256kb latency 50ms
        ip netns exec "$h" tc qdisc replace dev eth0 root tbf rate "$1" burst 256kb latency 50ms
    done
}
unshape() {
    local h
    for h in $(myhosts); do
        ip netns exec $BR tc qdisc del dev "$(link_of $h)" root 2>/dev/null
        ip netns exec "$h" tc qdisc del dev eth0 root 2>/dev/null
    done; true
}

status() {
    local ns
    for ns in $BR $(myhosts); do
        have_ns "$ns" || continue
        echo "$ns: $(ip -n "$ns" -br -4 addr show | awk '$3{print $1,$3}' | xargs) | pids: $(ip netns pids "$ns" | xargs)"
    done
}

case "${1:-}" in
    up) up "${2:-3}" ;;
    down) down ;;
    status) status ;;
    shape) shape "${2:?rate, e.g. 1gbit}" ;;
    unshape) unshape ;;
    cut) ip -n $BR link set "$(link_of "${2:?host}")" down ;;
    heal) ip -n $BR link set "$(link_of "${2:?host}")" up ;;
    kill-host) killns "${2:?host}" ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac
