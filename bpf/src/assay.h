/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* The kernel/userspace ABI of Assay: the single source of truth, mirrored once in assay/abi.py. */
#ifndef __ASSAY_H
#define __ASSAY_H

#define ASSAY_COMM_LEN 16
/* Powers of two: BPF code masks offsets with (N - 1) to satisfy the verifier. */
#define ASSAY_PATH_MAX 4096
#define ASSAY_ARGS_MAX 1024
#define ASSAY_NAME_MAX 256
#define ASSAY_FNV_OFFSET 0xcbf29ce484222325ULL
#define ASSAY_FNV_PRIME 0x100000001b3ULL
/* Bounded walks: dentry ancestors (across mounts) and cgroup ancestors. */
#define ASSAY_WALK_DEPTH 48
#define ASSAY_CGROUP_DEPTH 32
/* Graceful kills waiting for the monitor (kill_requests map). */
#define ASSAY_KILL_REQUESTS 4096
/* In a kill request's value (the rule id): kill at once (cgroup programs cannot send signals). */
#define ASSAY_KILL_NOW 0x80000000u

enum assay_event_type {
	ASSAY_EV_EXEC = 1,
	ASSAY_EV_EXIT = 2,
	ASSAY_EV_FORK = 3,
	ASSAY_EV_OPEN = 4,
	ASSAY_EV_CONNECT = 5,
	ASSAY_EV_FILE_BLOCKED = 6,
	ASSAY_EV_NET_BLOCKED = 7,
	ASSAY_EV_EXEC_BLOCKED = 8,
	ASSAY_EV_TAMPER_BLOCKED = 9,
};

/* What a tamper_blocked event refused (self-protection). */
enum assay_tamper {
	ASSAY_TAMPER_BPF_MAP = 1,    /* an fd of one of the monitor's maps (BPF_MAP_GET_FD_BY_ID, ...) */
	ASSAY_TAMPER_BPF_PROG = 2,   /* an fd of one of the monitor's programs */
	ASSAY_TAMPER_SIGNAL = 3,     /* a signal to the monitor or its watchdog */
	ASSAY_TAMPER_PTRACE = 4,     /* ptrace, /proc/PID/mem, process_vm_*, pidfd_getfd on them */
	ASSAY_TAMPER_BLOCK_DEVICE = 5, /* an open of a block device under a filesystem with rules (target: its dev) */
	ASSAY_TAMPER_KERNEL_MEMORY = 6, /* /dev/mem, /dev/kmem, /dev/port, /proc/kcore */
	ASSAY_TAMPER_KNOB = 7,       /* a write to a knob that makes the kernel run a program (target: enum assay_knob) */
	ASSAY_TAMPER_MODULE = 8,     /* loading a kernel module or a kexec image (target: 1 module, 2 kexec) */
	ASSAY_TAMPER_MOUNT = 9,      /* mount, move_mount, pivot_root, fsconfig while subtree rules exist */
	ASSAY_TAMPER_BPF_LINK = 10,  /* an fd of one of the monitor's links (BPF_LINK_GET_FD_BY_ID), to detach it */
};

/* The knobs of ASSAY_TAMPER_KNOB. */
enum assay_knob {
	ASSAY_KNOB_CORE_PATTERN = 1,  /* /proc/sys/kernel/core_pattern: a |pipe helper runs as root */
	ASSAY_KNOB_MODPROBE = 2,      /* /proc/sys/kernel/modprobe */
	ASSAY_KNOB_HOTPLUG = 3,       /* /proc/sys/kernel/hotplug */
	ASSAY_KNOB_UEVENT_HELPER = 4, /* /sys/kernel/uevent_helper */
	ASSAY_KNOB_BINFMT = 5,        /* binfmt_misc's register (flag O runs an interpreter on a denied file) */
};

enum assay_action {
	ASSAY_ACT_LOG = 1,
	ASSAY_ACT_ALERT = 2,
	ASSAY_ACT_DENY = 3,
	ASSAY_ACT_KILL_IMMEDIATE = 4,
	ASSAY_ACT_KILL_GRACEFUL = 5,
};

/* Or-ed into assay_rule_ref.action of an exec entry that judges execve but not executable
 * mappings: the catch-all `/` subtree of an allow-list. */
#define ASSAY_ACT_FLAG_NOT_MAPS 0x100

/* Indexes of the per-CPU counters map. */
enum assay_counter {
	ASSAY_CNT_RINGBUF_DROP = 0,  /* ring buffer full: event lost */
	ASSAY_CNT_SCOPE_FULL = 1,    /* scope_pids full: a child could not be tracked */
	ASSAY_CNT_WALK_TRUNC = 2,    /* ancestor walk hit ASSAY_WALK_DEPTH (denied where subtree rules live) */
	ASSAY_CNT_PENDING_FULL = 3,  /* syscall enter/exit pairing map full */
	ASSAY_CNT_KILL_FULL = 4,     /* kill_requests full: killed at once instead of gracefully */
	ASSAY_CNT_DISCONNECTED = 5,  /* ancestor walk met a disconnected dentry */
	ASSAY_CNT_SCOPE_FORK_DENIED = 6,  /* scope_pids (nearly) full: a fork in the scope was refused */
	ASSAY_CNT_MAX = 7,
};

enum assay_open_syscall {
	ASSAY_SYS_OPENAT = 0,
	ASSAY_SYS_OPENAT2 = 1,
	ASSAY_SYS_OPEN = 2,   /* legacy open(2): x86_64 only */
};

/* Which operation a net rule stopped: connect(2), or a datagram sent to an explicit address
 * (sendto/sendmsg on an unconnected socket, or TCP Fast Open's implicit connect). */
enum assay_net_op {
	ASSAY_NET_OP_CONNECT = 0,
	ASSAY_NET_OP_SENDMSG = 1,
	ASSAY_NET_OP_SOURCE_ROUTE = 2,   /* an IPv6 routing header or IPv4 source route: refused */
};

struct assay_config {
	__u32 scope_all;      /* every process on the host */
	__u32 scope_cgroup;   /* cgroup_id below is set: it and its descendants are in scope */
	__u64 cgroup_id;
	__u32 monitor_tgid;   /* the monitor itself is never reported or enforced */
	__u32 event_mask;     /* bit (1 << type) set: that event type is emitted */
	__u32 enforce;        /* LSM hooks act */
	__u32 file_rules;     /* ASSAY_RULES_* bits: which file maps hold entries */
	__u32 exec_rules;     /* same bits, for the exec maps */
	__u32 net_rules;      /* ASSAY_NET_* bits */
	__u32 scope_limit;    /* forks in a map-tracked scope are refused once scope_pids holds this many */
	__s32 scope_user;     /* entries userspace wrote into scope_pids (the kernel counts its own) */
	__u32 protect;        /* self-protection: the scope may not touch the monitor (tamper decisions) */
	__u32 watchdog_tgid;  /* the monitor's watchdog, protected like the monitor */
	__u32 protect_mounts; /* self-protection refuses mounts (subtree rules exist, no --allow-mounts) */
};

/* Keys of the own_objects map: which BPF objects are the monitor's. */
#define ASSAY_OWN_KEY(kind, id) (((__u64)(kind) << 32) | (id))

#define ASSAY_NET_DENY4 1
#define ASSAY_NET_DENY6 2
#define ASSAY_NET_ALLOW4 4
#define ASSAY_NET_ALLOW6 8

/* LPM trie keys: prefixlen first, as the kernel requires. */
struct assay_lpm4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct assay_lpm6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

#define ASSAY_NET_RANGES 8

struct assay_port_range {
	__u16 lo;
	__u16 hi;
	__u32 rule_id;
	enum assay_action action;
};

/* Every port range that applies to a prefix, those of its covering prefixes included
 * (userspace closes the set), so the longest-prefix match alone decides. */
struct assay_net_value {
	__u32 count;
	struct assay_port_range ranges[ASSAY_NET_RANGES];
};

#define ASSAY_RULES_DENY 1
#define ASSAY_RULES_DENY_DIRS 2
#define ASSAY_RULES_ALLOW 4
#define ASSAY_RULES_ALLOW_DIRS 8
#define ASSAY_RULES_DENY_NAMES 16   /* the *_deny_names maps hold entries */

/* Inode identity. dev is either encoding (new_encode_dev or major<<20|minor); gen 0 is the fallback. */
struct assay_inode_key {
	__u64 ino;
	__u32 dev;
	__u32 gen;
};

/* An exact deny's place: its parent directory's identity and its name, so a file put there later
 * (renamed over it, or deleted and created again) is still the rule's. The name is kept as its
 * length and a 64-bit FNV-1a over its 8-byte little-endian chunks (the last one zero-padded):
 * a small key needs no per-CPU scratch space, which a preempted decision could share. A collision
 * can only deny another name, never let the protected one through. */
struct assay_name_key {
	__u64 parent_ino;
	__u32 parent_dev;     /* new_encode_dev form */
	__u32 name_len;
	__u64 name_hash;
};

struct assay_rule_ref {
	__u32 rule_id;
	enum assay_action action;
};

struct assay_event_header {
	__u64 ts_ns;
	__u64 cgroup_id;
	enum assay_event_type type;
	__u32 pid;   /* tgid */
	__u32 tid;
	__u32 ppid;
	__u32 uid;
	__u32 gid;
	char comm[ASSAY_COMM_LEN];
};

struct assay_exec_event {
	struct assay_event_header hdr;
	__u32 filename_len;
	__u32 args_len;   /* NUL-separated argv bytes, possibly truncated */
	char filename[ASSAY_PATH_MAX];
	char args[ASSAY_ARGS_MAX];
};

struct assay_exit_event {
	struct assay_event_header hdr;
	__s32 exit_code;
	__s32 signal;
};

struct assay_fork_event {
	struct assay_event_header hdr;
	__u32 child_pid;
	__u32 _pad;
};

/* Emitted with a variable length: the record ends after path_len bytes of path. */
struct assay_open_event {
	struct assay_event_header hdr;
	__s64 ret;
	__s32 dfd;
	__s32 flags;
	__u32 mode;
	__u16 syscall;
	__u16 path_len;
	char path[ASSAY_PATH_MAX];
};

struct assay_connect_event {
	struct assay_event_header hdr;
	__s32 ret;
	__s32 fd;
	__u16 family;
	__u16 port;
	__u8 addr[16];
	__u16 op;             /* enum assay_net_op: connect(2), or a send naming its destination */
	__u16 _pad;
};

/* file_blocked and exec_blocked; variable length like open events. */
struct assay_block_event {
	struct assay_event_header hdr;
	__u64 ino;
	__u32 dev;
	__u32 gen;
	__u32 rule_id;
	enum assay_action action;
	__u32 path_len;
	__u32 _pad;
	char path[ASSAY_PATH_MAX];
};

struct assay_tamper_event {
	struct assay_event_header hdr;
	__u32 what;           /* enum assay_tamper */
	__u32 target;         /* map or program id, or the target's pid */
	__u32 arg;            /* the signal, or the ptrace mode */
	__u32 _pad;
};

struct assay_net_block_event {
	struct assay_event_header hdr;
	__u32 rule_id;
	enum assay_action action;
	__u16 family;
	__u16 port;
	__u16 protocol;
	__u16 op;             /* enum assay_net_op */
	__u8 addr[16];
};

#endif /* __ASSAY_H */
