// Prints the plain closing line CI reads ("N passed, N failed") and writes it to
// .test-summary so .ci/run can repeat it as its very last line.
const fs = require('node:fs');
const path = require('node:path');

class CountReporter {
  onRunComplete(_contexts, results) {
    const failed = results.numFailedTests + results.numRuntimeErrorTestSuites;
    const line = `${results.numPassedTests} passed, ${failed} failed, ${results.numPendingTests} skipped`;
    fs.writeFileSync(path.join(process.cwd(), '.test-summary'), line + '\n');
    process.stdout.write('\n' + line + '\n');
  }
}
module.exports = CountReporter;
