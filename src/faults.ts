/**
 * Named fault points for fault tests (STYLE.md): no-ops in production. A test arms one with
 * the environment of the process it starts:
 *
 *   COFFER_FAULTS="ship.beforeAck=0.05,flush.midPage=1"
 *
 * meaning: at `ship.beforeAck`, kill this process (SIGKILL, no cleanup) with probability 0.05.
 * Points: ship.beforeAck (a batch was applied by the secondary, the cursor not yet moved),
 * apply.beforeCommit (a secondary applied a batch, not yet committed).
 */
const armed = new Map<string, number>(
  (process.env.COFFER_FAULTS ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => {
      const [name, p] = s.split('=');
      return [name, p === undefined ? 1 : Number(p)] as [string, number];
    }),
);

export function faultPoint(name: string): void {
  const p = armed.get(name);
  if (p !== undefined && Math.random() < p) {
    process.stderr.write(`fault point ${name}: killing process ${process.pid}\n`);
    process.kill(process.pid, 'SIGKILL');
  }
}
