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

#define BPF_LINK_GET_FD_BY_ID_CMD 30

/* bpf(2) itself (lsm/bpf, fmod_ret/security_bpf): links have no hook of their own, and an fd of
 * one detaches it. The hook's arguments differ across kernels (newer kernels add a fourth, `kernel`), so
 * the verdict of an earlier program is not read: where one refused, the kernel never runs this one. */
static __always_inline int decide_bpf_cmd(int cmd, union bpf_attr *attr)
{
	__u32 id = 0;
	__u64 key;

	if (cmd != BPF_LINK_GET_FD_BY_ID_CMD || !protecting())
		return 0;
	bpf_probe_read_kernel(&id, sizeof(id), attr);   /* link_id: the first member */
	key = ASSAY_OWN_KEY(ASSAY_TAMPER_BPF_LINK, id);
	if (!bpf_map_lookup_elem(&own_objects, &key))
		return 0;
	return refuse_tamper(ASSAY_TAMPER_BPF_LINK, id, 0);
}

/* ---------------------------------------------------------------- devices, knobs, modules, mounts */

/* Block devices (kernel dev_t, MAJOR << 20 | MINOR) holding a filesystem with file or exec rules,
 * with the disks and devices below them: their raw blocks hold the protected files. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} protected_bdevs SEC(".maps");

#define S_IFMT 00170000
#define S_IFBLK 0060000
#define S_IFCHR 0020000
#define FMODE_WRITE 0x2
#define PROC_SUPER_MAGIC 0x9fa0
#define SYSFS_MAGIC 0x62656572
#define BINFMTFS_MAGIC 0x42494e4d
#define MEM_MAJOR 1

/* Is this dentry's name exactly `want` (at most 15 bytes, NUL-terminated)? */
static __always_inline bool name_is(struct dentry *d, const char *want, __u32 len)
{
	char buf[16] = {};

	if (BPF_CORE_READ(d, d_name.len) != len)
		return false;
	bpf_probe_read_kernel(buf, len & 15, BPF_CORE_READ(d, d_name.name));
	for (int i = 0; i < 15; i++) {
		if (i >= len)
			break;
		if (buf[i] != want[i])
			return false;
	}
	return true;
}

#define NAME_IS(d, lit) name_is(d, lit, sizeof(lit) - 1)

/* The knob a write to this file would set, 0 for none: matched by name on its own superblock
 * type, since procfs and sysfs inodes are made afresh and have no stable identity. */
static __always_inline __u32 knob_of(struct dentry *d, unsigned long magic)
{
	struct dentry *parent = BPF_CORE_READ(d, d_parent);

	if (magic == BINFMTFS_MAGIC)
		return NAME_IS(d, "register") ? ASSAY_KNOB_BINFMT : 0;
	if (!NAME_IS(parent, "kernel"))
		return 0;
	if (magic == PROC_SUPER_MAGIC) {
		if (NAME_IS(d, "core_pattern"))
			return ASSAY_KNOB_CORE_PATTERN;
		if (NAME_IS(d, "modprobe"))
			return ASSAY_KNOB_MODPROBE;
		if (NAME_IS(d, "hotplug"))
			return ASSAY_KNOB_HOTPLUG;
	} else if (magic == SYSFS_MAGIC && NAME_IS(d, "uevent_helper")) {
		return ASSAY_KNOB_UEVENT_HELPER;
	}
	return 0;
}

/* Opens self-protection refuses the scope (file_open): a block device under the rules, kernel
 * memory, and writes to the knobs of knob_of(). Cheap for every other open: one mode test, and a
 * superblock magic test for writes. */
static __always_inline int guard_open(struct file *file)
{
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	__u32 mode = BPF_CORE_READ(inode, i_mode) & S_IFMT;
	struct dentry *d;
	unsigned long magic;

	if (mode == S_IFBLK) {
		__u32 rdev = BPF_CORE_READ(inode, i_rdev);
		if (bpf_map_lookup_elem(&protected_bdevs, &rdev))
			return refuse_tamper(ASSAY_TAMPER_BLOCK_DEVICE, new_encode_dev(rdev), 0);
		return 0;
	}
	if (mode == S_IFCHR) {
		__u32 rdev = BPF_CORE_READ(inode, i_rdev);
		__u32 minor = rdev & ((1U << 20) - 1);
		if (rdev >> 20 == MEM_MAJOR && (minor == 1 || minor == 2 || minor == 4))
			return refuse_tamper(ASSAY_TAMPER_KERNEL_MEMORY, new_encode_dev(rdev), 0);
		return 0;
	}
	magic = BPF_CORE_READ(inode, i_sb, s_magic);
	if (magic != PROC_SUPER_MAGIC && magic != SYSFS_MAGIC && magic != BINFMTFS_MAGIC)
		return 0;
	d = BPF_CORE_READ(file, f_path.dentry);
	if (magic == PROC_SUPER_MAGIC && NAME_IS(d, "kcore"))
		return refuse_tamper(ASSAY_TAMPER_KERNEL_MEMORY, 0, 0);
	if (!(BPF_CORE_READ(file, f_mode) & FMODE_WRITE))
		return 0;
	__u32 knob = knob_of(d, magic);
	return knob ? refuse_tamper(ASSAY_TAMPER_KNOB, knob, 0) : 0;
}

/* kernel_read_file (finit_module, kexec_file_load) and kernel_load_data (init_module,
 * kexec_load): no module and no new kernel from the scope. Firmware and policy reads pass. */
static __always_inline int decide_kernel_read(int id, bool loading, int ret)
{
	int module = loading ? bpf_core_enum_value(enum kernel_load_data_id, LOADING_MODULE)
			     : bpf_core_enum_value(enum kernel_read_file_id, READING_MODULE);
	int kexec = loading ? bpf_core_enum_value(enum kernel_load_data_id, LOADING_KEXEC_IMAGE)
			    : bpf_core_enum_value(enum kernel_read_file_id, READING_KEXEC_IMAGE);
	int initrd = loading ? bpf_core_enum_value(enum kernel_load_data_id, LOADING_KEXEC_INITRAMFS)
			     : bpf_core_enum_value(enum kernel_read_file_id, READING_KEXEC_INITRAMFS);

	if (ret || !protecting())
		return ret;
	if (id == module)
		return refuse_tamper(ASSAY_TAMPER_MODULE, 1, id);
	if (id == kexec || id == initrd)
		return refuse_tamper(ASSAY_TAMPER_MODULE, 2, id);
	return 0;
}

/* sb_mount, move_mount, sb_pivotroot and fs_context_parse_param (fsconfig): while subtree rules
 * exist, a mount could put a protected tree where its walk never meets it (an overlay), so the
 * scope may not mount. `what` tells them apart in the event. */
static __always_inline int decide_mount(__u32 what, int ret)
{
	struct assay_config *cfg;

	if (ret || !(cfg = protecting()) || !cfg->protect_mounts)
		return ret;
	return refuse_tamper(ASSAY_TAMPER_MOUNT, what, 0);
}

#endif /* __ASSAY_PROTECT_BPF_H */
