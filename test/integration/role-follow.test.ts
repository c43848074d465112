/**
 * A process that has not heard yet that its cluster became a secondary (its NOTIFY still on the
 * way) follows the role storage reports with the token, before running the request: a write is
 * forwarded even when it would change nothing here, and is never answered from this cluster.
 * In-process Core on a real Postgres; the forwarder stands in for the network to a primary.
 */
import { MustForward } from '../../src/core/errors';
import type { LogicalRequest, LogicalResponse } from '../../src/core/request';
import { updateReplication } from '../../src/storage/replication';
import { inProcessCore, ManualClock, type InProcessCore } from '../helpers/core';

let c: InProcessCore;

beforeAll(async () => {
  c = await inProcessCore('role-follow', new ManualClock());
  await c.core.handle({ operation: 'update', path: 'sys/mounts/secret', data: { type: 'kv', options: { version: '2' } }, query: {}, token: c.root, headers: {} });
});

afterAll(async () => {
  await c?.database.close();
  await c?.tdb.drop();
});

test('a write that would change nothing here is forwarded once storage says the cluster is a secondary', async () => {
  const forwarded: string[] = [];
  let refreshed = 0;
  // What replication wires: re-read the role; as a secondary, forward to the primary.
  c.core.refreshRole = async () => {
    refreshed++;
    c.core.barrier.replicatedReadOnly = true;
    c.core.forwarder = {
      forward: async (req: LogicalRequest): Promise<LogicalResponse> => {
        forwarded.push(`${req.operation} ${req.path}`);
        return {};
      },
    };
  };
  // Not a secondary: nothing to follow, the delete of an absent key is answered here.
  await c.core.handle({ operation: 'delete', path: 'secret/metadata/absent', data: {}, query: {}, token: c.root, headers: {} });
  expect({ refreshed, forwarded }).toEqual({ refreshed: 0, forwarded: [] });
  await updateReplication(c.database.db, { mode: 'secondary' });
  await c.core.handle({ operation: 'delete', path: 'secret/metadata/absent', data: {}, query: {}, token: c.root, headers: {} });
  expect({ refreshed, forwarded }).toEqual({ refreshed: 1, forwarded: ['delete secret/metadata/absent'] });
  // Reads stay local, and the role is followed once, not per request.
  await c.core.handle({ operation: 'read', path: 'secret/data/absent', data: {}, query: {}, token: c.root, headers: {} }).catch(() => undefined);
  expect({ refreshed, forwarded }).toEqual({ refreshed: 1, forwarded: ['delete secret/metadata/absent'] });
});

test('sys/rotate in a process that has not heard its cluster became a secondary: storage refuses the new term', async () => {
  await updateReplication(c.database.db, { mode: 'secondary' });
  c.core.barrier.replicatedReadOnly = false; // this process's belief: not a secondary
  const term = async () => Number((await c.database.db.selectFrom('coffer_seal').select('active_term').executeTakeFirstOrThrow()).active_term);
  const before = await term();
  await expect(c.core.rotate()).rejects.toBeInstanceOf(MustForward);
  expect(await term()).toBe(before);
  // Not a secondary: the rotation is stored.
  await updateReplication(c.database.db, { mode: 'disabled' });
  await c.core.rotate();
  expect(await term()).toBe(before + 1);
});
