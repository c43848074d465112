/** THE table from domain errors to HTTP status. Nothing else in the code picks a status for an error. */
import { CofferError, Relayed } from '../core/errors';

const STATUS: Record<string, number> = {
  invalid_request: 400,
  cas_mismatch: 400,
  already_initialized: 400,
  permission_denied: 403,
  not_found: 404,
  unsupported_path: 404,
  unsupported_operation: 405,
  precondition_failed: 412,
  payload_too_large: 413,
  unsupported_media_type: 415,
  conflict: 409,
  not_initialized: 501,
  sealed: 503,
  storage_unavailable: 503,
  upstream_unavailable: 502,
  superseded: 503,
  // A write that must go to the primary, from a secondary that has no route to it (yet).
  must_forward: 503,
};

export interface HttpError {
  status: number;
  errors: string[];
}

/** Postgres/network failures mean storage is unavailable: 503, never a 500 with internals. */
const UNAVAILABLE_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', '57P01', '57P02', '57P03', '08000', '08003', '08006', '08001', '08004', '53300']);

export function toHttpError(err: unknown): HttpError {
  if (err instanceof Relayed) return { status: err.status, errors: err.message ? [err.message, ...err.details] : [] };
  if (err instanceof CofferError) {
    const status = STATUS[err.kind] ?? 500;
    return { status, errors: err.message ? [err.message, ...err.details] : [] };
  }
  const code = (err as { code?: string })?.code;
  if (code && UNAVAILABLE_CODES.has(code)) return { status: 503, errors: ['storage is unavailable; retry later'] };
  // pg throws the "not queryable" error (no code) for a statement on a client whose connection
  // already failed, e.g. the ROLLBACK kysely issues after a transaction's connection was reset.
  if (err instanceof Error && /Connection terminated|connect ECONNREFUSED|timeout exceeded when trying to connect|Client has encountered a connection error and is not queryable/.test(err.message)) {
    return { status: 503, errors: ['storage is unavailable; retry later'] };
  }
  return { status: 500, errors: ['internal error'] };
}
