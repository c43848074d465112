/**
 * The closed set of domain errors. Core throws these; http/errors.ts maps each to a status and
 * Vault's wording in one table. No HTTP status codes live in core.
 */
export abstract class CofferError extends Error {
  abstract readonly kind: string;
  /** Extra Vault-visible strings returned with the error (rare). */
  readonly details: string[] = [];
}

function kind<K extends string>(k: K) {
  return class extends CofferError {
    readonly kind = k;
  };
}

/** Input the caller can fix: bad JSON, missing field, bad value. */
export class InvalidRequest extends kind('invalid_request') {}
/** Token missing, unknown, expired, or lacking capability. Vault answers all of these alike. */
export class PermissionDenied extends kind('permission_denied') {
  constructor(message = 'permission denied') {
    super(message);
  }
}
export class NotFound extends kind('not_found') {
  constructor(message = '') {
    super(message);
  }
}
export class UnsupportedPath extends kind('unsupported_path') {
  constructor(message = 'unsupported path') {
    super(message);
  }
}
export class UnsupportedOperation extends kind('unsupported_operation') {
  constructor(message = 'unsupported operation') {
    super(message);
  }
}
export class Sealed extends kind('sealed') {
  constructor(message = 'Vault is sealed') {
    super(message);
  }
}
export class NotInitialized extends kind('not_initialized') {
  constructor(message = 'Vault is not initialized') {
    super(message);
  }
}
export class AlreadyInitialized extends kind('already_initialized') {
  constructor(message = 'Vault is already initialized') {
    super(message);
  }
}
export class CasMismatch extends kind('cas_mismatch') {
  constructor(message = 'check-and-set parameter did not match the current version') {
    super(message);
  }
}
export class UnsupportedMediaType extends kind('unsupported_media_type') {}
export class PayloadTooLarge extends kind('payload_too_large') {
  constructor(message = 'request body too large') {
    super(message);
  }
}
/** Storage (Postgres) is unreachable or failing: the caller may retry. */
export class StorageUnavailable extends kind('storage_unavailable') {}
/** A conflicting concurrent change; the caller may retry. */
export class Conflict extends kind('conflict') {}
/** A precondition on cluster state (e.g. X-Vault-Index not reached yet). */
export class PreconditionFailed extends kind('precondition_failed') {}

/** Internal: a write used a keyring term another process has since rotated away from. The
 * barrier reloads its keyring and retries; callers never see it. */
export class KeyringStale extends kind('keyring_stale') {
  constructor() {
    super('keyring term is stale');
  }
}

/** Internal: this cluster is a secondary and the request writes replicated data; core hands
 * the request to the forwarder instead. */
export class MustForward extends kind('must_forward') {
  constructor() {
    super('this cluster is a performance secondary and cannot forward this write yet; retry');
  }
}

/** The primary could not be reached (or refused) while forwarding a write. */
export class UpstreamUnavailable extends kind('upstream_unavailable') {}

/** This cluster was a primary and another cluster has been promoted since: it takes no writes. */
export class Superseded extends kind('superseded') {}

/** An error the primary answered to a forwarded request, relayed with its status as it is. */
export class Relayed extends kind('relayed') {
  constructor(
    readonly status: number,
    errors: string[],
  ) {
    super(errors[0] ?? '');
    this.details.push(...errors.slice(1));
  }
}

export type DomainError =
  | InvalidRequest
  | PermissionDenied
  | NotFound
  | UnsupportedPath
  | UnsupportedOperation
  | Sealed
  | NotInitialized
  | AlreadyInitialized
  | CasMismatch
  | UnsupportedMediaType
  | PayloadTooLarge
  | StorageUnavailable
  | Conflict
  | PreconditionFailed;
