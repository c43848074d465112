/**
 * A secondary's replication states, as Vault names them.
 *
 *   idle ──enable──▶ connecting ──registered──▶ bootstrapping ──copy done──▶ stream-wals
 *   stream-wals ──primary unreachable──▶ idle ──heartbeat answered──▶ stream-wals
 *   bootstrapping ──(crash)──▶ bootstrapping (resumes from its path cursor)
 *   any ──disable──▶ idle (mode disabled)
 *
 * `merkle-diff` and `merkle-sync` arrive with the merkle index (the next issue); until then a
 * secondary that is new or behind catches up by bootstrap copy and WAL streaming.
 */
export const SECONDARY_STATES = ['idle', 'connecting', 'bootstrapping', 'merkle-diff', 'merkle-sync', 'stream-wals'] as const;
export type SecondaryState = (typeof SECONDARY_STATES)[number];

export type Mode = 'disabled' | 'primary' | 'secondary';
