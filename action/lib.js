'use strict';
// Shared by main.js and post.js: inputs as the runner passes them, and running a command in the foreground.
const { spawnSync } = require('child_process');

// The runner upper-cases input names and keeps hyphens: INPUT_FAIL-ON.
function input(name, dflt) {
  const v = process.env[`INPUT_${name.toUpperCase()}`];
  return v === undefined || v.trim() === '' ? dflt : v.trim();
}

// Hyphenated names do not survive a shell (sh drops them from the environment): copy them with '_'.
function childEnv() {
  const env = { ...process.env };
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith('INPUT_') && k.includes('-')) env[k.replace(/-/g, '_')] = v;
  }
  return env;
}

function run(argv) {
  console.log(`[command]${argv.join(' ')}`);
  const r = spawnSync(argv[0], argv.slice(1), { stdio: 'inherit', env: childEnv() });
  if (r.error) {
    console.log(`::error::assay action: cannot run ${argv[0]}: ${r.error.message}`);
    return 1;
  }
  return r.status === null ? 128 + (require('os').constants.signals[r.signal] || 0) : r.status;
}

module.exports = { input, run };
