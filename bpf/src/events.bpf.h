// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The ring buffer, event headers, per-CPU scratch space and syscall enter/exit pairing. */
#ifndef __ASSAY_EVENTS_BPF_H
#define __ASSAY_EVENTS_BPF_H

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);
} events SEC(".maps");

struct pending_call {
	__u64 ptr;     /* user pointer to the path or sockaddr */
	__u64 flags;
	__s32 dfd;     /* dirfd for opens, socket fd for connect */
	__u32 mode;
	__u32 kind;
	__u32 _pad;
};

/* Pairs a syscall's enter with its exit, keyed by thread id. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct pending_call);
} pending SEC(".maps");

union assay_any_event {
	struct assay_exec_event exec;
	struct assay_open_event open;
	struct assay_block_event block;
};

/* Events are too large for the BPF stack. Slot 0 is for tracepoints, slot 1 for the enforcing decisions. */
struct scratch_buf {
	union assay_any_event ev;
	char path[ASSAY_PATH_MAX + ASSAY_NAME_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct scratch_buf);
} scratch SEC(".maps");

/* Keep the ABI enums and structs in the object's BTF, so userspace can check its mirror. */
struct assay_btf_anchor {
	enum assay_event_type t;
	enum assay_action a;
	enum assay_counter c;
	enum assay_open_syscall s;
	enum assay_net_op o;
	struct assay_exit_event exit;
	struct assay_fork_event fork;
	struct assay_connect_event connect;
	struct assay_net_block_event net_block;
	struct assay_tamper_event tamper;
	enum assay_tamper tw;
	enum assay_knob kn;
	struct assay_lpm4_key l4;
	struct assay_lpm6_key l6;
	struct assay_net_value nv;
};
struct assay_btf_anchor *assay_btf_anchor_unused __attribute__((unused));

static __always_inline void fill_header(struct assay_event_header *h, enum assay_event_type type)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();

	h->ts_ns = bpf_ktime_get_ns();
	h->cgroup_id = bpf_get_current_cgroup_id();
	h->type = type;
	h->pid = pid_tgid >> 32;
	h->tid = (__u32)pid_tgid;
	h->ppid = BPF_CORE_READ(task, real_parent, tgid);
	h->uid = (__u32)uid_gid;
	h->gid = uid_gid >> 32;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

static __always_inline void emit(void *ev, __u64 size)
{
	if (size > sizeof(union assay_any_event))
		size = sizeof(union assay_any_event);
	if (bpf_ringbuf_output(&events, ev, size, 0))
		count(ASSAY_CNT_RINGBUF_DROP);
}

static __always_inline struct scratch_buf *get_scratch(__u32 slot)
{
	return bpf_map_lookup_elem(&scratch, &slot);
}

#endif /* __ASSAY_EVENTS_BPF_H */
