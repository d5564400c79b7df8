// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Connects and sends: connect events, address tries, the socket_connect and socket_sendmsg decisions. */
#ifndef __ASSAY_NET_BPF_H
#define __ASSAY_NET_BPF_H

/* ---------------------------------------------------------------- connect */

#define KIND_CONNECT 100
#define KIND_SEND 101

/* Destinations sends already reported, per process: a UDP or QUIC workload sends thousands of
 * datagrams to one peer, and each would otherwise cost a ring buffer record. */
struct sent_key {
	__u32 tgid;
	__u16 family;
	__u16 port;
	__u8 addr[16];
	__u32 failed;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct sent_key);
	__type(value, __u8);
} sent SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_connect")
int assay_connect_enter(struct trace_event_raw_sys_enter *ctx)
{
	struct assay_config *cfg = get_config();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;

	if (!cfg || !wants(cfg, ASSAY_EV_CONNECT) || !in_scope(cfg, pid_tgid >> 32))
		return 0;
	struct pending_call pc = {.ptr = ctx->args[1], .dfd = (__s32)ctx->args[0], .kind = KIND_CONNECT};
	if (bpf_map_update_elem(&pending, &tid, &pc, BPF_ANY))
		count(ASSAY_CNT_PENDING_FULL);
	return 0;
}

/* A send that names its destination (sendto, sendmsg, sendmmsg's first message): reported as a
 * connect event with op=sendmsg, so recordings see every destination the net rules judge. */
static __always_inline int send_enter(__u64 addr, __s32 fd)
{
	struct assay_config *cfg = get_config();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;

	if (!addr || !cfg || !wants(cfg, ASSAY_EV_CONNECT) || !in_scope(cfg, pid_tgid >> 32))
		return 0;
	struct pending_call pc = {.ptr = addr, .dfd = fd, .kind = KIND_SEND};
	if (bpf_map_update_elem(&pending, &tid, &pc, BPF_ANY))
		count(ASSAY_CNT_PENDING_FULL);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_sendto")
int assay_sendto_enter(struct trace_event_raw_sys_enter *ctx)
{
	return send_enter(ctx->args[4], (__s32)ctx->args[0]);
}

/* msg_name is the first member of struct user_msghdr, and that is the first of struct mmsghdr. */
static __always_inline __u64 msg_name(__u64 umsg)
{
	__u64 name = 0;
	bpf_probe_read_user(&name, sizeof(name), (void *)umsg);
	return name;
}

SEC("tracepoint/syscalls/sys_enter_sendmsg")
int assay_sendmsg_enter(struct trace_event_raw_sys_enter *ctx)
{
	return send_enter(msg_name(ctx->args[1]), (__s32)ctx->args[0]);
}

SEC("tracepoint/syscalls/sys_enter_sendmmsg")
int assay_sendmmsg_enter(struct trace_event_raw_sys_enter *ctx)
{
	return send_enter(msg_name(ctx->args[1]), (__s32)ctx->args[0]);
}

static __always_inline int net_exit(long ret, __u32 kind)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct pending_call *pc = bpf_map_lookup_elem(&pending, &tid);
	if (!pc)
		return 0;
	if (pc->kind != kind)
		goto out;

	struct assay_connect_event ev = {};
	__u16 family = 0;
	bpf_probe_read_user(&family, sizeof(family), (void *)pc->ptr);
	if (family == AF_INET) {
		struct sockaddr_in sa = {};
		bpf_probe_read_user(&sa, sizeof(sa), (void *)pc->ptr);
		ev.port = __builtin_bswap16(sa.sin_port);
		__builtin_memcpy(ev.addr, &sa.sin_addr, 4);
	} else if (family == AF_INET6) {
		struct sockaddr_in6 sa6 = {};
		bpf_probe_read_user(&sa6, sizeof(sa6), (void *)pc->ptr);
		ev.port = __builtin_bswap16(sa6.sin6_port);
		__builtin_memcpy(ev.addr, &sa6.sin6_addr, 16);
	} else {
		goto out;   /* unix and other families are not network connects */
	}
	if (kind == KIND_SEND) {
		struct sent_key k = {.tgid = pid_tgid >> 32, .family = family,
				     .port = ev.port, .failed = ret < 0};
		__u8 one = 1;
		__builtin_memcpy(k.addr, ev.addr, 16);
		if (bpf_map_update_elem(&sent, &k, &one, BPF_NOEXIST))
			goto out; /* this process already sent there (or the map is busy) */
		ev.op = ASSAY_NET_OP_SENDMSG;
		ret = ret < 0 ? ret : 0; /* a byte count is not an outcome */
	}
	fill_header(&ev.hdr, ASSAY_EV_CONNECT);
	ev.family = family;
	ev.ret = (__s32)ret;
	ev.fd = pc->dfd;
	emit(&ev, sizeof(ev));
out:
	bpf_map_delete_elem(&pending, &tid);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_connect")
int assay_connect_exit(struct trace_event_raw_sys_exit *ctx)
{
	return net_exit(ctx->ret, KIND_CONNECT);
}

SEC("tracepoint/syscalls/sys_exit_sendto")
int assay_sendto_exit(struct trace_event_raw_sys_exit *ctx)
{
	return net_exit(ctx->ret, KIND_SEND);
}

SEC("tracepoint/syscalls/sys_exit_sendmsg")
int assay_sendmsg_exit(struct trace_event_raw_sys_exit *ctx)
{
	return net_exit(ctx->ret, KIND_SEND);
}

SEC("tracepoint/syscalls/sys_exit_sendmmsg")
int assay_sendmmsg_exit(struct trace_event_raw_sys_exit *ctx)
{
	return net_exit(ctx->ret, KIND_SEND);
}


#define LPM_MAP(name, keytype)                               \
	struct {                                             \
		__uint(type, BPF_MAP_TYPE_LPM_TRIE);         \
		__uint(max_entries, 16384);                  \
		__uint(map_flags, BPF_F_NO_PREALLOC);        \
		__type(key, keytype);                        \
		__type(value, struct assay_net_value);       \
	} name SEC(".maps")

LPM_MAP(net_deny4, struct assay_lpm4_key);
LPM_MAP(net_deny6, struct assay_lpm6_key);
LPM_MAP(net_allow4, struct assay_lpm4_key);
LPM_MAP(net_allow6, struct assay_lpm6_key);

/* ---------------------------------------------------------------- connect enforcement */

/* The strongest deny range for this port that its own rule's exceptions do not lift: a `not` of
 * one rule never lifts another rule's deny. Both values list every range of every covering
 * prefix (closed in userspace), strongest first. */
static __always_inline struct assay_port_range *net_verdict(struct assay_net_value *deny,
							    struct assay_net_value *allow, __u16 port)
{
	if (!deny)
		return NULL;
	for (int i = 0; i < ASSAY_NET_RANGES; i++) {
		if (i >= deny->count)
			break;
		struct assay_port_range *d = &deny->ranges[i];
		if (port < d->lo || port > d->hi)
			continue;
		bool lifted = false;
		for (int j = 0; allow && j < ASSAY_NET_RANGES; j++) {
			if (j >= allow->count)
				break;
			struct assay_port_range *a = &allow->ranges[j];
			if (a->rule_id == d->rule_id && port >= a->lo && port <= a->hi) {
				lifted = true;
				break;
			}
		}
		if (!lifted)
			return d;
	}
	return NULL;
}

static __always_inline void emit_net_block(struct assay_port_range *r, __u16 family, __u16 port, __u16 proto,
					   __u16 op, const void *addr, __u32 addr_len)
{
	struct assay_net_block_event ev = {};

	fill_header(&ev.hdr, ASSAY_EV_NET_BLOCKED);
	ev.rule_id = r->rule_id;
	ev.action = r->action;
	ev.family = family;
	ev.port = port;
	ev.protocol = proto;
	ev.op = op;
	bpf_probe_read_kernel(ev.addr, addr_len & 31, addr);
	emit(&ev, sizeof(ev));
}

/* The net rules' verdict on one destination, however it was given (a kernel copy of a sockaddr,
 * a cgroup program's context): family AF_INET or AF_INET6, port in host order, addr 4 or 16
 * bytes in network order, bound4 the socket's bound IPv4 address (0 if none). The scalars stay in
 * registers, where the verifier tracks them exactly (spilled into a struct, 5.10's verifier lost
 * them and walked every combination of branches). can_signal is a constant: cgroup programs may
 * not send signals, so their kills go through kill_requests (see act_by_request()). */
static __always_inline int judge_dest(struct assay_config *cfg, __u16 family, __u16 port, __u16 proto, __u32 bound4,
				      const __u8 *addr, __u16 op, bool can_signal)
{
	struct assay_lpm4_key k4 = {.prefixlen = 32};
	struct assay_lpm6_key k6 = {.prefixlen = 128};
	struct assay_port_range *deny = NULL;
	bool v4;

	if (family == AF_INET) {
		__builtin_memcpy(k4.addr, addr, 4);
		v4 = true;
	} else if (family == AF_INET6) {
		__builtin_memcpy(k6.addr, addr, 16);
		/* ::ffff:a.b.c.d is an IPv4 peer: judge it by the IPv4 rules, so it is no way around them. */
		v4 = !k6.addr[0] && !k6.addr[1] && !k6.addr[2] && !k6.addr[3] && !k6.addr[4] && !k6.addr[5] &&
		     !k6.addr[6] && !k6.addr[7] && !k6.addr[8] && !k6.addr[9] && k6.addr[10] == 0xff &&
		     k6.addr[11] == 0xff;
		if (v4)
			__builtin_memcpy(k4.addr, &k6.addr[12], 4);
	} else {
		return 0;
	}

	/* A wildcard destination (0.0.0.0, ::, ::ffff:0.0.0.0) reaches this very host: the socket's
	 * bound address, or loopback (ip_route_output_key_hash_rcu, tcp_v6_connect). */
	if (v4 && !k4.addr[0] && !k4.addr[1] && !k4.addr[2] && !k4.addr[3]) {
		if (bound4)
			__builtin_memcpy(k4.addr, &bound4, 4);
		else
			k4.addr[0] = 127, k4.addr[3] = 1;
	} else if (!v4) {
		__u64 hi = 0, lo = 0;
		__builtin_memcpy(&hi, k6.addr, 8);
		__builtin_memcpy(&lo, &k6.addr[8], 8);
		if (!hi && !lo)
			k6.addr[15] = 1;
	}

	if (v4) {
		if (cfg->net_rules & ASSAY_NET_DENY4)
			deny = net_verdict(bpf_map_lookup_elem(&net_deny4, &k4),
					   (cfg->net_rules & ASSAY_NET_ALLOW4) ? bpf_map_lookup_elem(&net_allow4, &k4) : NULL,
					   port);
	} else {
		if (cfg->net_rules & ASSAY_NET_DENY6)
			deny = net_verdict(bpf_map_lookup_elem(&net_deny6, &k6),
					   (cfg->net_rules & ASSAY_NET_ALLOW6) ? bpf_map_lookup_elem(&net_allow6, &k6) : NULL,
					   port);
	}
	if (!deny)
		return 0;
	if (v4)
		emit_net_block(deny, AF_INET, port, proto, op, k4.addr, 4);
	else
		emit_net_block(deny, AF_INET6, port, proto, op, k6.addr, 16);
	return can_signal ? act(deny->action, deny->rule_id) : act_by_request(deny->action, deny->rule_id);
}

/* The net rules' verdict on a kernel copy of the caller's sockaddr (the LSM and fmod_ret hooks). */
static __always_inline int judge_net(struct assay_config *cfg, struct sock *sk, struct sockaddr *address,
				     __u16 op)
{
	__u16 family = BPF_CORE_READ(address, sa_family);
	__u16 proto = BPF_CORE_READ(sk, sk_protocol);
	__u8 addr[16] = {};
	__u16 port;

	/* The inet send paths (udp_sendmsg, raw_sendmsg, rawv6_sendmsg) take a destination whose
	 * family is AF_UNSPEC as one of the socket's own family. (For connect(2), AF_UNSPEC means
	 * disconnect: nothing to judge.) */
	if (family == AF_UNSPEC && op == ASSAY_NET_OP_SENDMSG)
		family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)address;
		port = __builtin_bswap16(BPF_CORE_READ(sin, sin_port));
		bpf_probe_read_kernel(addr, 4, &sin->sin_addr);
	} else if (family == AF_INET6) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)address;
		port = __builtin_bswap16(BPF_CORE_READ(sin6, sin6_port));
		bpf_probe_read_kernel(addr, 16, &sin6->sin6_addr);
	} else {
		return 0;
	}
	return judge_dest(cfg, family, port, proto, BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr), addr, op, true);
}

/* The cgroup sock_addr form (the host backend): connect4/6 and sendmsg4/6 see the destination
 * after the kernel parsed it (AF_UNSPEC sends already resolved to the socket's family). Returns
 * the cgroup verdict: 1 lets the call go on, 0 fails it with EPERM. */
static __always_inline int decide_sock_addr(struct bpf_sock_addr *ctx, __u16 family, __u16 op)
{
	struct assay_config *cfg = ENFORCING(c_->net_rules);
	__u8 addr[16] = {};
	__u32 bound4 = 0;

	if (!cfg || !in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 1;
	__u16 port = __builtin_bswap16((__u16)ctx->user_port);
	__u16 proto = ctx->protocol;
	/* family is a constant: each program reads only the fields its attach type may */
	if (family == AF_INET) {
		__u32 a = ctx->user_ip4;
		__builtin_memcpy(addr, &a, 4);
		struct bpf_sock *sk = ctx->sk;
		if (sk)
			bound4 = sk->src_ip4;
	} else {
		__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
		__builtin_memcpy(addr, &a0, 4);
		__builtin_memcpy(addr + 4, &a1, 4);
		__builtin_memcpy(addr + 8, &a2, 4);
		__builtin_memcpy(addr + 12, &a3, 4);
	}
	return judge_dest(cfg, family, port, proto, bound4, addr, op, false) ? 0 : 1;
}

/* ---------------------------------------------------------------- source routes
 * An IPv6 routing header (IPV6_RTHDR) or an IPv4 source route (IP_OPTIONS with LSRR/SSRR) makes
 * the first hop an address that no rule judges. Where net rules of that family exist, processes
 * in the scope may not set one, by setsockopt or per message. */
#define SOL_IP 0
#define SOL_IPV6 41
#define IP_OPTIONS 4
#define IP_RETOPTS 7
#define IPV6_2292RTHDR 5
#define IPV6_RTHDR 57
#define ASSAY_CMSG_MAX 8

static __always_inline bool is_source_route(struct assay_config *cfg, int level, int optname)
{
	if (level == SOL_IPV6)
		return (cfg->net_rules & (ASSAY_NET_DENY6 | ASSAY_NET_DENY4)) &&
		       (optname == IPV6_RTHDR || optname == IPV6_2292RTHDR);
	if (level == SOL_IP)
		return (cfg->net_rules & ASSAY_NET_DENY4) && (optname == IP_OPTIONS || optname == IP_RETOPTS);
	return false;
}

/* The control messages of a sendmsg (a kernel copy by the time the hook runs). */
static __always_inline bool cmsg_source_route(struct assay_config *cfg, struct msghdr *msg)
{
	__u64 len = BPF_CORE_READ(msg, msg_controllen);
	char *ctl = BPF_CORE_READ(msg, msg_control);
	__u64 off = 0;

	if (!ctl || len < sizeof(struct cmsghdr))
		return false;
	for (int i = 0; i < ASSAY_CMSG_MAX; i++) {
		struct cmsghdr h = {};
		if (off + sizeof(h) > len || bpf_probe_read_kernel(&h, sizeof(h), ctl + off))
			return false;
		if (is_source_route(cfg, h.cmsg_level, h.cmsg_type))
			return true;
		if (h.cmsg_len < sizeof(h))
			return false;
		off += (h.cmsg_len + sizeof(long) - 1) & ~(sizeof(long) - 1);
	}
	/* more control messages than the walk reads: fail closed */
	return true;
}

static __always_inline int refuse_source_route(struct socket *sock)
{
	struct assay_port_range builtin = {.rule_id = 0, .action = ASSAY_ACT_DENY};
	__u8 none[16] = {};

	emit_net_block(&builtin, BPF_CORE_READ(sock, sk, __sk_common.skc_family), 0,
		       BPF_CORE_READ(sock, sk, sk_protocol), ASSAY_NET_OP_SOURCE_ROUTE, none, 16);
	return -EPERM;
}

/* setsockopt(IPV6_RTHDR / IP_OPTIONS) (lsm/socket_setsockopt, fmod_ret/security_socket_setsockopt). */
static __always_inline int decide_socket_setsockopt(struct socket *sock, int level, int optname, int ret)
{
	struct assay_config *cfg;

	if (ret || !(cfg = ENFORCING(c_->net_rules)))
		return ret;
	if (!is_source_route(cfg, level, optname) || !in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	return refuse_source_route(sock);
}

/* The host backend's setsockopt form: 1 lets the call go on, 0 fails it (EPERM). The kernel
 * passes optval on, untouched, whatever the verdict. */
static __always_inline int decide_cgroup_setsockopt(struct bpf_sockopt *ctx)
{
	struct assay_config *cfg = ENFORCING(c_->net_rules);
	struct assay_port_range builtin = {.rule_id = 0, .action = ASSAY_ACT_DENY};
	__u8 none[16] = {};

	ctx->optlen = ctx->optlen;   /* (the kernel uses the caller's optval as is for optlen unchanged) */
	if (!cfg || !is_source_route(cfg, ctx->level, ctx->optname) ||
	    !in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	emit_net_block(&builtin, sk ? sk->family : 0, 0, sk ? sk->protocol : 0, ASSAY_NET_OP_SOURCE_ROUTE, none, 16);
	return 0;
}

/* The socket_connect decision (lsm/socket_connect, fmod_ret/security_socket_connect). */
static __always_inline int decide_socket_connect(struct socket *sock, struct sockaddr *address, int ret)
{
	struct assay_config *cfg;

	if (ret || !(cfg = ENFORCING(c_->net_rules)))
		return ret;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	return judge_net(cfg, BPF_CORE_READ(sock, sk), address, ASSAY_NET_OP_CONNECT);
}

/* A destination given with the data never passes socket_connect: sendto/sendmsg on an
 * unconnected (or connected: UDP honours it) datagram socket, and TCP Fast Open's implicit
 * connect. Without this decision, an unconnected UDP socket would reach any denied address. */
static __always_inline int decide_socket_sendmsg(struct socket *sock, struct msghdr *msg, int ret)
{
	struct assay_config *cfg;

	if (ret || !(cfg = ENFORCING(c_->net_rules)))
		return ret;
	struct sockaddr *address = BPF_CORE_READ(msg, msg_name);
	if (!address || BPF_CORE_READ(msg, msg_namelen) < (int)sizeof(__u16)) {
		/* no destination: the socket's peer, judged at connect; a source route still is not */
		if (in_scope(cfg, bpf_get_current_pid_tgid() >> 32) && cmsg_source_route(cfg, msg))
			return refuse_source_route(sock);
		return 0;
	}
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	/* A source route sends to its first hop, an address no rule judges. */
	if (cmsg_source_route(cfg, msg))
		return refuse_source_route(sock);
	/* A TCP (or MPTCP) stream ignores the address, except to open a Fast Open connection. Other
	 * stream protocols (SCTP one-to-one) do use it, so they are judged. */
	__u16 proto = BPF_CORE_READ(sock, sk, sk_protocol);
	if (BPF_CORE_READ(sock, type) == SOCK_STREAM && (proto == IPPROTO_TCP || proto == IPPROTO_MPTCP) &&
	    (!(BPF_CORE_READ(msg, msg_flags) & MSG_FASTOPEN) || BPF_CORE_READ(sock, state) != SS_UNCONNECTED))
		return 0;
	return judge_net(cfg, BPF_CORE_READ(sock, sk), address, ASSAY_NET_OP_SENDMSG);
}

/* ---------------------------------------------------------------- SCTP
 * SCTP reaches peers that socket_connect never sees: connectx (several addresses at once, the
 * first of which connect(2) alone would show) and the implicit association of a one-to-many
 * sendmsg, with more addresses in SCTP_DSTADDRV4/V6 control messages. The kernel hands every
 * such address list to security_sctp_bind_connect, a kernel copy. */
#define SCTP_SOCKOPT_CONNECTX_OLD 107
#define SCTP_SOCKOPT_CONNECTX 110
#define SCTP_SOCKOPT_CONNECTX3 111
#define SCTP_SENDMSG_CONNECT 126
#define ASSAY_SCTP_ADDRS 16

/* One address of the list, judged on its own (a global function: verified once, not once per
 * address). Returns the verdict, or 1 when the list cannot be walked further. */
__noinline int assay_judge_sctp(__u64 sk, __u64 addr, __u32 left)
{
	struct assay_config *cfg = get_config();
	__u16 family = 0;

	if (!cfg)
		return 0;
	bpf_probe_read_kernel(&family, sizeof(family), (void *)addr);
	if ((family == AF_INET && left < sizeof(struct sockaddr_in)) ||
	    (family == AF_INET6 && left < sizeof(struct sockaddr_in6)) || (family != AF_INET && family != AF_INET6))
		return 1;
	return judge_net(cfg, (struct sock *)sk, (struct sockaddr *)addr, ASSAY_NET_OP_CONNECT);
}

/* sctp_bind_connect (lsm/sctp_bind_connect, fmod_ret/security_sctp_bind_connect): every peer
 * address of a connectx or of a new association's sendmsg. Bind-side option names (local
 * addresses) are not net_connect's business. */
static __always_inline int decide_sctp_connect(struct sock *sk_typed, int optname, struct sockaddr *address_typed,
					       int addrlen, int ret)
{
	struct assay_config *cfg;
	__u64 sk = 0, addr = 0, off = 0;

	if (ret || !(cfg = ENFORCING(c_->net_rules)))
		return ret;
	if (optname != SCTP_SOCKOPT_CONNECTX && optname != SCTP_SOCKOPT_CONNECTX_OLD &&
	    optname != SCTP_SOCKOPT_CONNECTX3 && optname != SCTP_SENDMSG_CONNECT)
		return 0;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	bpf_probe_read_kernel(&sk, sizeof(sk), &sk_typed);
	bpf_probe_read_kernel(&addr, sizeof(addr), &address_typed);
	for (int i = 0; i < ASSAY_SCTP_ADDRS; i++) {
		if (off >= (__u64)addrlen)
			return 0;
		__u16 family = 0;
		bpf_probe_read_kernel(&family, sizeof(family), (void *)(addr + off));
		int v = assay_judge_sctp(sk, addr + off, addrlen - off);
		if (v == 1)
			return 0;   /* malformed: the kernel refuses the list itself (EINVAL) */
		if (v)
			return v;
		off += family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
	}
	/* more addresses than the walk reads: fail closed */
	return off < (__u64)addrlen ? -EPERM : 0;
}

#endif /* __ASSAY_NET_BPF_H */
