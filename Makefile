# Assay build, test and matrix entry points. Everything installed or downloaded lands in .cache/ or .venv/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
CLANG ?= clang
BPFTOOL ?= bpftool
BPF_SRC := $(wildcard bpf/src/*.bpf.c)
BPF_HDR := $(wildcard bpf/src/*.h)
BPF_OBJ := $(patsubst bpf/src/%.bpf.c,assay/data/%.bpf.o,$(BPF_SRC))
APT_PKGS := clang llvm libbpf-dev libbpf1 bpftool qemu-system-x86 qemu-system-arm qemu-user-static debootstrap cpio dpkg-dev rpm2cpio xz-utils zstd debian-archive-keyring shellcheck apt-utils prometheus logrotate systemd btrfs-progs
KERNELS ?=

.PHONY: all deps apt venv bpf wheel test test-host matrix matrix-fetch demo bench bench-vm clean

all: bpf

deps: apt venv

# Idempotent: installs only what is missing, and refreshes the package lists only then.
apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q 'setuptools>=70.1' wheel build && $(VPY) -m pip install -q -e '.[test,ci]'
	touch $@

bpf/vmlinux.h:
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

# No __TARGET_ARCH_*: one object for every architecture. The programs read no pt_regs, so
# bpf_tracing.h's arch macros are never needed; using one would now fail to compile.
assay/data/%.bpf.o: bpf/src/%.bpf.c $(BPF_HDR) bpf/vmlinux.h
	@mkdir -p $(@D)
	$(CLANG) -O2 -g -target bpf -Wall -Werror -Ibpf -Ibpf/src -c $< -o $@.tmp
	mv $@.tmp $@

bpf: $(BPF_OBJ)

wheel: bpf venv
	rm -rf dist build
	$(VPY) -m build --wheel --no-isolation -o dist . >/dev/null
	@ls dist/*.whl

test-host: deps bpf
	$(VPY) -m pytest -q -m 'not vm' tests kernel-matrix/test_kernel_matrix.py

matrix: deps wheel
	$(VPY) kernel-matrix/run.py $(if $(KERNELS),--kernels $(KERNELS))

# Kernels and guest roots for the matrix, into .cache/kernel-matrix/ (`make matrix` fetches too).
matrix-fetch: deps
	$(VPY) kernel-matrix/fetch.py $(if $(KERNELS),--kernels $(KERNELS)) $(if $(REFRESH),--refresh)

test: test-host matrix

# Natively where this host can enforce (assay doctor passes); otherwise in a 6.1 guest under QEMU
# booted with Ubuntu's LSM list (no `bpf`), as on GitHub's hosted runners: enforcement via fmod_ret.
DEMO_ROW ?= 6.1-fmod_ret
demo: deps wheel
	@if $(VPY) -m assay doctor >/dev/null 2>&1; then \
	  echo "demo: this host can enforce: running natively"; \
	  ASSAY="$(abspath $(VPY)) -m assay" sh examples/demo.sh; \
	else \
	  echo "demo: this host cannot enforce (see assay doctor): booting row $(DEMO_ROW) in QEMU"; \
	  $(VPY) kernel-matrix/demo.py --row $(DEMO_ROW) --cmd "sh /opt/assay/src/examples/demo.sh"; \
	fi

bench: deps bpf
	$(VPY) bench/ringbuf_throughput.py
	$(VPY) bench/teardown.py

# The open overhead benchmark needs both backends (bpf in the LSM list): it runs in a 6.1 guest
# and prints its JSON there.
bench-vm: deps wheel
	$(VPY) kernel-matrix/demo.py --row $(or $(KERNELS),6.1) --cmd "python3 /opt/assay/src/bench/open_overhead.py --out /tmp/open_overhead.json"

clean:
	rm -rf build dist assay/data/*.bpf.o *.egg-info
