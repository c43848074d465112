/**
 * sys/ routes: response wrapping (Vault's `sys/wrapping/*`).
 *
 * Who may call them is decided by core's ACL check like any route: the wrapping token itself
 * carries the built-in `response-wrapping` policy (update on unwrap, lookup, rewrap), so it can
 * unwrap itself when sent as X-Vault-Token. `lookup` is unauthenticated, as in Vault.
 */
import type { Core } from '../core';
import { InvalidRequest } from '../errors';
import type { RouteContext, RouteDef } from '../framework';

/** Used by sys/wrapping/wrap when the request has no X-Vault-Wrap-TTL (Vault refuses instead). */
const DEFAULT_WRAP_TTL = '5m';

const tokenField = { token: { type: 'string', description: 'The wrapping token; defaults to the token of the request.' } } as const;

/** The body's `token`, else the caller's own (the wrapping token sent as X-Vault-Token). */
function tokenOf(ctx: RouteContext): string {
  const t = (ctx.fields.token as string | undefined) || ctx.req.token;
  if (!t) throw new InvalidRequest('missing "token" value in input');
  return t;
}

export function wrappingRoutes(core: Core): RouteDef[] {
  return [
    {
      pattern: 'wrapping/wrap',
      summary: 'Response-wraps an arbitrary JSON object.',
      operations: {
        update: async (ctx) => {
          const ttl = ctx.req.headers['x-vault-wrap-ttl'] || DEFAULT_WRAP_TTL;
          // The handler wraps by itself (core then sees wrap_info and leaves the response be).
          return core.wrapping.wrap({ data: { ...ctx.req.data } }, ttl, 'sys/wrapping/wrap');
        },
      },
    },
    {
      pattern: 'wrapping/unwrap',
      summary: 'Unwraps a response-wrapped token: returns the original response, once.',
      fields: tokenField,
      operations: { update: async (ctx) => core.wrapping.unwrap(tokenOf(ctx)) },
    },
    {
      pattern: 'wrapping/lookup',
      summary: 'Looks up the properties of a response-wrapped token.',
      fields: tokenField,
      unauthenticated: true,
      operations: { update: async (ctx) => ({ data: await core.wrapping.lookup(tokenOf(ctx)) }) },
    },
    {
      pattern: 'wrapping/rewrap',
      summary: 'Rotates a response-wrapped token: the old one is spent, a new one wraps the same response.',
      fields: tokenField,
      operations: { update: async (ctx) => core.wrapping.rewrap(tokenOf(ctx)) },
    },
  ];
}
