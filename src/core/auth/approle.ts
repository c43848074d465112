/** The AppRole auth method. */
import type { Core } from '../core';
import { RouteTable } from '../framework';
import type { MountEntry } from '../mounts';

export class AppRoleBackend {
  private readonly tables = new Map<string, RouteTable>();

  constructor(private readonly core: Core) {}

  routes(mount: MountEntry): RouteTable {
    let t = this.tables.get(mount.uuid);
    if (!t) {
      void this.core;
      t = new RouteTable([]);
      this.tables.set(mount.uuid, t);
    }
    return t;
  }
}
