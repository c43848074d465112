/**
 * The userpass auth method. Users live under the mount's storage prefix at `user/<name>`
 * (replicated), names lowercased as Vault does.
 *
 * Passwords are kept only as a salted scrypt hash (parameters stored beside it, so they can be
 * raised later without breaking old hashes). A login with an unknown user still runs scrypt
 * against a dummy hash and fails with the same message as a wrong password, so neither the
 * answer nor its timing says whether the user exists.
 */
import { randomBytes, scrypt, timingSafeEqual, type ScryptOptions } from 'node:crypto';
import { InvalidRequest, NotFound, PermissionDenied } from '../errors';
import { PerMountBackend } from './per-mount';
import type { RouteContext, RouteDef } from '../framework';
import { mountStoragePrefix, type MountEntry } from '../mounts';
import type { LogicalResponse } from '../request';
import { issueAuth } from './issue';
import { addrAllowed, aliasFields, applyTokenFields, defaultTokenParams, loginIssueParams, mountDisplayPrefix, TOKEN_FIELDS, tokenData, type Aliases, type TokenParams } from './token-params';

interface PasswordHash {
  alg: 'scrypt';
  n: number;
  r: number;
  p: number;
  salt: string; // base64
  hash: string; // base64
}

interface UserEntry extends TokenParams {
  password_hash: PasswordHash;
  /** `token_*` fields last set through their legacy names (echoed back on read, as Vault does). */
  legacy: (keyof TokenParams)[];
}

/** scrypt cost: N=2^15 (32 MiB, ~50-100 ms), above OWASP's floor of 2^14 at r=8. */
const SCRYPT = { n: 1 << 15, r: 8, p: 1, keyLen: 32 } as const;
const MAXMEM = 128 * 1024 * 1024;

const ALIASES: Aliases = { policies: 'token_policies', ttl: 'token_ttl', max_ttl: 'token_max_ttl', bound_cidrs: 'token_bound_cidrs' };
const LEGACY_NAME: Partial<Record<keyof TokenParams, string>> = Object.fromEntries(Object.entries(ALIASES).map(([k, v]) => [v, k]));

const BAD_CREDENTIALS = 'invalid username or password';

function scryptAsync(password: string, salt: Buffer, keyLen: number, o: ScryptOptions): Promise<Buffer> {
  return new Promise((resolve, reject) => scrypt(password, salt, keyLen, o, (err, key) => (err ? reject(err) : resolve(key))));
}

async function hashPassword(password: string): Promise<PasswordHash> {
  const salt = randomBytes(16);
  const key = await scryptAsync(password, salt, SCRYPT.keyLen, { N: SCRYPT.n, r: SCRYPT.r, p: SCRYPT.p, maxmem: MAXMEM });
  return { alg: 'scrypt', n: SCRYPT.n, r: SCRYPT.r, p: SCRYPT.p, salt: salt.toString('base64'), hash: key.toString('base64') };
}

/** A stand-in for unknown users, so their login costs what a real one does. */
const DUMMY: PasswordHash = { alg: 'scrypt', n: SCRYPT.n, r: SCRYPT.r, p: SCRYPT.p, salt: randomBytes(16).toString('base64'), hash: randomBytes(SCRYPT.keyLen).toString('base64') };

async function verifyPassword(password: string, stored: PasswordHash | null): Promise<boolean> {
  const h = stored ?? DUMMY;
  const expected = Buffer.from(h.hash, 'base64');
  const got = await scryptAsync(password, Buffer.from(h.salt, 'base64'), expected.length, { N: h.n, r: h.r, p: h.p, maxmem: MAXMEM });
  return timingSafeEqual(got, expected) && stored !== null;
}

export class UserpassBackend extends PerMountBackend {
  protected routeDefs(mount: MountEntry): RouteDef[] {
    const base = mountStoragePrefix(mount);
    const userPath = (ctx: RouteContext) => `${base}user/${username(ctx)}`;
    return [
      {
        pattern: 'users',
        summary: 'Manage users allowed to authenticate.',
        operations: {
          list: async () => {
            const keys = await this.core.barrier.list(`${base}user/`);
            if (keys.length === 0) throw new NotFound();
            return { data: { keys } };
          },
        },
      },
      {
        pattern: 'users/:username',
        summary: 'Manage users allowed to authenticate.',
        fields: {
          password: { type: 'string', description: 'Password for this user.' },
          ...TOKEN_FIELDS,
          ...aliasFields(ALIASES),
        },
        exists: async (ctx) => (await this.core.barrier.get(userPath(ctx))) !== null,
        operations: {
          read: async (ctx) => {
            const u = await this.core.barrier.get<UserEntry>(userPath(ctx));
            if (!u) throw new NotFound();
            return { data: userView(u) };
          },
          update: (ctx) => this.writeUser(userPath(ctx), ctx.fields, { create: true }),
          delete: async (ctx) => {
            const { lastLsn } = await this.core.barrier.transaction((tx) => tx.delete(userPath(ctx)));
            return { status: 204, walLsn: lastLsn };
          },
        },
      },
      {
        pattern: 'users/:username/password',
        summary: "Reset user's password.",
        fields: { password: { type: 'string', description: 'Password for this user.' } },
        operations: {
          update: (ctx) => {
            if (!ctx.fields.password) throw new InvalidRequest('missing password');
            return this.writeUser(userPath(ctx), { password: ctx.fields.password }, { create: false });
          },
        },
      },
      {
        pattern: 'users/:username/policies',
        summary: 'Update the policies associated with the username.',
        fields: { token_policies: TOKEN_FIELDS.token_policies, ...aliasFields({ policies: 'token_policies' }) },
        operations: {
          update: (ctx) => this.writeUser(userPath(ctx), { token_policies: ctx.fields.token_policies, policies: ctx.fields.policies }, { create: false }),
        },
      },
      {
        pattern: 'login/:username',
        summary: 'Log in with a username and password.',
        unauthenticated: true,
        fields: { password: { type: 'string', description: 'Password for this user.' } },
        operations: { update: (ctx) => this.login(mount, ctx) },
      },
    ];
  }

  private async writeUser(path: string, f: Record<string, any>, o: { create: boolean }): Promise<LogicalResponse> {
    if (f.password !== undefined && f.password === '') throw new InvalidRequest('missing password');
    // Hash outside the transaction: scrypt is slow and must not hold a connection or a lock.
    const hash = f.password !== undefined ? await hashPassword(String(f.password)) : undefined;
    const { lastLsn } = await this.core.barrier.transaction(async (tx) => {
      await tx.lock(path);
      const cur = await tx.get<UserEntry>(path);
      if (!cur && !o.create) throw new InvalidRequest('username does not exist');
      if (!cur && !hash) throw new InvalidRequest('missing password');
      const next: UserEntry = cur ? { ...cur, legacy: [...cur.legacy] } : { ...defaultTokenParams(), password_hash: hash!, legacy: [] };
      if (hash) next.password_hash = hash;
      const { usedLegacy, setModern } = applyTokenFields(next, f, ALIASES);
      next.legacy = [...new Set([...next.legacy.filter((k) => !setModern.has(k)), ...usedLegacy])];
      await tx.put(path, next);
    });
    return { status: 204, walLsn: lastLsn };
  }

  private async login(mount: MountEntry, ctx: RouteContext): Promise<LogicalResponse> {
    const name = username(ctx);
    const password = String(ctx.fields.password ?? '');
    const user = await this.core.barrier.get<UserEntry>(`${mountStoragePrefix(mount)}user/${name}`);
    // Always run scrypt (against a dummy for unknown users): one message, one cost.
    const ok = await verifyPassword(password, user?.password_hash ?? null);
    if (!user || !ok || !password) throw new InvalidRequest(BAD_CREDENTIALS);
    if (!addrAllowed(ctx.req.remoteAddr, user.token_bound_cidrs)) throw new PermissionDenied();
    const m = this.current(mount);
    const path = `auth/${m.path}login/${name}`;
    const { auth } = await issueAuth(this.core, {
      ...loginIssueParams(user, m),
      displayName: `${mountDisplayPrefix(m)}-${name}`,
      path,
      meta: { username: name },
      leasePath: path,
    });
    return { auth };
  }
}

function username(ctx: RouteContext): string {
  const name = ctx.params.username.toLowerCase();
  if (!/^[\w][\w.@-]*$/.test(name)) throw new InvalidRequest(`invalid username "${ctx.params.username}"`);
  return name;
}

function userView(u: UserEntry): Record<string, unknown> {
  const data = tokenData(u);
  for (const k of u.legacy) {
    const legacy = LEGACY_NAME[k];
    if (legacy) data[legacy] = u[k];
  }
  return data;
}
