// SPDX-License-Identifier: GPL-2.0
/* An independent probe for the doctor test: one trivial trampoline program, section from -DSECTION. */
#define SEC(name) __attribute__((section(name), used))

char LICENSE[] SEC("license") = "GPL";

SEC(SECTION)
int probe(unsigned long long *ctx)
{
	return 0;
}
