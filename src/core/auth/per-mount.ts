/** An auth method with one route table per mount (userpass, approle). */
import type { Core } from '../core';
import { RouteTable, type RouteDef } from '../framework';
import type { MountEntry } from '../mounts';

export abstract class PerMountBackend {
  private readonly tables = new Map<string, RouteTable>();

  constructor(protected readonly core: Core) {}

  routes(mount: MountEntry): RouteTable {
    let t = this.tables.get(mount.uuid);
    if (!t) {
      t = new RouteTable(this.routeDefs(mount));
      this.tables.set(mount.uuid, t);
    }
    return t;
  }

  /** The mount as it is now (tuning replaces the entry; the route table outlives it). */
  protected current(mount: MountEntry): MountEntry {
    return this.core.mounts.list('auth').find((m) => m.uuid === mount.uuid) ?? mount;
  }

  protected abstract routeDefs(mount: MountEntry): RouteDef[];
}
