// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Program execution: the bprm_check decision over the exec inode maps (file.bpf.h's walks). */
#ifndef __ASSAY_EXEC_BPF_H
#define __ASSAY_EXEC_BPF_H

/* Runs once per binary handler stage: first with the file execve named (a #! script is judged
 * by its own inode), then again with its interpreter. For lsm/bprm_check_security and
 * fmod_ret/security_bprm_check alike. */
static __always_inline int decide_bprm_check(struct linux_binprm *bprm, int ret)
{
	struct assay_config *cfg;

	if (ret || !(cfg = ENFORCING(c_->exec_rules)))
		return ret;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	struct file *file = BPF_CORE_READ(bprm, file);
	return CHECK_INODE(cfg->exec_rules, exec, file, ASSAY_EV_EXEC_BLOCKED, 0);
}

#define PROT_READ 0x1
#define PROT_EXEC 0x4
#define READ_IMPLIES_EXEC 0x0400000

/* Mapping a file executable is running it: the dynamic loader (`ld.so /denied`) and userspace
 * loaders never pass execve. For mmap_file and file_mprotect, in both forms. The LSM hook gets
 * the effective protection; security_mmap_file the requested one, so a READ_IMPLIES_EXEC
 * personality counts here as the kernel will count it. */
static __always_inline int decide_map_exec(struct file *file, unsigned long prot, int ret)
{
	struct assay_config *cfg;

	if (ret || !file || !(cfg = ENFORCING(c_->exec_rules)))
		return ret;
	if (!(prot & PROT_EXEC)) {
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		if (!(prot & PROT_READ) || !(BPF_CORE_READ(task, personality) & READ_IMPLIES_EXEC))
			return 0;
	}
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	/* An allow-list (deny / and its subtree, except the programs learned) names programs, not the
	 * shared libraries they load: its catch-all judges execve only. */
	return CHECK_INODE(cfg->exec_rules, exec, file, ASSAY_EV_EXEC_BLOCKED, ASSAY_ACT_FLAG_NOT_MAPS);
}

#endif /* __ASSAY_EXEC_BPF_H */
