// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Constants, the config map, counters and the verdict shared by every hook. */
#ifndef __ASSAY_COMMON_BPF_H
#define __ASSAY_COMMON_BPF_H

#define EPERM 1
#define SIGKILL 9
#define AF_UNSPEC 0
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SS_UNCONNECTED 1
#define MSG_FASTOPEN 0x20000000
#define FMODE_EXEC 0x20
/* execve's opens carry this in f_flags (an octal 040 no O_* flag uses); newer kernels also
 * set FMODE_EXEC in f_mode. */
#define __FMODE_EXEC 0x20

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ASSAY_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct assay_config);
} assay_config SEC(".maps");

static __always_inline struct assay_config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&assay_config, &zero);
}

/* The config when the decisions must act, NULL otherwise: enforcement is on and `bits`, an
 * expression over the config c_ (c_->file_rules, c_->net_rules, ...), is non-zero. The one guard
 * every decision starts with. */
#define ENFORCING(bits)                                                                   \
	({                                                                                \
		struct assay_config *c_ = get_config();                                   \
		(c_ && c_->enforce && (bits)) ? c_ : NULL;                                 \
	})

/* The kernel's dev_t (MAJOR << 20 | MINOR) in the form stat(2) shows it. */
static __always_inline __u32 new_encode_dev(__u32 s_dev)
{
	__u32 major = s_dev >> 20, minor = s_dev & ((1U << 20) - 1);
	return (minor & 0xff) | (major << 8) | ((minor & ~0xffU) << 12);
}

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1;
}

static __always_inline bool wants(const struct assay_config *cfg, enum assay_event_type t)
{
	return cfg->event_mask & (1u << t);
}

/* Graceful kills the monitor must start: tgid -> rule id. A map the monitor polls, not the ring
 * buffer, so a flood of events cannot lose a kill request. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ASSAY_KILL_REQUESTS);
	__type(key, __u32);
	__type(value, __u32);
} kill_requests SEC(".maps");

/* Applies a matched rule's action: returns the verdict (0 or -EPERM) for the hook. */
static __always_inline int act(__u32 action, __u32 rule_id)
{
	__u32 tgid;

	switch (action) {
	case ASSAY_ACT_LOG:
	case ASSAY_ACT_ALERT:
		return 0;
	case ASSAY_ACT_KILL_IMMEDIATE:
		bpf_send_signal(SIGKILL);
		return -EPERM;
	case ASSAY_ACT_KILL_GRACEFUL:
		tgid = bpf_get_current_pid_tgid() >> 32;
		/* No room for the request: kill now rather than let the process go on. */
		if (bpf_map_update_elem(&kill_requests, &tgid, &rule_id, BPF_NOEXIST) &&
		    !bpf_map_lookup_elem(&kill_requests, &tgid)) {
			count(ASSAY_CNT_KILL_FULL);
			bpf_send_signal(SIGKILL);
		}
		return -EPERM;
	default:
		return -EPERM;
	}
}

/* act() for programs that may not send signals (cgroup programs): every kill goes through
 * kill_requests, an immediate one flagged ASSAY_KILL_NOW, and the monitor sends it. The call
 * fails either way, so a kill that waits for the monitor lets nothing through. */
static __always_inline int act_by_request(__u32 action, __u32 rule_id)
{
	__u32 tgid, req;

	switch (action) {
	case ASSAY_ACT_LOG:
	case ASSAY_ACT_ALERT:
		return 0;
	case ASSAY_ACT_KILL_IMMEDIATE:
	case ASSAY_ACT_KILL_GRACEFUL:
		tgid = bpf_get_current_pid_tgid() >> 32;
		req = rule_id | (action == ASSAY_ACT_KILL_IMMEDIATE ? ASSAY_KILL_NOW : 0);
		if (bpf_map_update_elem(&kill_requests, &tgid, &req, BPF_ANY))
			count(ASSAY_CNT_KILL_FULL);
		return -EPERM;
	default:
		return -EPERM;
	}
}

#endif /* __ASSAY_COMMON_BPF_H */
