/**
 * CPU time by process, from /proc (Linux): where a burst's cycles went, per write. The bench's
 * figures are rates on a shared 2-core machine, so a pipeline's cost shows up as CPU taken
 * from the writers; this names the process that took it.
 *
 * Processes are labelled by `label(pid, comm, cmdline, ppid)`; anything unlabelled is left out.
 * Postgres backends name their database in their title ("postgres: user db host(port) idle"),
 * so one instance's CPU can be split by database and by kind (walsender, apply worker).
 */
import { readdirSync, readFileSync } from 'node:fs';

const TICKS_PER_S = 100; // USER_HZ on Linux

export type Labeller = (pid: number, comm: string, cmdline: string, ppid: number) => string | null;

export interface CpuSnapshot {
  /** label → CPU seconds, summed over the processes that carry it at the time of the snapshot. */
  perLabel: Map<string, number>;
  /** pid → [label, CPU seconds], to subtract per process (one that started later counts from 0). */
  perPid: Map<number, [string, number]>;
}

export function cpuSnapshot(label: Labeller): CpuSnapshot {
  const perPid = new Map<number, [string, number]>();
  let pids: string[] = [];
  try {
    pids = readdirSync('/proc').filter((d) => /^\d+$/.test(d));
  } catch {
    return { perLabel: new Map(), perPid };
  }
  for (const p of pids) {
    const pid = Number(p);
    try {
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      // comm may hold spaces and parentheses: the fields after it start after the last ')'.
      const close = stat.lastIndexOf(')');
      const comm = stat.slice(stat.indexOf('(') + 1, close);
      const rest = stat.slice(close + 2).split(' ');
      const cmdline = readFileSync(`/proc/${p}/cmdline`, 'utf8').replace(/\0/g, ' ').trim();
      const l = label(pid, comm, cmdline, Number(rest[1]));
      if (l === null) continue;
      // Fields 14 and 15 (utime, stime) are rest[11] and rest[12] (rest starts at field 3).
      perPid.set(pid, [l, (Number(rest[11]) + Number(rest[12])) / TICKS_PER_S]);
    } catch {
      /* gone meanwhile */
    }
  }
  const perLabel = new Map<string, number>();
  for (const [l, s] of perPid.values()) perLabel.set(l, (perLabel.get(l) ?? 0) + s);
  return { perLabel, perPid };
}

/** CPU seconds per label between two snapshots (processes gone by `after` are not counted). */
export function cpuBetween(before: CpuSnapshot, after: CpuSnapshot): Map<string, number> {
  const out = new Map<string, number>();
  for (const [pid, [l, s]] of after.perPid) out.set(l, (out.get(l) ?? 0) + s - (before.perPid.get(pid)?.[1] ?? 0));
  return out;
}

/** One line per label: CPU ms per write and share of the wall time, busiest first. */
export function cpuReport(title: string, used: Map<string, number>, writes: number, wallSeconds: number): string {
  const total = [...used.values()].reduce((a, b) => a + b, 0);
  const rows = [...used.entries()].sort((a, b) => b[1] - a[1]);
  const lines = rows.map(([l, s]) => `  ${l.padEnd(34)} ${((s * 1000) / writes).toFixed(3).padStart(7)} ms/write  ${((s / wallSeconds) * 100).toFixed(0).padStart(4)}% of a core`);
  return [`CPU, ${title}: ${writes} writes in ${wallSeconds.toFixed(2)} s, ${((total * 1000) / writes).toFixed(3)} ms/write in all`, ...lines].join('\n');
}

/** A postgres process's label from its title: `pg <db>` for a backend, `pg <kind>` otherwise. */
export function postgresLabel(cmdline: string): string {
  const m = /^postgres: (.*)$/.exec(cmdline);
  if (!m) return 'pg postmaster';
  const t = m[1];
  if (t.startsWith('walsender')) return 'pg walsender';
  if (t.startsWith('logical replication')) return `pg ${t.replace(/ for subscription.*$/, '').replace(/ \d+$/, '')}`;
  const backend = /^\S+ (\S+) \d+\.\d+\.\d+\.\d+/.exec(t) ?? /^\S+ (\S+) \[local\]/.exec(t);
  if (backend) return `pg backend ${backend[1]}`;
  return `pg ${t.split(' ').slice(0, 2).join(' ')}`;
}
