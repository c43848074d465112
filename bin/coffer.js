#!/usr/bin/env node
// The `coffer` command. Runs the compiled CLI (npm run build produces dist/).
require('../dist/src/cli/index.js').main(process.argv.slice(2));
