/**
 * A secondary's replication states, as Vault names them.
 *
 *   idle ──enable / update-primary / recover──▶ merkle-diff ──▶ merkle-sync ──▶ stream-wals
 *   stream-wals ──primary unreachable──▶ idle ──heartbeat answered──▶ stream-wals
 *   stream-wals ──primary no longer retains our position──▶ merkle-diff
 *   merkle-diff / merkle-sync ──(crash)──▶ restarts at merkle-diff
 *   any ──disable──▶ idle (mode disabled)
 *
 * `bootstrapping` and `connecting` remain for rows written by earlier versions (a secondary
 * found bootstrapping reconciles by merkle diff).
 */
export const SECONDARY_STATES = ['idle', 'connecting', 'bootstrapping', 'merkle-diff', 'merkle-sync', 'stream-wals'] as const;
export type SecondaryState = (typeof SECONDARY_STATES)[number];

export type Mode = 'disabled' | 'primary' | 'secondary';
