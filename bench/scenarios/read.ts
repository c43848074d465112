/**
 * KV v2 reads/s ÷ an Express hello-world on the same machine in the same run (issue 3; target
 * ≥ 0.5), and p99 latency at half of Coffer's measured peak (open loop).
 */
import { spawn } from 'node:child_process';
import { benchCluster } from '../env';
import { closedLoop, openLoop } from '../load';
import type { Figure } from '../run';
import { vault } from '../../test/helpers/http';

async function helloWorld(concurrency: number, seconds: number): Promise<number> {
  // The reference server runs in its own process, as Coffer does.
  const src = `const e=require('express')();e.get('/',(q,r)=>r.json({hello:'world'}));const s=e.listen(0,'127.0.0.1',()=>console.log('port='+s.address().port));`;
  const child = spawn(process.execPath, ['-e', src], { cwd: process.cwd(), stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve) => child.stdout!.on('data', (d) => { const m = /port=(\d+)/.exec(String(d)); if (m) resolve(Number(m[1])); }));
  try {
    return (await closedLoop(`http://127.0.0.1:${port}`, concurrency, seconds, () => ({ method: 'GET', path: '/' }))).perSecond;
  } finally {
    child.kill('SIGKILL');
  }
}

export async function readScenario(seconds: number): Promise<Figure[]> {
  const concurrency = 16;
  const reference = await helloWorld(concurrency, seconds);
  const cluster = await benchCluster('read');
  try {
    for (let i = 0; i < 1000; i++) {
      await vault(cluster.server.addr, 'POST', `secret/data/read/${i}`, { token: cluster.token, body: { data: { password: `p${i}` } } });
    }
    const req = (i: number) => ({ method: 'GET', path: `/v1/secret/data/read/${i % 1000}`, headers: { 'x-vault-token': cluster.token } });
    const peak = await closedLoop(cluster.server.addr, concurrency, seconds, req);
    const half = await openLoop(cluster.server.addr, peak.perSecond / 2, seconds, req);
    return [
      {
        name: 'kv2_reads_per_s',
        value: peak.perSecond,
        unit: 'reads/s',
        reference: { name: 'Express hello-world req/s (same concurrency)', value: reference },
        target: 0.5,
        extra: { concurrency, p50_ms: peak.p50Ms, p99_ms: peak.p99Ms, errors: peak.errors },
      },
      {
        name: 'kv2_read_p99_at_half_load_ms',
        value: half.p99Ms,
        unit: 'ms',
        extra: { rate_per_s: peak.perSecond / 2, p50_ms: half.p50Ms, errors: half.errors, requests: half.requests },
      },
    ];
  } finally {
    await cluster.close();
  }
}
