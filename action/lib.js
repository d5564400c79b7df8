'use strict';
// Shared by main.js and post.js: inputs as the runner passes them, and running a command in the foreground.
const { spawnSync } = require('child_process');

// The runner upper-cases input names and keeps hyphens: INPUT_FAIL-ON.
function input(name, dflt) {
  const v = process.env[`INPUT_${name.toUpperCase()}`];
  return v === undefined || v.trim() === '' ? dflt : v.trim();
}

function run(argv) {
  console.log(`[command]${argv.join(' ')}`);
  const r = spawnSync(argv[0], argv.slice(1), { stdio: 'inherit' });
  if (r.error) {
    console.log(`::error::assay action: cannot run ${argv[0]}: ${r.error.message}`);
    return 1;
  }
  return r.status === null ? 128 + (require('os').constants.signals[r.signal] || 0) : r.status;
}

module.exports = { input, run };
