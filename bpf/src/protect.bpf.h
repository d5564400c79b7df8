// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Self-protection: processes in the scope may not take the monitor's BPF objects, signal it or
 * trace it (decisions bpf_map, bpf_prog, task_kill, ptrace_access_check). */
#ifndef __ASSAY_PROTECT_BPF_H
#define __ASSAY_PROTECT_BPF_H

/* ASSAY_OWN_KEY(kind, id) -> 1 for every map and program of the monitor's object. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u32);
} own_objects SEC(".maps");

#define PTRACE_MODE_ATTACH 0x02

static __always_inline int refuse_tamper(__u32 what, __u32 target, __u32 arg)
{
	struct assay_tamper_event ev = {};

	fill_header(&ev.hdr, ASSAY_EV_TAMPER_BLOCKED);
	ev.what = what;
	ev.target = target;
	ev.arg = arg;
	emit(&ev, sizeof(ev));
	return -EPERM;
}

/* The config when the caller is in the scope and self-protection is on, NULL otherwise. */
static __always_inline struct assay_config *protecting(void)
{
	struct assay_config *cfg = ENFORCING(c_->protect);

	if (!cfg || !in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return NULL;
	return cfg;
}

static __always_inline int guard_object(__u32 kind, __u32 id, int ret)
{
	__u64 key = ASSAY_OWN_KEY(kind, id);

	if (ret || !protecting() || !bpf_map_lookup_elem(&own_objects, &key))
		return ret;
	return refuse_tamper(kind, id, 0);
}

/* bpf_map: every way to an fd of a map (by id, pinned path) passes here. */
static __always_inline int decide_bpf_map(struct bpf_map *map, int ret)
{
	return guard_object(ASSAY_TAMPER_BPF_MAP, BPF_CORE_READ(map, id), ret);
}

static __always_inline int decide_bpf_prog(struct bpf_prog *prog, int ret)
{
	return guard_object(ASSAY_TAMPER_BPF_PROG, BPF_CORE_READ(prog, aux, id), ret);
}

static __always_inline bool is_monitor(struct assay_config *cfg, struct task_struct *p)
{
	__u32 tgid = BPF_CORE_READ(p, tgid);

	return tgid == cfg->monitor_tgid || (cfg->watchdog_tgid && tgid == cfg->watchdog_tgid);
}

/* task_kill: no signal from the scope reaches the monitor or its watchdog (signal 0, which only
 * asks whether the process exists, is let through). With --all the scope is everyone, the
 * operator and the service manager too, and they must be able to stop the monitor: there only
 * its BPF objects are guarded. */
static __always_inline int decide_task_kill(struct task_struct *p, int sig, int ret)
{
	struct assay_config *cfg;

	if (ret || !sig || !(cfg = protecting()) || cfg->scope_all || !is_monitor(cfg, p))
		return ret;
	return refuse_tamper(ASSAY_TAMPER_SIGNAL, BPF_CORE_READ(p, tgid), sig);
}

/* ptrace_access_check: attaching, and what needs attach rights (/proc/PID/mem, process_vm_readv
 * and _writev, pidfd_getfd); reading /proc/PID/stat and the like stays allowed. Not with --all
 * (see task_kill). */
static __always_inline int decide_ptrace(struct task_struct *child, unsigned int mode, int ret)
{
	struct assay_config *cfg;

	if (ret || !(mode & PTRACE_MODE_ATTACH) || !(cfg = protecting()) || cfg->scope_all || !is_monitor(cfg, child))
		return ret;
	return refuse_tamper(ASSAY_TAMPER_PTRACE, BPF_CORE_READ(child, tgid), mode);
}

#endif /* __ASSAY_PROTECT_BPF_H */
