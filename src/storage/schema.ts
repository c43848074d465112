/** Table types for kysely. Keep in step with db/migrations. */
import type { ColumnType, Generated } from 'kysely';

type Timestamp = ColumnType<Date, Date | string | undefined, Date | string>;
// int8 is parsed to a JS number (src/storage/db.ts).
type Int8 = ColumnType<number, number | bigint | string, number | bigint | string>;

export interface EntriesTable {
  path: string;
  version: Int8;
  value: Buffer | null;
  value_hash: Buffer | null;
  updated_at: Timestamp;
  merkle_subpage: ColumnType<number, never, never>;
}

export interface WalTable {
  seq: ColumnType<number, never, never>;
  xid: Generated<string>;
  lsn: Int8 | null;
  path: string;
  op: 'put' | 'delete';
  key_version: Int8;
  value_hash: Buffer | null;
  value_size: number;
  written_at: Timestamp;
  ordered_at: Timestamp | null;
}

export interface WalHeadTable {
  id: number;
  last_lsn: Int8;
  /** WAL resets so far (secondary enable starts the WAL again at 1). */
  resets: Generated<Int8>;
}

export interface LocalEntriesTable {
  path: string;
  value: Buffer;
  updated_at: Timestamp;
}

export interface SealTable {
  id: number;
  seal_type: string;
  secret_shares: number;
  secret_threshold: number;
  wrapped_root_key: Buffer | null;
  seal_key_id: string | null;
  keyring: Buffer;
  cluster_id: string;
  cluster_name: string;
  initialized_at: Timestamp;
  active_term: ColumnType<number, number | undefined, number>;
}

export interface TokensTable {
  token_hmac: Buffer;
  accessor: string;
  parent_hmac: Buffer | null;
  policies: string[];
  token_type: string;
  display_name: string;
  path: string;
  meta: ColumnType<Record<string, string>, string, string>;
  orphan: boolean;
  renewable: boolean;
  num_uses: number;
  ttl_seconds: Int8;
  explicit_max_ttl_seconds: Int8;
  period_seconds: Int8;
  role: string | null;
  entity_id: string;
  created_at: Timestamp;
  expires_at: Date | null;
}

export interface NodesTable {
  node_id: string;
  api_addr: string;
  cluster_addr: string;
  is_active: ColumnType<boolean, boolean | undefined, boolean>;
  active_since: ColumnType<Date | null, Date | null | undefined, Date | null>;
  last_seen: Timestamp;
}

export interface LeasesTable {
  lease_id: string;
  token_hmac: Buffer | null;
  kind: 'auth' | 'secret';
  path: string;
  issued_at: Timestamp;
  last_renewal: Date | null;
  expires_at: Date | null;
  ttl_seconds: Int8;
  max_expires_at: Date | null;
  renewable: boolean;
}

export interface WrappedTable {
  token_hmac: Buffer;
  accessor: string;
  creation_path: string;
  created_at: Timestamp;
  expires_at: Date;
  payload: Buffer;
}

export interface ReplicationTable {
  id: number;
  mode: ColumnType<'disabled' | 'primary' | 'secondary', 'disabled' | 'primary' | 'secondary' | undefined>;
  set_id: string | null;
  secondary_id: string | null;
  primary_api_addr: string | null;
  credential: Buffer | null;
  state: ColumnType<string, string | undefined>;
  applied_lsn: ColumnType<number, number | undefined>;
  bootstrap_lsn: number | null;
  bootstrap_after: string | null;
  sync_lsn: number | null;
  sync_progress: ColumnType<number, number | undefined>;
  sync_total_keys: ColumnType<number, number | undefined>;
  last_reindex_at: Date | null;
  epoch: ColumnType<number, number | undefined>;
  superseded_by_epoch: number | null;
  primary_head_lsn: number | null;
  primary_contact_at: Date | null;
  last_heartbeat: Date | null;
  last_error: string | null;
  updated_at: ColumnType<Date, Date | undefined>;
}

export interface SecondariesTable {
  secondary_id: string;
  credential_hmac: Buffer | null;
  api_addr: string | null;
  acked_lsn: ColumnType<number, number | undefined>;
  status: ColumnType<string, string | undefined>;
  token_accessor: string | null;
  version: string | null;
  last_heartbeat: Date | null;
  last_error: string | null;
  created_at: ColumnType<Date, Date | undefined, never>;
}

export interface MerklePagesTable {
  subpage: number;
  page_lsn: Int8;
  hash: Buffer;
  records: Buffer;
  flushed_at: Timestamp;
}

export interface MerkleCheckpointTable {
  id: number;
  checkpoint_lsn: Int8;
  redo_lsn: Int8;
  dirty: Record<string, number>;
  root: Buffer;
  taken_at: Timestamp;
}

export interface DivergenceTable {
  id: Generated<number>;
  detected_at: Timestamp;
  path: string;
  local_version: Int8;
  local_value_sha256: Buffer | null;
  primary_version: Int8 | null;
  action: 'overwritten' | 'deleted' | 'purged';
  epoch: Int8;
}

export interface DB {
  coffer_divergence: DivergenceTable;
  coffer_merkle_pages: MerklePagesTable;
  coffer_merkle_checkpoint: MerkleCheckpointTable;
  coffer_replication: ReplicationTable;
  coffer_secondaries: SecondariesTable;
  coffer_leases: LeasesTable;
  coffer_wrapped: WrappedTable;
  coffer_entries: EntriesTable;
  coffer_wal: WalTable;
  coffer_wal_head: WalHeadTable;
  coffer_local_entries: LocalEntriesTable;
  coffer_seal: SealTable;
  coffer_tokens: TokensTable;
  coffer_nodes: NodesTable;
}
