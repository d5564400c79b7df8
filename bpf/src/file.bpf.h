// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* File opens: open events, inode-identity rule maps, ancestor walks, the file_open decision. */
#ifndef __ASSAY_FILE_BPF_H
#define __ASSAY_FILE_BPF_H

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

/* Exact denies by place (struct assay_name_key), behind a gate of the parent directories that hold
 * one (value: 1 file, 2 exec), so an open elsewhere costs one small lookup. */
#define NAME_MAP(name)                                       \
	struct {                                             \
		__uint(type, BPF_MAP_TYPE_HASH);             \
		__uint(max_entries, 262144);                 \
		__uint(map_flags, BPF_F_NO_PREALLOC);        \
		__type(key, struct assay_name_key);          \
		__type(value, struct assay_rule_ref);        \
	} name SEC(".maps")

NAME_MAP(file_deny_names);
NAME_MAP(exec_deny_names);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct assay_inode_key);   /* gen 0 */
	__type(value, __u32);
} name_dirs SEC(".maps");


/* ---------------------------------------------------------------- file and exec enforcement */

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
#define MATCH_ACTION(m) ((__u32)(m) & 0xff)
/* An entry that judges execve but not mappings (the root catch-all of an allow-list, see exec.bpf.h). */
#define MATCH_NOT_MAPS(m) ((m) & ASSAY_ACT_FLAG_NOT_MAPS)

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

/* Filesystems (both dev encodings) that hold a subtree deny rule: there, a walk that cannot
 * prove a file lies outside every subtree denies. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} subtree_devs SEC(".maps");

/* No rule matched, but the walk could not finish (too deep, or a disconnected dentry such as
 * open_by_handle_at returns on a cold cache): rule id 0, deny, and farther than any real entry,
 * so only an exception actually found on the way lifts it. */
#define UNPROVABLE ((0xfff0ULL << 16) | ASSAY_ACT_DENY)

static __always_inline __u64 unprovable(struct dentry *d, __u32 counter)
{
	__u32 dev = BPF_CORE_READ(d, d_sb, s_dev);
	__u32 dev_new = new_encode_dev(dev);

	if (!bpf_map_lookup_elem(&subtree_devs, &dev) && !bpf_map_lookup_elem(&subtree_devs, &dev_new))
		return 0;
	count(counter);
	return UNPROVABLE;
}

/* The process's root directory, for files outside its mount tree. */
static __always_inline __u64 lookup_task_root(void *map, __u32 depth)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	return lookup_inode(map, BPF_CORE_READ(task, fs, root.dentry, d_inode), depth);
}

/*
 * Walks the ancestors of a dentry: first inside its filesystem through d_parent (so a bind mount
 * of a subdirectory still reaches the protected directory), then across mount points. With no
 * mount (rename and link: both ends are in one mount) it stops at the filesystem's root.
 * A file outside the process's mount tree (a memfd, a pipe: pseudo files whose dentry is its own
 * parent, or any internal mount) counts as below the process's root directory, so a subtree
 * rule on "/" covers it. fail_closed: deny maps only.
 */
static __always_inline __u64 lookup_ancestors(void *map, struct dentry *d, struct vfsmount *vmnt, bool fail_closed)
{
	struct mount *mnt = vmnt ? real_mount(vmnt) : NULL;
	__u64 r;

	for (int i = 0; i < ASSAY_WALK_DEPTH; i++) {
		struct dentry *parent = BPF_CORE_READ(d, d_parent);
		if (parent == d) {
			if (d != BPF_CORE_READ(d, d_sb, s_root)) {
				/* disconnected (open_by_handle_at) or a pseudo file */
				if (fail_closed && (r = unprovable(d, ASSAY_CNT_DISCONNECTED)))
					return r;
				return lookup_task_root(map, i + 1);
			}
			if (!mnt)
				return 0;
			struct mount *up = BPF_CORE_READ(mnt, mnt_parent);
			if (up == mnt) {
				struct task_struct *task = (struct task_struct *)bpf_get_current_task();
				if (&mnt->mnt == BPF_CORE_READ(task, fs, root.mnt))
					return 0;
				return lookup_task_root(map, i + 1);
			}
			d = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = up;
			continue;
		}
		d = parent;
		if ((r = lookup_inode(map, BPF_CORE_READ(d, d_inode), i + 1)))
			return r;
	}
	return fail_closed ? unprovable(d, ASSAY_CNT_WALK_TRUNC) : 0;
}

static __always_inline __u64 name_hash(const unsigned char *name, __u32 len)
{
	__u64 h = ASSAY_FNV_OFFSET;

	for (int i = 0; i < ASSAY_NAME_MAX / 8; i++) {
		__u32 at = i * 8;
		if (at >= len)
			break;
		__u32 n = len - at;
		__u64 sz = n >= 8 ? 8 : n;
		/* never read past the name (its end may be the end of an allocation); the mask keeps
		 * the bound where the verifier sees it, and chunk has room for that bound */
		asm volatile("%[sz] &= 15" : [sz] "+r"(sz));
		__u64 chunk[2] = {};
		bpf_probe_read_kernel(chunk, sz, name + at);
		h ^= chunk[0];
		h *= ASSAY_FNV_PRIME;
	}
	return h;
}

/* The exact deny naming this dentry's place, if any: a file put at a protected path after the
 * start is a new inode, but the same parent and name. */
static __always_inline __u64 lookup_name(void *map, struct dentry *d, __u32 kind)
{
	struct dentry *parent = BPF_CORE_READ(d, d_parent);
	struct assay_inode_key g = {};
	struct assay_name_key k = {};
	struct assay_rule_ref *r;
	__u32 *kinds;

	if (parent == d)
		return 0;
	g.ino = BPF_CORE_READ(parent, d_inode, i_ino);
	g.dev = new_encode_dev(BPF_CORE_READ(parent, d_sb, s_dev));
	kinds = bpf_map_lookup_elem(&name_dirs, &g);
	if (!kinds || !(*kinds & kind))
		return 0;
	__u32 len = BPF_CORE_READ(d, d_name.len);
	if (!len || len >= ASSAY_NAME_MAX)
		return 0;
	k.parent_ino = g.ino;
	k.parent_dev = g.dev;
	k.name_len = len;
	k.name_hash = name_hash(BPF_CORE_READ(d, d_name.name), len);
	if ((r = bpf_map_lookup_elem(map, &k)))
		return PACK(r, 0);
	return 0;
}

__noinline __u64 assay_names_file_deny(__u64 dentry)
{
	return lookup_name(&file_deny_names, (struct dentry *)dentry, 1);
}

__noinline __u64 assay_names_exec_deny(__u64 dentry)
{
	return lookup_name(&exec_deny_names, (struct dentry *)dentry, 2);
}

/* Global functions (see above): the deny maps' walks fail closed, the exception maps' do not. */
#define INODE_LOOKUPS(map, fail_closed)                                                     \
	__noinline __u64 assay_lookup_##map(__u64 inode)                                    \
	{                                                                                   \
		return lookup_inode(&map, (struct inode *)inode, 0);                        \
	}                                                                                   \
	__noinline __u64 assay_ancestors_##map(__u64 dentry, __u64 vfsmount)               \
	{                                                                                   \
		return lookup_ancestors(&map, (struct dentry *)dentry, (struct vfsmount *)vfsmount, \
					fail_closed);                                       \
	}

INODE_LOOKUPS(file_deny, true)
INODE_LOOKUPS(file_allow, false)
INODE_LOOKUPS(file_deny_dirs, true)
INODE_LOOKUPS(file_allow_dirs, false)
INODE_LOOKUPS(exec_deny, true)
INODE_LOOKUPS(exec_allow, false)
INODE_LOOKUPS(exec_deny_dirs, true)
INODE_LOOKUPS(exec_allow_dirs, false)

/* Writes the path, as d_path would show it, right-aligned into the decisions' scratch slot; returns
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
			if (!vfsmount)
				break; /* a rename or link: the path within its filesystem */
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

/* The inode-identity decision shared by file and exec rules. */
#define CHECK_INODE(cfg_rules, prefix, file, type, skip)                                                \
	({                                                                                          \
		struct inode *inode_ = BPF_CORE_READ(file, f_inode);                                \
		struct dentry *d_ = BPF_CORE_READ(file, f_path.dentry);                             \
		struct vfsmount *mnt_ = BPF_CORE_READ(file, f_path.mnt);                            \
		__u32 rules_ = (cfg_rules);                                                         \
		__u64 rule_ = 0;                                                                    \
		int verdict_ = 0;                                                                   \
		if (rules_ & ASSAY_RULES_DENY)                                                      \
			rule_ = assay_lookup_##prefix##_deny((__u64)inode_);                        \
		if (!rule_ && (rules_ & ASSAY_RULES_DENY_NAMES))                                    \
			rule_ = assay_names_##prefix##_deny((__u64)d_);                             \
		if (!rule_ && (rules_ & ASSAY_RULES_DENY_DIRS))                                     \
			rule_ = assay_ancestors_##prefix##_deny_dirs((__u64)d_, (__u64)mnt_);        \
		if (rule_ & (skip))                                                                  \
			rule_ = 0;                                                                  \
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
			verdict_ = act(MATCH_ACTION(rule_), rule_ >> 32);                          \
		}                                                                                   \
		verdict_;                                                                           \
	})

/* The file_open decision, for lsm/file_open and fmod_ret/security_file_open alike. ret is what
 * ran before (an earlier LSM, or an earlier fmod_ret program): a denial stands. */
static __always_inline int decide_file_open(struct file *file, int ret)
{
	struct assay_config *cfg;
	int v;

	if (ret)
		return ret;
	/* self-protection first: it holds whatever the rules say */
	if (protecting() && (v = guard_open(file)))
		return v;
	if (!(cfg = ENFORCING(c_->file_rules)))
		return 0;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	/* The kernel's own opens for execve (the binary, its ELF interpreter) are proc_exec's
	 * business: file rules govern what a process opens, not what it runs. */
	if ((BPF_CORE_READ(file, f_flags) & __FMODE_EXEC) || (BPF_CORE_READ(file, f_mode) & FMODE_EXEC))
		return 0;
	return CHECK_INODE(cfg->file_rules, file, file, ASSAY_EV_FILE_BLOCKED, 0);
}

/* ---------------------------------------------------------------- moves out of a subtree */

/* The subtree rule (a packed match, 0 for none) that governs a dentry's place, walked inside its
 * filesystem only: rename and link never leave one mount, so what lies above it is the same for
 * both ends of a move. */
#define SUBTREE_RULE(rules, prefix, dentry)                                                        \
	({                                                                                         \
		__u64 r_ = 0;                                                                      \
		if ((rules) & ASSAY_RULES_DENY_DIRS)                                               \
			r_ = assay_ancestors_##prefix##_deny_dirs((__u64)(dentry), 0);              \
		if (r_ && ((rules) & ASSAY_RULES_ALLOW_DIRS)) {                                     \
			__u64 a_ = assay_ancestors_##prefix##_allow_dirs((__u64)(dentry), 0);       \
			if (a_ && MATCH_DEPTH(a_) < MATCH_DEPTH(r_))                                \
				r_ = 0;                                                            \
		}                                                                                  \
		r_;                                                                                \
	})

/* A protected inode may move (rename) or gain a name (link) only inside its own rule's subtree:
 * anywhere else, or into an exception, its rule would no longer see it. */
#define GUARD_MOVE(rules, prefix, src, dst, type)                                                  \
	({                                                                                         \
		int v_ = 0;                                                                        \
		struct inode *inode_ = BPF_CORE_READ(src, d_inode);                               \
		__u64 r_ = SUBTREE_RULE(rules, prefix, src);                                       \
		if (r_ && ((rules) & ASSAY_RULES_ALLOW) && assay_lookup_##prefix##_allow((__u64)inode_)) \
			r_ = 0; /* excepted where it is: not protected, free to go */              \
		if (r_ && (SUBTREE_RULE(rules, prefix, dst) >> 32) != (r_ >> 32)) {              \
			emit_block(type, r_, inode_, src, 0);                                       \
			v_ = act(MATCH_ACTION(r_), r_ >> 32);                                      \
		}                                                                                  \
		v_;                                                                                \
	})

/* The global walks take plain numbers: a pointer the hook received typed (BTF) is passed as one
 * only after a copy through a probe read, which the verifier knows as a scalar. */
static __always_inline struct dentry *untyped(struct dentry *p)
{
	__u64 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), &p);
	return (struct dentry *)v;
}

static __always_inline int guard_move(struct assay_config *cfg, struct dentry *src_typed, struct dentry *dst_typed)
{
	struct dentry *src = untyped(src_typed), *dst = untyped(dst_typed);
	int v = 0;

	if (cfg->file_rules & ASSAY_RULES_DENY_DIRS)
		v = GUARD_MOVE(cfg->file_rules, file, src, dst, ASSAY_EV_FILE_BLOCKED);
	if (!v && (cfg->exec_rules & ASSAY_RULES_DENY_DIRS))
		v = GUARD_MOVE(cfg->exec_rules, exec, src, dst, ASSAY_EV_EXEC_BLOCKED);
	return v;
}

#define RENAME_EXCHANGE 2

/* inode_rename (lsm/inode_rename, fmod_ret/security_inode_rename). The LSM hook runs once per
 * direction of a RENAME_EXCHANGE; security_inode_rename once, with the flag. */
static __always_inline int decide_rename(struct dentry *old, struct dentry *new, __u32 flags, int ret)
{
	struct assay_config *cfg;
	int v;

	if (ret || !(cfg = ENFORCING((c_->file_rules | c_->exec_rules) & ASSAY_RULES_DENY_DIRS)))
		return ret;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	v = guard_move(cfg, old, new);
	if (!v && (flags & RENAME_EXCHANGE))
		v = guard_move(cfg, new, old);
	return v;
}

/* inode_link (lsm/inode_link, fmod_ret/security_inode_link): a hard link is a second place. */
static __always_inline int decide_link(struct dentry *old, struct dentry *new, int ret)
{
	struct assay_config *cfg;

	if (ret || !(cfg = ENFORCING((c_->file_rules | c_->exec_rules) & ASSAY_RULES_DENY_DIRS)))
		return ret;
	if (!in_scope(cfg, bpf_get_current_pid_tgid() >> 32))
		return 0;
	return guard_move(cfg, old, new);
}

#endif /* __ASSAY_FILE_BPF_H */
