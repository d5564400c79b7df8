// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Assay kernel side: scope tracking and event tracepoints, plus the LSM enforcement hooks. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "assay.h"

#define EPERM 1
#define SIGKILL 9
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SS_UNCONNECTED 1
#define MSG_FASTOPEN 0x20000000
#define FMODE_EXEC 0x20
/* execve's opens carry this in f_flags (an octal 040 no O_* flag uses); newer kernels also
 * set FMODE_EXEC in f_mode. */
#define __FMODE_EXEC 0x20

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);
} events SEC(".maps");

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

/* tgid -> 1. Inherited on fork in the kernel, so children can never run unobserved. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} scope_pids SEC(".maps");

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

/* Events are too large for the BPF stack. Slot 0 is for tracepoints, slot 1 for LSM hooks. */
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

#define INODE_MAP(name)                                      \
	struct {                                             \
		__uint(type, BPF_MAP_TYPE_HASH);             \
		__uint(max_entries, 262144);                 \
		__uint(map_flags, BPF_F_NO_PREALLOC);        \
		__type(key, struct assay_inode_key);         \
		__type(value, struct assay_rule_ref);        \
	} name SEC(".maps")

INODE_MAP(file_deny);
INODE_MAP(file_deny_dirs);
INODE_MAP(file_allow);
INODE_MAP(file_allow_dirs);
INODE_MAP(exec_deny);
INODE_MAP(exec_deny_dirs);
INODE_MAP(exec_allow);
INODE_MAP(exec_allow_dirs);

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
	struct assay_lpm4_key l4;
	struct assay_lpm6_key l6;
	struct assay_net_value nv;
};
struct assay_btf_anchor *assay_btf_anchor_unused __attribute__((unused));

static __always_inline struct assay_config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&assay_config, &zero);
}

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1;
}

static __always_inline bool cgroup_in_subtree(__u64 target)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct cgroup *cg = BPF_CORE_READ(task, cgroups, dfl_cgrp);

	for (int i = 0; i < ASSAY_CGROUP_DEPTH; i++) {
		if (!cg)
			return false;
		if (BPF_CORE_READ(cg, kn, id) == target)
			return true;
		/* css "self" is the first member, so its parent pointer is the parent cgroup. */
		cg = (struct cgroup *)BPF_CORE_READ(cg, self.parent);
	}
	return false;
}

static __always_inline bool in_scope(const struct assay_config *cfg, __u32 tgid)
{
	if (tgid == cfg->monitor_tgid)
		return false;
	if (cfg->scope_all)
		return true;
	if (bpf_map_lookup_elem(&scope_pids, &tgid))
		return true;
	if (cfg->scope_cgroup)
		return cgroup_in_subtree(cfg->cgroup_id);
	return false;
}

static __always_inline bool wants(const struct assay_config *cfg, enum assay_event_type t)
{
	return cfg->event_mask & (1u << t);
}

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

/* ---------------------------------------------------------------- process lifecycle */

SEC("tracepoint/sched/sched_process_fork")
int assay_fork(struct trace_event_raw_sched_process_fork *ctx)
{
	struct assay_config *cfg = get_config();
	__u32 parent = bpf_get_current_pid_tgid() >> 32;
	__u32 child = BPF_CORE_READ(ctx, child_pid);
	__u32 one = 1;

	if (!cfg || !in_scope(cfg, parent))
		return 0;
	/* Threads land here too; their tid key is harmless and removed at their exit. */
	if (bpf_map_lookup_elem(&scope_pids, &parent) &&
	    bpf_map_update_elem(&scope_pids, &child, &one, BPF_ANY))
		count(ASSAY_CNT_SCOPE_FULL);
	if (!wants(cfg, ASSAY_EV_FORK) || child == (__u32)bpf_get_current_pid_tgid())
		return 0;

	struct assay_fork_event ev = {};
	fill_header(&ev.hdr, ASSAY_EV_FORK);
	ev.child_pid = child;
	emit(&ev, sizeof(ev));
	return 0;
}

SEC("tracepoint/sched/sched_process_exec")
int assay_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	struct assay_config *cfg = get_config();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (!cfg || !in_scope(cfg, tgid) || !wants(cfg, ASSAY_EV_EXEC))
		return 0;
	struct scratch_buf *s = get_scratch(0);
	if (!s)
		return 0;
	struct assay_exec_event *ev = &s->ev.exec;
	fill_header(&ev->hdr, ASSAY_EV_EXEC);

	unsigned int off = BPF_CORE_READ(ctx, __data_loc_filename) & 0xFFFF;
	long n = bpf_probe_read_kernel_str(ev->filename, sizeof(ev->filename), (void *)ctx + off);
	ev->filename_len = n > 0 ? n - 1 : 0;

	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	unsigned long start = BPF_CORE_READ(task, mm, arg_start);
	unsigned long end = BPF_CORE_READ(task, mm, arg_end);
	unsigned long len = end > start ? end - start : 0;
	if (len > ASSAY_ARGS_MAX)
		len = ASSAY_ARGS_MAX;
	ev->args_len = 0;
	if (len && !bpf_probe_read_user(ev->args, len & (ASSAY_ARGS_MAX - 1) ?: ASSAY_ARGS_MAX,
					(void *)start))
		ev->args_len = len;
	emit(ev, sizeof(*ev));
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int assay_exit(void *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32, tid = (__u32)pid_tgid;
	struct assay_config *cfg = get_config();

	if (tid != tgid) {
		bpf_map_delete_elem(&scope_pids, &tid);
		return 0;
	}
	/* Only the last thread out ends the process: before that, its other threads stay in scope. */
	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0;
	bool scoped = cfg && in_scope(cfg, tgid);
	bpf_map_delete_elem(&scope_pids, &tgid);
	if (!scoped || !wants(cfg, ASSAY_EV_EXIT))
		return 0;

	struct assay_exit_event ev = {};
	fill_header(&ev.hdr, ASSAY_EV_EXIT);
	int code = BPF_CORE_READ(task, exit_code);
	ev.exit_code = (code >> 8) & 0xff;
	ev.signal = code & 0x7f;
	emit(&ev, sizeof(ev));
	return 0;
}

/* ---------------------------------------------------------------- file opens */

static __always_inline int open_enter(__u32 kind, __s32 dfd, const char *path, __u64 flags, __u32 mode)
{
	struct assay_config *cfg = get_config();
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;

	if (!cfg || !wants(cfg, ASSAY_EV_OPEN) || !in_scope(cfg, pid_tgid >> 32))
		return 0;
	struct pending_call pc = {.ptr = (__u64)path, .flags = flags, .dfd = dfd, .mode = mode, .kind = kind};
	if (bpf_map_update_elem(&pending, &tid, &pc, BPF_ANY))
		count(ASSAY_CNT_PENDING_FULL);
	return 0;
}

static __always_inline int open_exit(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending_call *pc = bpf_map_lookup_elem(&pending, &tid);
	if (!pc)
		return 0;
	struct scratch_buf *s = get_scratch(0);
	if (!s)
		goto out;
	struct assay_open_event *ev = &s->ev.open;
	fill_header(&ev->hdr, ASSAY_EV_OPEN);
	ev->ret = ret;
	ev->dfd = pc->dfd;
	ev->flags = (__s32)pc->flags;
	ev->mode = pc->mode;
	ev->syscall = pc->kind;
	/* Read at exit: the kernel has faulted the string in by now. */
	long n = bpf_probe_read_user_str(ev->path, sizeof(ev->path), (void *)pc->ptr);
	ev->path_len = n > 0 ? n - 1 : 0;
	emit(ev, offsetof(struct assay_open_event, path) + (ev->path_len & (ASSAY_PATH_MAX - 1)));
out:
	bpf_map_delete_elem(&pending, &tid);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_openat")
int assay_openat_enter(struct trace_event_raw_sys_enter *ctx)
{
	return open_enter(ASSAY_SYS_OPENAT, (__s32)ctx->args[0], (const char *)ctx->args[1],
			  ctx->args[2], (__u32)ctx->args[3]);
}

SEC("tracepoint/syscalls/sys_exit_openat")
int assay_openat_exit(struct trace_event_raw_sys_exit *ctx)
{
	return open_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_enter_openat2")
int assay_openat2_enter(struct trace_event_raw_sys_enter *ctx)
{
	struct open_how how = {};
	bpf_probe_read_user(&how, sizeof(how), (void *)ctx->args[2]);
	return open_enter(ASSAY_SYS_OPENAT2, (__s32)ctx->args[0], (const char *)ctx->args[1],
			  how.flags, (__u32)how.mode);
}

SEC("tracepoint/syscalls/sys_exit_openat2")
int assay_openat2_exit(struct trace_event_raw_sys_exit *ctx)
{
	return open_exit(ctx->ret);
}

/* Not on every architecture (arm64 has no open(2)): userspace skips these where the
 * tracepoint does not exist. */
SEC("tracepoint/syscalls/sys_enter_open")
int assay_open_enter(struct trace_event_raw_sys_enter *ctx)
{
	return open_enter(ASSAY_SYS_OPEN, -100, (const char *)ctx->args[0], ctx->args[1], (__u32)ctx->args[2]);
}

SEC("tracepoint/syscalls/sys_exit_open")
int assay_open_exit(struct trace_event_raw_sys_exit *ctx)
{
	return open_exit(ctx->ret);
}

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

/* ---------------------------------------------------------------- LSM: file enforcement */

static __always_inline __u32 new_encode_dev(__u32 s_dev)
{
	__u32 major = s_dev >> 20, minor = s_dev & ((1U << 20) - 1);
	return (minor & 0xff) | (major << 8) | ((minor & ~0xffU) << 12);
}

/*
 * The walks below are global (noinline, non-static) functions: the verifier checks each one once,
 * on its own, instead of once per path through the caller. Inlined, the nested bounded loops went
 * past its one-million-instruction limit (E2BIG on 6.1). Global functions take only scalars, so
 * kernel pointers travel as u64 and are read back with CO-RE probe reads; a match is returned
 * packed as (rule_id << 32 | depth << 16 | action), 0 meaning none. depth counts the steps from
 * the file to the matching entry (0: the file itself), so the most specific entry can win.
 */
#define PACK(r, depth) (((__u64)(r)->rule_id << 32) | ((__u64)(depth) << 16) | ((r)->action & 0xffff))
#define MATCH_DEPTH(m) (((m) >> 16) & 0xffff)
#define MATCH_ACTION(m) ((__u32)(m) & 0xffff)

/* The seed's lookup order: (dev_new, gen), (dev_old, gen), (dev_new, 0), (dev_old, 0). */
static __always_inline __u64 lookup_inode(void *map, struct inode *inode, __u32 depth)
{
	struct assay_inode_key k = {};
	struct assay_rule_ref *r;
	__u32 s_dev = BPF_CORE_READ(inode, i_sb, s_dev);

	k.ino = BPF_CORE_READ(inode, i_ino);
	k.dev = new_encode_dev(s_dev);
	k.gen = BPF_CORE_READ(inode, i_generation);
	if ((r = bpf_map_lookup_elem(map, &k)))
		return PACK(r, depth);
	k.dev = s_dev;
	if ((r = bpf_map_lookup_elem(map, &k)))
		return PACK(r, depth);
	k.gen = 0;
	k.dev = new_encode_dev(s_dev);
	if ((r = bpf_map_lookup_elem(map, &k)))
		return PACK(r, depth);
	k.dev = s_dev;
	if ((r = bpf_map_lookup_elem(map, &k)))
		return PACK(r, depth);
	return 0;
}

static __always_inline struct mount *real_mount(struct vfsmount *m)
{
	return (struct mount *)((void *)m - bpf_core_field_offset(struct mount, mnt));
}

/*
 * Walks the ancestors of a dentry: first inside its filesystem through d_parent (so a bind mount
 * of a subdirectory still reaches the protected directory), then across mount points.
 */
static __always_inline __u64 lookup_ancestors(void *map, struct dentry *d, struct vfsmount *vmnt)
{
	struct mount *mnt = real_mount(vmnt);
	__u64 r;

	for (int i = 0; i < ASSAY_WALK_DEPTH; i++) {
		struct dentry *parent = BPF_CORE_READ(d, d_parent);
		if (parent == d) {
			struct mount *up = BPF_CORE_READ(mnt, mnt_parent);
			if (up == mnt)
				return 0;
			d = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			continue;
		}
		d = parent;
		if ((r = lookup_inode(map, BPF_CORE_READ(d, d_inode), i + 1)))
			return r;
	}
	count(ASSAY_CNT_WALK_TRUNC);
	return 0;
}

#define INODE_LOOKUPS(map)                                                                  \
	__noinline __u64 assay_lookup_##map(__u64 inode)                                    \
	{                                                                                   \
		return lookup_inode(&map, (struct inode *)inode, 0);                        \
	}                                                                                   \
	__noinline __u64 assay_ancestors_##map(__u64 dentry, __u64 vfsmount)               \
	{                                                                                   \
		return lookup_ancestors(&map, (struct dentry *)dentry, (struct vfsmount *)vfsmount); \
	}

INODE_LOOKUPS(file_deny)
INODE_LOOKUPS(file_allow)
INODE_LOOKUPS(file_deny_dirs)
INODE_LOOKUPS(file_allow_dirs)
INODE_LOOKUPS(exec_deny)
INODE_LOOKUPS(exec_allow)
INODE_LOOKUPS(exec_deny_dirs)
INODE_LOOKUPS(exec_allow_dirs)

/* Writes the path, as d_path would show it, right-aligned into the LSM scratch buffer; returns
 * its start offset there. */
__noinline __u32 assay_resolve_path(__u64 dentry, __u64 vfsmount)
{
	struct scratch_buf *s = get_scratch(1);
	struct dentry *d = (struct dentry *)dentry;
	struct mount *mnt = real_mount((struct vfsmount *)vfsmount);
	__u32 off = ASSAY_PATH_MAX - 1;

	if (!s)
		return off;
	s->path[ASSAY_PATH_MAX - 1] = 0;
	for (int i = 0; i < ASSAY_WALK_DEPTH; i++) {
		/* Forget what the verifier knows of off, so every path into this iteration is the
		 * same state and gets pruned; otherwise the paths multiply with each iteration. */
		asm volatile("" : "+r"(off));
		off &= ASSAY_PATH_MAX - 1;
		struct dentry *parent = BPF_CORE_READ(d, d_parent);
		struct dentry *root = BPF_CORE_READ(mnt, mnt.mnt_root);
		if (d == root || d == parent) {
			struct mount *up = BPF_CORE_READ(mnt, mnt_parent);
			if (up == mnt)
				break;
			d = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			continue;
		}
		__u32 len = BPF_CORE_READ(d, d_name.len);
		const unsigned char *name = BPF_CORE_READ(d, d_name.name);
		if (len >= ASSAY_NAME_MAX || len + 1 > off)
			break;
		off -= len;
		bpf_probe_read_kernel(s->path + (off & (ASSAY_PATH_MAX - 1)), len & (ASSAY_NAME_MAX - 1), name);
		off -= 1;
		s->path[off & (ASSAY_PATH_MAX - 1)] = '/';
		d = parent;
	}
	if (off == ASSAY_PATH_MAX - 1) {
		off -= 1;
		s->path[off] = '/';
	}
	return off;
}

static __always_inline void emit_block(enum assay_event_type type, __u64 rule, struct inode *inode,
				       struct dentry *d, struct vfsmount *mnt)
{
	__u32 off = assay_resolve_path((__u64)d, (__u64)mnt) & (ASSAY_PATH_MAX - 1);
	struct scratch_buf *s = get_scratch(1);
	if (!s)
		return;
	struct assay_block_event *ev = &s->ev.block;
	fill_header(&ev->hdr, type);
	ev->ino = BPF_CORE_READ(inode, i_ino);
	ev->dev = new_encode_dev(BPF_CORE_READ(inode, i_sb, s_dev));
	ev->gen = BPF_CORE_READ(inode, i_generation);
	ev->rule_id = rule >> 32;
	ev->action = MATCH_ACTION(rule);
	__u32 len = (ASSAY_PATH_MAX - 1 - off) & (ASSAY_PATH_MAX - 1);
	bpf_probe_read_kernel(ev->path, len, s->path + off);
	ev->path_len = len;
	emit(ev, offsetof(struct assay_block_event, path) + len);
}

/* Applies a matched rule's action: returns the LSM verdict. */
static __always_inline int act(__u32 action)
{
	switch (action) {
	case ASSAY_ACT_LOG:
	case ASSAY_ACT_ALERT:
		return 0;
	case ASSAY_ACT_KILL_IMMEDIATE:
		bpf_send_signal(SIGKILL);
		return -EPERM;
	default:
		return -EPERM;
	}
}

/* The inode-identity decision shared by file and exec rules. */
#define CHECK_INODE(cfg_rules, prefix, file, type)                                                  \
	({                                                                                          \
		struct inode *inode_ = BPF_CORE_READ(file, f_inode);                                \
		struct dentry *d_ = BPF_CORE_READ(file, f_path.dentry);                             \
		struct vfsmount *mnt_ = BPF_CORE_READ(file, f_path.mnt);                            \
		__u32 rules_ = (cfg_rules);                                                         \
		__u64 rule_ = 0;                                                                    \
		int verdict_ = 0;                                                                   \
		if (rules_ & ASSAY_RULES_DENY)                                                      \
			rule_ = assay_lookup_##prefix##_deny((__u64)inode_);                        \
		if (!rule_ && (rules_ & ASSAY_RULES_DENY_DIRS))                                     \
			rule_ = assay_ancestors_##prefix##_deny_dirs((__u64)d_, (__u64)mnt_);        \
		/* The most specific entry wins: an exception closer to the file than the deny   \
		 * lifts it; at the same distance the deny stays. */                              \
		if (rule_ && MATCH_DEPTH(rule_) && (rules_ & ASSAY_RULES_ALLOW) &&                  \
		    assay_lookup_##prefix##_allow((__u64)inode_))                                    \
			rule_ = 0;                                                                  \
		if (rule_ && MATCH_DEPTH(rule_) > 1 && (rules_ & ASSAY_RULES_ALLOW_DIRS)) {         \
			__u64 allow_ = assay_ancestors_##prefix##_allow_dirs((__u64)d_, (__u64)mnt_); \
			if (allow_ && MATCH_DEPTH(allow_) < MATCH_DEPTH(rule_))                     \
				rule_ = 0;                                                          \
		}                                                                                   \
		if (rule_) {                                                                        \
			emit_block(type, rule_, inode_, d_, mnt_);                                  \
			verdict_ = act(MATCH_ACTION(rule_));                                        \
		}                                                                                   \
		verdict_;                                                                           \
	})

SEC("lsm/file_open")
int BPF_PROG(assay_file_open, struct file *file, int ret)
{
	struct assay_config *cfg = get_config();

	if (ret || !cfg || !cfg->enforce || !cfg->file_rules)
		return ret;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	/* The kernel's own opens for execve (the binary, its ELF interpreter) are proc_exec's
	 * business: file rules govern what a process opens, not what it runs. */
	if ((BPF_CORE_READ(file, f_flags) & __FMODE_EXEC) || (BPF_CORE_READ(file, f_mode) & FMODE_EXEC))
		return 0;
	return CHECK_INODE(cfg->file_rules, file, file, ASSAY_EV_FILE_BLOCKED);
}

/* Runs once per binary handler stage: first with the file execve named (a #! script is
 * judged by its own inode), then again with its interpreter. */
SEC("lsm/bprm_check_security")
int BPF_PROG(assay_bprm_check, struct linux_binprm *bprm, int ret)
{
	struct assay_config *cfg = get_config();

	if (ret || !cfg || !cfg->enforce || !cfg->exec_rules)
		return ret;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	struct file *file = BPF_CORE_READ(bprm, file);
	return CHECK_INODE(cfg->exec_rules, exec, file, ASSAY_EV_EXEC_BLOCKED);
}

/* ---------------------------------------------------------------- LSM: connect enforcement */

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

/* The net rules' verdict on one destination (a kernel copy of the caller's sockaddr). */
static __always_inline int judge_net(struct assay_config *cfg, struct socket *sock, struct sockaddr *address,
				     __u16 op)
{
	__u16 family = BPF_CORE_READ(address, sa_family);
	__u16 proto = BPF_CORE_READ(sock, sk, sk_protocol);
	struct assay_lpm4_key k4 = {.prefixlen = 32};
	struct assay_lpm6_key k6 = {.prefixlen = 128};
	struct assay_port_range *deny = NULL;
	__u16 port;
	bool v4;

	if (family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)address;
		port = __builtin_bswap16(BPF_CORE_READ(sin, sin_port));
		bpf_probe_read_kernel(k4.addr, 4, &sin->sin_addr);
		v4 = true;
	} else if (family == AF_INET6) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)address;
		port = __builtin_bswap16(BPF_CORE_READ(sin6, sin6_port));
		bpf_probe_read_kernel(k6.addr, 16, &sin6->sin6_addr);
		/* ::ffff:a.b.c.d is an IPv4 peer: judge it by the IPv4 rules, so it is no way around them. */
		v4 = !k6.addr[0] && !k6.addr[1] && !k6.addr[2] && !k6.addr[3] && !k6.addr[4] && !k6.addr[5] &&
		     !k6.addr[6] && !k6.addr[7] && !k6.addr[8] && !k6.addr[9] && k6.addr[10] == 0xff &&
		     k6.addr[11] == 0xff;
		if (v4)
			__builtin_memcpy(k4.addr, &k6.addr[12], 4);
	} else {
		return 0;
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
	return act(deny->action);
}

SEC("lsm/socket_connect")
int BPF_PROG(assay_socket_connect, struct socket *sock, struct sockaddr *address, int addrlen, int ret)
{
	struct assay_config *cfg = get_config();

	if (ret || !cfg || !cfg->enforce || !cfg->net_rules)
		return ret;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	return judge_net(cfg, sock, address, ASSAY_NET_OP_CONNECT);
}

/* A destination given with the data never passes socket_connect: sendto/sendmsg on an
 * unconnected (or connected: UDP honours it) datagram socket, and TCP Fast Open's implicit
 * connect. Without this hook, an unconnected UDP socket would reach any denied address. */
SEC("lsm/socket_sendmsg")
int BPF_PROG(assay_socket_sendmsg, struct socket *sock, struct msghdr *msg, int size, int ret)
{
	struct assay_config *cfg = get_config();

	if (ret || !cfg || !cfg->enforce || !cfg->net_rules)
		return ret;
	struct sockaddr *address = BPF_CORE_READ(msg, msg_name);
	if (!address || BPF_CORE_READ(msg, msg_namelen) < (int)sizeof(__u16))
		return 0; /* no destination: the socket's peer, judged at connect */
	/* A stream socket ignores the address, except to open a Fast Open connection. */
	if (BPF_CORE_READ(sock, type) == SOCK_STREAM &&
	    (!(BPF_CORE_READ(msg, msg_flags) & MSG_FASTOPEN) || BPF_CORE_READ(sock, state) != SS_UNCONNECTED))
		return 0;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	return judge_net(cfg, sock, address, ASSAY_NET_OP_SENDMSG);
}
