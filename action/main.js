'use strict';
// The main step: install Assay (unless install: false), then `assay action main` does the rest.
const fs = require('fs');
const os = require('os');
const path = require('path');
const { input, run } = require('./lib');

const sudo = process.getuid() === 0 ? [] : ['sudo', '-n'];

function install() {
  // The system libbpf: libbpf1 where the release has it (Ubuntu 24.04), else libbpf0 (22.04).
  const apt = [...sudo, 'env', 'DEBIAN_FRONTEND=noninteractive', 'apt-get', 'install', '-y', '-q',
    '--no-install-recommends'];
  if (run([...apt, 'libbpf1']) !== 0 && run([...apt, 'libbpf0']) !== 0) {
    run([...sudo, 'apt-get', 'update', '-q']);
    if (run([...apt, 'libbpf1']) !== 0 && run([...apt, 'libbpf0']) !== 0) return null;
  }
  // A venv of its own: sudo then runs exactly this interpreter and package.
  const venv = path.join(process.env.RUNNER_TEMP || os.tmpdir(), 'assay-venv');
  const version = input('version', '');
  let spec = 'assay-monitor';
  if (version.endsWith('.whl') || version.includes('/')) spec = path.resolve(version);
  else if (version !== '') spec = `assay-monitor==${version.replace(/^v/, '')}`;
  if (run(['python3', '-m', 'venv', venv]) !== 0) return null;
  if (run([path.join(venv, 'bin', 'python'), '-m', 'pip', 'install', '-q', spec]) !== 0) return null;
  return [path.join(venv, 'bin', 'assay')];
}

function main() {
  const inst = input('install', 'true');
  if (inst !== 'true' && inst !== 'false') {
    console.log(`::error::assay action: input install: '${inst}' is not true or false`);
    return 1;
  }
  const cmd = inst === 'false' ? ['assay'] : install();
  if (cmd === null) {
    console.log('::error::assay action: installing Assay failed (see above)');
    return 1;
  }
  if (process.env.GITHUB_STATE) {
    fs.appendFileSync(process.env.GITHUB_STATE, `ASSAY_CMD=${JSON.stringify(cmd)}${os.EOL}`);
  }
  return run([...cmd, 'action', 'main']);
}

process.exitCode = main();
