// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* Assay kernel side: one object with the tracepoints that stream events and every enforcing
 * decision, each attached in two forms (BPF LSM hook, or fmod_ret on its security_* function). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "assay.h"
#include "common.bpf.h"
#include "events.bpf.h"
#include "scope.bpf.h"
#include "protect.bpf.h"
#include "file.bpf.h"
#include "exec.bpf.h"
#include "net.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * Enforcement attachments. Each decision is written once (decide_* in the headers above) and
 * attached twice; userspace loads exactly one set (assay/enforcers/):
 *  - lsm/<hook>: a BPF LSM hook, where `bpf` is in the active LSM list;
 *  - fmod_ret/security_<fn>: BPF_MODIFY_RETURN on the function that calls every LSM's hook,
 *    allowed on security_* functions since 5.7 and needing only BTF and BPF trampolines. A
 *    non-zero return skips the function, so the syscall fails with it before any LSM runs.
 * In both forms the last argument is the verdict of what ran before (another LSM, another
 * fmod_ret program); the decisions let a denial stand.
 */
#define ENFORCE_LSM(hook) SEC("lsm/" #hook)
#define ENFORCE_FMOD(fn) SEC("fmod_ret/security_" #fn)

ENFORCE_LSM(file_open)
int BPF_PROG(lsm_file_open, struct file *file, int ret)
{
	return decide_file_open(file, ret);
}

ENFORCE_FMOD(file_open)
int BPF_PROG(fmod_file_open, struct file *file, int ret)
{
	return decide_file_open(file, ret);
}

ENFORCE_LSM(bprm_check_security)
int BPF_PROG(lsm_bprm_check, struct linux_binprm *bprm, int ret)
{
	return decide_bprm_check(bprm, ret);
}

ENFORCE_FMOD(bprm_check)
int BPF_PROG(fmod_bprm_check, struct linux_binprm *bprm, int ret)
{
	return decide_bprm_check(bprm, ret);
}

ENFORCE_LSM(mmap_file)
int BPF_PROG(lsm_mmap_file, struct file *file, unsigned long reqprot, unsigned long prot, unsigned long flags,
	     int ret)
{
	return decide_map_exec(file, prot, ret);
}

ENFORCE_FMOD(mmap_file)
int BPF_PROG(fmod_mmap_file, struct file *file, unsigned long prot, unsigned long flags, int ret)
{
	return decide_map_exec(file, prot, ret);
}

ENFORCE_LSM(file_mprotect)
int BPF_PROG(lsm_file_mprotect, struct vm_area_struct *vma, unsigned long reqprot, unsigned long prot, int ret)
{
	return decide_map_exec(BPF_CORE_READ(vma, vm_file), prot, ret);
}

ENFORCE_FMOD(file_mprotect)
int BPF_PROG(fmod_file_mprotect, struct vm_area_struct *vma, unsigned long reqprot, unsigned long prot, int ret)
{
	return decide_map_exec(BPF_CORE_READ(vma, vm_file), prot, ret);
}

ENFORCE_LSM(inode_rename)
int BPF_PROG(lsm_inode_rename, struct inode *old_dir, struct dentry *old_dentry, struct inode *new_dir,
	     struct dentry *new_dentry, int ret)
{
	return decide_rename(old_dentry, new_dentry, 0, ret);
}

ENFORCE_FMOD(inode_rename)
int BPF_PROG(fmod_inode_rename, struct inode *old_dir, struct dentry *old_dentry, struct inode *new_dir,
	     struct dentry *new_dentry, unsigned int flags, int ret)
{
	return decide_rename(old_dentry, new_dentry, flags, ret);
}

ENFORCE_LSM(inode_link)
int BPF_PROG(lsm_inode_link, struct dentry *old_dentry, struct inode *dir, struct dentry *new_dentry, int ret)
{
	return decide_link(old_dentry, new_dentry, ret);
}

ENFORCE_FMOD(inode_link)
int BPF_PROG(fmod_inode_link, struct dentry *old_dentry, struct inode *dir, struct dentry *new_dentry, int ret)
{
	return decide_link(old_dentry, new_dentry, ret);
}

ENFORCE_LSM(task_alloc)
int BPF_PROG(lsm_task_alloc, struct task_struct *task, unsigned long clone_flags, int ret)
{
	return decide_task_alloc(ret);
}

ENFORCE_FMOD(task_alloc)
int BPF_PROG(fmod_task_alloc, struct task_struct *task, unsigned long clone_flags, int ret)
{
	return decide_task_alloc(ret);
}

ENFORCE_LSM(socket_connect)
int BPF_PROG(lsm_socket_connect, struct socket *sock, struct sockaddr *address, int addrlen, int ret)
{
	return decide_socket_connect(sock, address, ret);
}

ENFORCE_FMOD(socket_connect)
int BPF_PROG(fmod_socket_connect, struct socket *sock, struct sockaddr *address, int addrlen, int ret)
{
	return decide_socket_connect(sock, address, ret);
}

ENFORCE_LSM(socket_sendmsg)
int BPF_PROG(lsm_socket_sendmsg, struct socket *sock, struct msghdr *msg, int size, int ret)
{
	return decide_socket_sendmsg(sock, msg, ret);
}

ENFORCE_FMOD(socket_sendmsg)
int BPF_PROG(fmod_socket_sendmsg, struct socket *sock, struct msghdr *msg, int size, int ret)
{
	return decide_socket_sendmsg(sock, msg, ret);
}

ENFORCE_LSM(sctp_bind_connect)
int BPF_PROG(lsm_sctp_bind_connect, struct sock *sk, int optname, struct sockaddr *address, int addrlen, int ret)
{
	return decide_sctp_connect(sk, optname, address, addrlen, ret);
}

ENFORCE_FMOD(sctp_bind_connect)
int BPF_PROG(fmod_sctp_bind_connect, struct sock *sk, int optname, struct sockaddr *address, int addrlen, int ret)
{
	return decide_sctp_connect(sk, optname, address, addrlen, ret);
}

ENFORCE_LSM(socket_setsockopt)
int BPF_PROG(lsm_socket_setsockopt, struct socket *sock, int level, int optname, int ret)
{
	return decide_socket_setsockopt(sock, level, optname, ret);
}

ENFORCE_FMOD(socket_setsockopt)
int BPF_PROG(fmod_socket_setsockopt, struct socket *sock, int level, int optname, int ret)
{
	return decide_socket_setsockopt(sock, level, optname, ret);
}

/*
 * The host backend's connect decisions: cgroup sock_addr programs, attached at the cgroup v2
 * root, where BPF trampolines (lsm, fmod_ret) are unavailable. They judge with the same tries
 * and scope as socket_connect and socket_sendmsg; 1 lets the call go on, 0 fails it (EPERM).
 */
SEC("cgroup/connect4")
int host_connect4(struct bpf_sock_addr *ctx)
{
	return decide_sock_addr(ctx, AF_INET, ASSAY_NET_OP_CONNECT);
}

SEC("cgroup/connect6")
int host_connect6(struct bpf_sock_addr *ctx)
{
	return decide_sock_addr(ctx, AF_INET6, ASSAY_NET_OP_CONNECT);
}

SEC("cgroup/sendmsg4")
int host_sendmsg4(struct bpf_sock_addr *ctx)
{
	return decide_sock_addr(ctx, AF_INET, ASSAY_NET_OP_SENDMSG);
}

SEC("cgroup/sendmsg6")
int host_sendmsg6(struct bpf_sock_addr *ctx)
{
	return decide_sock_addr(ctx, AF_INET6, ASSAY_NET_OP_SENDMSG);
}

SEC("cgroup/setsockopt")
int host_setsockopt(struct bpf_sockopt *ctx)
{
	return decide_cgroup_setsockopt(ctx);
}

ENFORCE_LSM(kernel_read_file)
int BPF_PROG(lsm_kernel_read_file, struct file *file, enum kernel_read_file_id id, bool contents, int ret)
{
	return decide_kernel_read(id, false, ret);
}

ENFORCE_FMOD(kernel_read_file)
int BPF_PROG(fmod_kernel_read_file, struct file *file, enum kernel_read_file_id id, bool contents, int ret)
{
	return decide_kernel_read(id, false, ret);
}

ENFORCE_LSM(kernel_load_data)
int BPF_PROG(lsm_kernel_load_data, enum kernel_load_data_id id, bool contents, int ret)
{
	return decide_kernel_read(id, true, ret);
}

ENFORCE_FMOD(kernel_load_data)
int BPF_PROG(fmod_kernel_load_data, enum kernel_load_data_id id, bool contents, int ret)
{
	return decide_kernel_read(id, true, ret);
}

ENFORCE_LSM(sb_mount)
int BPF_PROG(lsm_sb_mount, const char *dev_name, const struct path *path, const char *type, unsigned long flags,
	     void *data, int ret)
{
	return decide_mount(1, ret);
}

ENFORCE_FMOD(sb_mount)
int BPF_PROG(fmod_sb_mount, const char *dev_name, const struct path *path, const char *type, unsigned long flags,
	     void *data, int ret)
{
	return decide_mount(1, ret);
}

ENFORCE_LSM(move_mount)
int BPF_PROG(lsm_move_mount, const struct path *from_path, const struct path *to_path, int ret)
{
	return decide_mount(2, ret);
}

ENFORCE_FMOD(move_mount)
int BPF_PROG(fmod_move_mount, const struct path *from_path, const struct path *to_path, int ret)
{
	return decide_mount(2, ret);
}

ENFORCE_LSM(sb_pivotroot)
int BPF_PROG(lsm_sb_pivotroot, const struct path *old_path, const struct path *new_path, int ret)
{
	return decide_mount(3, ret);
}

ENFORCE_FMOD(sb_pivotroot)
int BPF_PROG(fmod_sb_pivotroot, const struct path *old_path, const struct path *new_path, int ret)
{
	return decide_mount(3, ret);
}

ENFORCE_LSM(fs_context_parse_param)
int BPF_PROG(lsm_fs_context_parse_param, struct fs_context *fc, struct fs_parameter *param, int ret)
{
	return decide_mount(4, ret);
}

ENFORCE_FMOD(fs_context_parse_param)
int BPF_PROG(fmod_fs_context_parse_param, struct fs_context *fc, struct fs_parameter *param, int ret)
{
	return decide_mount(4, ret);
}

ENFORCE_LSM(bpf)
int BPF_PROG(lsm_bpf, int cmd, union bpf_attr *attr, unsigned int size)
{
	return decide_bpf_cmd(cmd, attr);
}

ENFORCE_FMOD(bpf)
int BPF_PROG(fmod_bpf, int cmd, union bpf_attr *attr, unsigned int size)
{
	return decide_bpf_cmd(cmd, attr);
}

ENFORCE_LSM(bpf_map)
int BPF_PROG(lsm_bpf_map, struct bpf_map *map, fmode_t fmode, int ret)
{
	return decide_bpf_map(map, ret);
}

ENFORCE_FMOD(bpf_map)
int BPF_PROG(fmod_bpf_map, struct bpf_map *map, fmode_t fmode, int ret)
{
	return decide_bpf_map(map, ret);
}

ENFORCE_LSM(bpf_prog)
int BPF_PROG(lsm_bpf_prog, struct bpf_prog *prog, int ret)
{
	return decide_bpf_prog(prog, ret);
}

ENFORCE_FMOD(bpf_prog)
int BPF_PROG(fmod_bpf_prog, struct bpf_prog *prog, int ret)
{
	return decide_bpf_prog(prog, ret);
}

ENFORCE_LSM(task_kill)
int BPF_PROG(lsm_task_kill, struct task_struct *p, struct kernel_siginfo *info, int sig, const struct cred *cred,
	     int ret)
{
	return decide_task_kill(p, sig, ret);
}

ENFORCE_FMOD(task_kill)
int BPF_PROG(fmod_task_kill, struct task_struct *p, struct kernel_siginfo *info, int sig, const struct cred *cred,
	     int ret)
{
	return decide_task_kill(p, sig, ret);
}

ENFORCE_LSM(ptrace_access_check)
int BPF_PROG(lsm_ptrace_access_check, struct task_struct *child, unsigned int mode, int ret)
{
	return decide_ptrace(child, mode, ret);
}

ENFORCE_FMOD(ptrace_access_check)
int BPF_PROG(fmod_ptrace_access_check, struct task_struct *child, unsigned int mode, int ret)
{
	return decide_ptrace(child, mode, ret);
}
