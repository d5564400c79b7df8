'use strict';
// The post step: `assay action post` stops the monitor, writes the job summary and applies fail-on.
const { run } = require('./lib');

const cmd = JSON.parse(process.env.STATE_ASSAY_CMD || '["assay"]');
process.exitCode = run([...cmd, 'action', 'post']);
