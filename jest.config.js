/** Tests run TypeScript through swc (fast, no type-check); `npm run build` type-checks. */
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/test'],
  testMatch: ['**/*.test.ts'],
  transform: { '^.+\\.ts$': ['@swc/jest', { jsc: { target: 'es2022', parser: { syntax: 'typescript' } }, module: { type: 'commonjs' } }] },
  testTimeout: 60000,
  // Integration and cluster tests share one Postgres server and start real processes: two
  // cores cannot run many of them at once without turning waits into timeouts.
  maxWorkers: 2,
  reporters: ['default', '<rootDir>/test/helpers/count-reporter.js'],
};
