#!/bin/sh
# The `make demo` workload, run inside a matrix guest: sets up /srv/demo, then runs a small
# "test job" under `assay monitor --policy` and shows which opens the kernel refused.
set -u
mkdir -p /srv/demo/keys/public
echo "top secret" > /srv/demo/secret.txt
echo "private key" > /srv/demo/keys/id_ed25519
echo "public key" > /srv/demo/keys/public/id_ed25519.pub
echo "debug=1" > /srv/demo/app.conf
echo "hello" > /srv/demo/readme.txt
here=$(dirname "$0")
assay=${ASSAY:-python3 -m assay}
echo "== assay doctor"
$assay doctor
echo "== assay monitor --policy demo-policy.yaml -- sh -c '...'"
$assay monitor --format text --policy "$here/demo-policy.yaml" -- sh -c '
  cat /srv/demo/readme.txt
  cat /srv/demo/secret.txt || echo "(secret.txt refused)"
  cat /srv/demo/keys/id_ed25519 || echo "(private key refused)"
  cat /srv/demo/keys/public/id_ed25519.pub
  cat /srv/demo/app.conf
  echo "created later" > /srv/demo/keys/new-key || echo "(new file in keys/ refused)"
  python3 -c "import socket; socket.create_connection((\"127.0.0.1\", 9))" 2>&1 | tail -1
  python3 -c "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b\"x\", (\"127.0.0.1\", 9))" 2>&1 | tail -1
  exit 3' > /tmp/demo-events.txt
status=$?
echo "== events (opens, forks, execs and exits left out)"
grep -vE "\] (openat|fork|exit|exec) " /tmp/demo-events.txt
echo "== assay exit status: $status (the workload exited 3)"
