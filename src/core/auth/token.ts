/** The token auth method (`auth/token/...`). */
import type { Core } from '../core';
import { RouteTable, type RouteDef } from '../framework';

export class TokenBackend {
  readonly table: RouteTable;

  constructor(private readonly core: Core) {
    this.table = new RouteTable(this.routeDefs());
  }

  private routeDefs(): RouteDef[] {
    void this.core;
    return [];
  }
}
