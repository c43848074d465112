/** Vault's replication API (`sys/replication/...`), answered by the Replication manager. */
import type { RouteDef } from '../core/framework';
import { loadCaRoots } from './cluster-tls';
import type { Replication } from './manager';

export function replicationRoutes(r: Replication): RouteDef[] {
  const status = async () => ({ data: await r.status() });
  return [
    {
      pattern: 'replication/status',
      summary: 'The replication status of this cluster (performance and DR).',
      unauthenticated: true,
      operations: { read: async () => ({ data: { dr: { mode: 'disabled' }, performance: await r.status() } }) },
    },
    { pattern: 'replication/performance/status', summary: 'Performance replication status.', unauthenticated: true, operations: { read: status } },
    { pattern: 'replication/dr/status', summary: 'DR replication status (Coffer has no DR mode).', unauthenticated: true, operations: { read: async () => ({ data: { mode: 'disabled' } }) } },
    {
      pattern: 'replication/performance/primary/enable',
      summary: 'Makes this cluster a performance primary.',
      sudo: true,
      fields: { primary_cluster_addr: { type: 'string', description: 'Cluster address override (accepted for compatibility).' } },
      operations: { update: () => r.enablePrimary() },
    },
    {
      pattern: 'replication/performance/primary/secondary-token',
      summary: 'Creates a single-use activation token for a secondary.',
      sudo: true,
      fields: {
        id: { type: 'string', required: true, description: 'An opaque, unique name for the secondary.' },
        ttl: { type: 'duration', default: '30m', description: 'How long the activation token is valid.' },
      },
      operations: { update: (ctx) => r.secondaryToken(ctx.fields.id, ctx.fields.ttl) },
    },
    {
      pattern: 'replication/performance/primary/revoke-secondary',
      summary: 'Revokes a secondary: it is disconnected and refused until it gets a new token.',
      sudo: true,
      fields: { id: { type: 'string', required: true } },
      operations: { update: (ctx) => r.revokeSecondary(ctx.fields.id) },
    },
    { pattern: 'replication/performance/primary/disable', summary: 'Disables performance replication on the primary.', sudo: true, operations: { update: () => r.disablePrimary() } },
    {
      pattern: 'replication/performance/secondary/enable',
      summary: "Makes this cluster a performance secondary: wipes its replicated data and replaces it with the primary's.",
      sudo: true,
      fields: {
        token: { type: 'string', required: true, description: 'The activation token from the primary.' },
        primary_api_addr: { type: 'string', description: "Overrides the primary's address inside the token." },
        ca_file: { type: 'string', description: "A PEM file (on this server) of CA certificates to trust the primary's API listener with, instead of the system's." },
        ca_path: { type: 'string', description: 'A directory (on this server) whose files are PEM CA certificates, as ca_file.' },
      },
      operations: {
        update: (ctx) => r.enableSecondary(ctx.fields.token, ctx.fields.primary_api_addr, false, loadCaRoots(ctx.fields.ca_file, ctx.fields.ca_path)),
      },
    },
    {
      pattern: 'replication/reindex',
      summary: 'Rebuilds the merkle index from storage (in the background; progress in the status).',
      sudo: true,
      fields: {
        diff: { type: 'bool', description: 'Accepted for compatibility (the rebuild always compares every key).' },
        force: { type: 'bool', description: 'Accepted for compatibility (the rebuild always scans all storage).' },
        skip_flush: { type: 'bool', description: 'Accepted for compatibility (the rebuilt index is always written).' },
      },
      operations: { update: () => r.reindex() },
    },
    {
      pattern: 'replication/merkle-check',
      summary: 'Compares the merkle index with a rebuild from storage and reports corrupted pages.',
      sudo: true,
      operations: { update: () => r.merkleCheck() },
    },
    {
      pattern: 'replication/recover',
      summary: 'Recovers replication from a bad state: a secondary reconciles again; a primary restarts shipping.',
      sudo: true,
      operations: { update: () => r.recover() },
    },
    {
      pattern: 'replication/performance/secondary/promote',
      summary: 'Promotes this secondary to primary of the set, in a new epoch (the old primary is fenced).',
      sudo: true,
      fields: {
        force: { type: 'bool', default: false, description: 'Promote even while reconciling (the data may be partial).' },
        primary_cluster_addr: { type: 'string', description: 'Accepted for compatibility.' },
      },
      operations: { update: (ctx) => r.promote(Boolean(ctx.fields.force)) },
    },
    {
      pattern: 'replication/performance/primary/demote',
      summary: 'Demotes this primary to a secondary that follows nobody until update-primary (its data is kept).',
      sudo: true,
      operations: { update: () => r.demote() },
    },
    {
      pattern: 'replication/performance/secondary/update-primary',
      summary: 'Re-points this secondary at a (new) primary with a token from it; no wipe: it reconciles by merkle diff.',
      sudo: true,
      fields: {
        token: { type: 'string', required: true, description: 'An activation token from the new primary.' },
        primary_api_addr: { type: 'string', description: "Overrides the primary's address inside the token." },
        ca_file: { type: 'string', description: "A PEM file (on this server) of CA certificates to trust the primary's API listener with." },
        ca_path: { type: 'string', description: 'A directory (on this server) whose files are PEM CA certificates, as ca_file.' },
      },
      operations: { update: (ctx) => r.enableSecondary(ctx.fields.token, ctx.fields.primary_api_addr, true, loadCaRoots(ctx.fields.ca_file, ctx.fields.ca_path)) },
    },
    {
      pattern: 'replication/performance/divergence',
      summary: 'Keys this cluster held that its primary did not, overwritten or removed by merkle-sync (values stay encrypted).',
      sudo: true,
      operations: { read: () => r.divergence() },
    },
    { pattern: 'replication/performance/secondary/disable', summary: 'Leaves the replication set.', sudo: true, operations: { update: () => r.disableSecondary() } },
  ];
}
