// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Program execution: the bprm_check decision over the exec inode maps (file.bpf.h's walks). */
#ifndef __ASSAY_EXEC_BPF_H
#define __ASSAY_EXEC_BPF_H

/* Runs once per binary handler stage: first with the file execve named (a #! script is judged
 * by its own inode), then again with its interpreter. For lsm/bprm_check_security and
 * fmod_ret/security_bprm_check alike. */
static __always_inline int decide_bprm_check(struct linux_binprm *bprm, int ret)
{
	struct assay_config *cfg = get_config();

	if (ret || !cfg || !cfg->enforce || !cfg->exec_rules)
		return ret;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	struct file *file = BPF_CORE_READ(bprm, file);
	return CHECK_INODE(cfg->exec_rules, exec, file, ASSAY_EV_EXEC_BLOCKED);
}

#endif /* __ASSAY_EXEC_BPF_H */
