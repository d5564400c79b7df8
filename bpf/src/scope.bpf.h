// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Which processes are watched: the scope map inherited on fork, cgroup ancestry, lifecycle events. */
#ifndef __ASSAY_SCOPE_BPF_H
#define __ASSAY_SCOPE_BPF_H

/* tgid -> 1. Inherited on fork in the kernel, so children can never run unobserved. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} scope_pids SEC(".maps");

/* How many entries the kernel put into scope_pids, minus those it took out (entries userspace
 * wrote are in assay_config.scope_user): a map that fills up must refuse forks, not lose them. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} scope_count SEC(".maps");

static __always_inline void scope_counted(__s64 delta)
{
	__u32 zero = 0;
	__s64 *n = bpf_map_lookup_elem(&scope_count, &zero);
	if (n)
		__sync_fetch_and_add(n, delta);
}

/* Adds a key to scope_pids; true when it is there afterwards. */
static __always_inline bool scope_add(__u32 key)
{
	__u32 one = 1;

	if (!bpf_map_update_elem(&scope_pids, &key, &one, BPF_NOEXIST)) {
		scope_counted(1);
		return true;
	}
	return bpf_map_lookup_elem(&scope_pids, &key) != NULL;
}

static __always_inline void scope_del(__u32 key)
{
	if (!bpf_map_delete_elem(&scope_pids, &key))
		scope_counted(-1);
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
	/* Deeper than the walk: it cannot be shown outside the subtree, so it is in (fail closed). */
	return true;
}

static __always_inline bool in_scope(const struct assay_config *cfg, __u32 tgid)
{
	if (tgid == cfg->monitor_tgid)
		return false;
	if (cfg->scope_all)
		return true;
	if (bpf_map_lookup_elem(&scope_pids, &tgid))
		return true;
	if (cfg->scope_cgroup && cgroup_in_subtree(cfg->cgroup_id)) {
		/* Seen in the subtree: it stays in scope, with every child it forks from now on, even
		 * if it moves itself out. */
		if (!scope_add(tgid))
			count(ASSAY_CNT_SCOPE_FULL);
		return true;
	}
	return false;
}

/* ---------------------------------------------------------------- process lifecycle */

SEC("tracepoint/sched/sched_process_fork")
int assay_fork(struct trace_event_raw_sched_process_fork *ctx)
{
	struct assay_config *cfg = get_config();
	__u32 parent = bpf_get_current_pid_tgid() >> 32;
	__u32 child = BPF_CORE_READ(ctx, child_pid);

	if (!cfg || !in_scope(cfg, parent))
		return 0;
	/* Threads land here too; their tid key is harmless and removed at their exit. */
	if (bpf_map_lookup_elem(&scope_pids, &parent) && !scope_add(child))
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

	/* Only the last thread out ends the process: before that, its other threads stay in scope.
	 * That thread need not be the leader (it may have left first with SYS_exit), so whichever
	 * thread is last removes the process, or its entry would leak and fill the map. */
	bool last = BPF_CORE_READ(task, signal, live.counter) == 0;

	if (tid != tgid)
		scope_del(tid);
	if (!last)
		return 0;
	bool scoped = cfg && in_scope(cfg, tgid);
	scope_del(tgid);
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

/* ---------------------------------------------------------------- a full scope map fails closed */

#define EAGAIN 11

/* task_alloc (lsm/task_alloc, fmod_ret/security_task_alloc): a process or thread of a map-tracked
 * scope may not fork once scope_pids is (nearly) full, since its child could not be tracked and
 * would run outside the scope. The limit keeps room for forks already past this point. */
static __always_inline int decide_task_alloc(int ret)
{
	struct assay_config *cfg;
	__u32 zero = 0;

	if (ret || !(cfg = ENFORCING(c_->scope_limit)) || cfg->scope_all)
		return ret;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (tgid == cfg->monitor_tgid || !bpf_map_lookup_elem(&scope_pids, &tgid))
		return 0;
	__s64 *n = bpf_map_lookup_elem(&scope_count, &zero);
	if (n && *n + cfg->scope_user >= cfg->scope_limit) {
		count(ASSAY_CNT_SCOPE_FORK_DENIED);
		return -EAGAIN;
	}
	return 0;
}

#endif /* __ASSAY_SCOPE_BPF_H */
