/** sys/ routes: leases. */
import type { Core } from '../core';
import type { RouteDef } from '../framework';

export function leasesRoutes(_core: Core): RouteDef[] {
  return [];
}
